"""fp8 training: the scaling math, the fp8 matmul and its gradients, and the GPT conversion.

torch's float8 dtypes and torch._scaled_mm both work on CPU, so the code that runs on the GPU is the code
tested here; a reference fp8 rounding and float64 matmuls written below are what it is checked against.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from nanochat.fp8 import (E4M3, E5M2, Float8Linear, check_fp8_supported, convert_to_fp8, fp8_scale, from_fp8,
                          to_fp8)
from nanochat.gpt import build_gpt
from helpers import tiny_config

FP8_DTYPES = [E4M3, E5M2]


def reference_fp8_round(v, dtype):
    """Round float64 values to the nearest value of dtype's grid (ties to even), saturating at +-max."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))  # e4m3: 3, e5m2: 2
    min_exponent = round(math.log2(info.tiny))  # below the smallest normal the grid is evenly spaced
    exponent = torch.floor(torch.log2(v.abs())).clamp(min=min_exponent)
    step = 2.0 ** (exponent - mantissa_bits)
    return (torch.round(v / step) * step).clamp(-info.max, info.max)


def reference_quantise(t, dtype):
    """What an fp8 tensor with one power-of-two scale stands for, in float64."""
    scale = 2.0 ** math.floor(math.log2(torch.finfo(dtype).max / t.abs().max().item()))
    return reference_fp8_round(t.double() * scale, dtype) / scale


def relative_error(actual, expected):
    """Relative Frobenius error, in float64."""
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("amax", [1e-30, 1e-6, 1.0, 3e4, 1e30])
def test_round_trip_error_bound(dtype, amax):
    info = torch.finfo(dtype)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    x = x / x.abs().max() * amax
    scale = fp8_scale(x, dtype)
    # the largest magnitude lands in the top binade: the whole range is used, nothing saturates
    assert info.max / 2 < (x.abs().max() * scale).item() <= info.max
    x_fp8 = to_fp8(x, scale, dtype)
    assert x_fp8.dtype == dtype
    assert torch.equal(x_fp8.double(), reference_fp8_round(x.double() * scale.item(), dtype))
    # Round to nearest: within half a step, i.e. eps/2 relative, or eps/2 of the smallest normal below it.
    error = (from_fp8(x_fp8, scale) - x).abs()
    bound = info.eps / 2 * torch.maximum(x.abs(), torch.tensor(info.tiny) / scale)
    assert (error <= bound).all()
    assert error.max() > 0  # values really went through fp8


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_zeros_and_tiny_values(dtype):
    zeros = torch.zeros(64)
    scale = fp8_scale(zeros, dtype)
    assert torch.isfinite(scale) and torch.isfinite(scale.reciprocal())
    assert torch.equal(from_fp8(to_fp8(zeros, scale, dtype), scale), zeros)
    # below the float32 normal range the scale stops at 2^126 (its inverse must stay an exact float32)
    tiny = torch.tensor([1e-40, -3e-41, 0.0])
    scale = fp8_scale(tiny, dtype)
    assert scale.item() == 2.0 ** 126
    assert torch.equal(to_fp8(tiny, scale, dtype).double(), reference_fp8_round(tiny.double() * 2.0 ** 126, dtype))


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_cast_saturates_at_the_range_limit(dtype):
    fp8_max = torch.finfo(dtype).max
    x = torch.tensor([1.0, -1.0, 0.5, float("inf"), float("-inf")])
    x_fp8 = to_fp8(x, torch.tensor(1e6), dtype)  # a scale far too large for these values
    assert x_fp8.float().tolist() == [fp8_max, -fp8_max, fp8_max, fp8_max, -fp8_max]


def make_layer(in_features=256, out_features=192, seed=0):
    torch.manual_seed(seed)
    return Float8Linear.from_linear(nn.Linear(in_features, out_features, bias=False))


def fp8_forward_backward(layer, x, grad_out):
    """y = layer(x) and the gradients of (y * grad_out).sum(), so that grad_out is exactly dL/dy."""
    x = x.detach().clone().requires_grad_()
    layer.weight.grad = None
    y = layer(x)
    y.backward(grad_out)
    return y, x.grad, layer.weight.grad


def matmul_case(device="cpu"):
    """Inputs, weights and gradients of very different magnitudes, so each tensor needs its own scale."""
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(2, 32, 256, generator=g)
    weight = 0.02 * torch.randn(192, 256, generator=g)
    grad_out = 1e-5 * torch.randn(2, 32, 192, generator=g)
    layer = make_layer()
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.to(device), x.to(device), grad_out.to(device)


def expected_fp8_results(x, weight, grad_out):
    """Forward and both gradients from the quantised operands (e4m3 x and W, e5m2 gradient), in float64."""
    x2, g2 = x.reshape(-1, x.size(-1)).cpu(), grad_out.reshape(-1, grad_out.size(-1)).cpu()
    xq, gq = reference_quantise(x2, E4M3), reference_quantise(g2, E5M2)
    wq = reference_quantise(weight.detach().cpu(), E4M3)
    return xq @ wq.T, gq @ wq, gq.T @ xq


def test_fp8_matmul_matches_float64_reference():
    layer, x, grad_out = matmul_case()
    y, grad_x, grad_w = fp8_forward_backward(layer, x, grad_out)
    assert y.shape == (2, 32, 192) and grad_x.shape == x.shape and grad_w.shape == layer.weight.shape
    # Against the same quantisation done here: only float32 accumulation order differs.
    y_q, grad_x_q, grad_w_q = expected_fp8_results(x, layer.weight, grad_out)
    assert relative_error(y.reshape(-1, 192), y_q) < 1e-5
    assert relative_error(grad_x.reshape(-1, 256), grad_x_q) < 1e-5
    assert relative_error(grad_w, grad_w_q) < 1e-5
    # Against the exact products. Rounding to p mantissa bits leaves a relative error of RMS about 2^-p / 5
    # (e4m3, p=3: 0.026; e5m2, p=2: 0.051); the two operands' errors are independent and add in quadrature:
    # about 0.036 for y (e4m3 x e4m3) and 0.057 for the gradients (e5m2 x e4m3); measured 0.037 and 0.059.
    x2, g2, w = x.reshape(-1, 256).double(), grad_out.reshape(-1, 192).double(), layer.weight.detach().double()
    assert relative_error(y.reshape(-1, 192), x2 @ w.T) < 0.05
    assert relative_error(grad_x.reshape(-1, 256), g2 @ w) < 0.08
    assert relative_error(grad_w, g2.T @ x2) < 0.08


def test_backward_keeps_only_fp8_tensors_and_scales():
    layer, x, _ = matmul_case()
    y = layer(x.requires_grad_())
    fp8_node = y.grad_fn.next_functions[0][0]  # y.grad_fn is the reshape back to (B, T, N)
    saved = fp8_node.saved_tensors
    assert [t.dtype for t in saved] == [E4M3, torch.float32, E4M3, torch.float32]
    assert saved[0].shape == (64, 256) and saved[2].shape == (192, 256) and saved[1].dim() == saved[3].dim() == 0


def test_output_follows_autocast_and_input_dtype():
    layer, x, _ = matmul_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    x_bf16 = x.bfloat16().requires_grad_()
    y = layer(x_bf16)
    y.float().sum().backward()
    assert y.dtype == x_bf16.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32


def test_scaled_mm_calls_meet_the_gpu_kernel_requirements(monkeypatch):
    """The CPU kernel accepts any layout; the GPU's does not. Check its rules on every call made here."""
    real_scaled_mm, calls = torch._scaled_mm, []

    def checked_scaled_mm(a, b, scale_a, scale_b, **kwargs):
        assert a.stride(1) == 1 and b.stride(0) == 1  # a row-major, b column-major
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0
        assert E4M3 in (a.dtype, b.dtype)  # e5m2 x e5m2 has no kernel
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        calls.append(kwargs["out_dtype"])
        return real_scaled_mm(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    layer, x, grad_out = matmul_case()
    fp8_forward_backward(layer, x.bfloat16(), grad_out.bfloat16())
    assert calls == [torch.bfloat16, torch.bfloat16, torch.float32]  # y, grad_x in x's dtype; grad_w in fp32


def test_token_count_must_be_a_multiple_of_16():
    layer = make_layer()
    with pytest.raises(ValueError, match="multiple of 16 tokens"):
        layer(torch.randn(3, 7, 256))


def test_compiled_fp8_linear_is_one_graph_without_breaks():
    layer, x, grad_out = matmul_case()
    y_eager, grad_x_eager, grad_w_eager = fp8_forward_backward(layer, x, grad_out)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")  # traces forward and backward like inductor, compiles nothing
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y, grad_x, grad_w = fp8_forward_backward(compiled, x, grad_out)
    assert backend.frame_count == 1 and not counters["graph_break"]
    graph_ops = [node.target for node in backend.graphs[0].graph.nodes if node.op == "call_function"]
    assert graph_ops.count(torch.ops.higher_order.autograd_function_apply) == 1  # the whole fp8 matmul, one node
    assert torch.equal(y, y_eager) and torch.equal(grad_x, grad_x_eager) and torch.equal(grad_w, grad_w_eager)
    torch._dynamo.reset()


def small_gpt():
    # width 128 with one 64-wide kv head: c_k and c_v (128 -> 64) and ve_gate (32 -> 1) stay below 128
    config = tiny_config(vocab_size=200, n_kv_head=1, n_embd=128, window_pattern="SSSL")
    torch.manual_seed(0)
    model = build_gpt(config, "cpu")
    with torch.no_grad():  # non-zero output projections, so every layer shapes the logits
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
    return model


def test_convert_swaps_exactly_the_layers_with_both_dims_at_least_128():
    model = small_gpt()
    params_before = [id(p) for p in model.parameters()]
    convert_to_fp8(model)
    converted = sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    per_layer = ["attn.c_q", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert converted == sorted(["lm_head"] + [f"transformer.h.{i}.{name}" for i in range(2) for name in per_layer])
    assert [id(p) for p in model.parameters()] == params_before  # the same Parameters: optimizer-agnostic
    assert all(m.training for m in model.modules())


def test_conversion_keeps_state_dict_params_and_flops():
    plain = small_gpt()
    model = convert_to_fp8(copy.deepcopy(plain))
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict(), strict=True)
    assert model.num_scaling_params() == plain.num_scaling_params()
    # every matmul weight counts 6 FLOPs per token (2 forward, 4 backward), fp8 or not; plus attention
    linear_weights = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.Linear))
    config = plain.config
    head_dim = config.n_embd // config.n_head
    attention = sum(12 * config.n_head * head_dim * min(left, config.sequence_len) for left, _ in plain.window_sizes)
    assert model.estimate_flops() == plain.estimate_flops() == 6 * linear_weights + attention


def test_gpt_trains_in_fp8_and_evaluates_without_it():
    plain = small_gpt()
    model = convert_to_fp8(copy.deepcopy(plain))
    idx = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    plain.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))  # eval: exactly the compute-dtype model
    plain.train(), model.train()
    # Each fp8 matmul adds a relative error of ~0.04 (forward) or ~0.06 (gradients), and they compound
    # through the two blocks: measured 0.07 on the logits and 0.09-0.17 on the weight gradients.
    assert 0 < relative_error(model(idx), plain(idx).double()) < 0.12
    model(idx, targets=idx).backward()
    plain(idx, targets=idx).backward()
    for (name, p), p_plain in zip(model.named_parameters(), plain.parameters()):
        assert torch.isfinite(p.grad).all(), name
        if p.dim() == 2:
            assert relative_error(p.grad, p_plain.grad.double()) < 0.25, name


def test_convert_refuses_a_linear_with_bias():
    with pytest.raises(ValueError, match="no bias"):
        convert_to_fp8(nn.Sequential(nn.Linear(128, 128)))


def test_fp8_needs_a_gpu_with_fp8_tensor_cores(monkeypatch):
    with pytest.raises(SystemExit, match="--fp8 needs an NVIDIA GPU.*on cpu"):
        check_fp8_supported("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(SystemExit, match="NVIDIA A100 has 8.0"):
        check_fp8_supported("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_supported("cuda")  # Hopper: accepted


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_cuda_scaled_mm_matches_reference():
    layer, x, grad_out = matmul_case("cuda")
    expected = expected_fp8_results(x, layer.weight, grad_out)
    # Layout or scale mistakes give errors of order 1; 1e-2 leaves room for the GPU's fast fp8 accumulation.
    for model in (layer, torch.compile(layer, fullgraph=True)):
        y, grad_x, grad_w = fp8_forward_backward(model, x, grad_out)
        assert relative_error(y.reshape(-1, 192).cpu(), expected[0]) < 1e-2
        assert relative_error(grad_x.reshape(-1, 256).cpu(), expected[1]) < 1e-2
        assert relative_error(grad_w.cpu(), expected[2]) < 1e-2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
