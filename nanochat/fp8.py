"""
Float8 training for the big matmuls: one Linear whose forward and backward run on fp8 tensor cores.

How a training script turns it on (after building the model, before torch.compile and the optimizer):
    check_fp8_supported(device)   # a one-line exit unless the GPU has fp8 tensor cores (sm >= 8.9)
    convert_to_fp8(model)         # swaps eligible nn.Linear layers; parameters and checkpoints unchanged

The recipe: inputs and weights are cast to e4m3 (3 mantissa bits, range +-448), gradients to e5m2 (2
mantissa bits, range +-57344: gradients span more orders of magnitude than they need digits), the split of
Micikevicius et al. 2022 ("FP8 Formats for Deep Learning"). Error figures: dev/LOG.md, "fp8 Linear". Each
tensor gets one scale, recomputed from its largest magnitude at every call, so no history to carry
around. Only the fp8 copies are saved for backward: half the activation memory of bf16 copies. The
fp32 master weight stays the parameter: the optimizer, the checkpoints and the FLOP count see the same
model. In eval mode the layers run in the compute dtype like any Linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
MIN_CAPABILITY = (8, 9)  # Ada and Hopper are the first NVIDIA GPUs with fp8 tensor cores
SCALE_EXPONENT_LIMIT = 126  # 2**+-126 and its inverse are exact normal fp32 numbers


def fp8_scale(x, dtype):
    """
    The power of two that maps x's largest magnitude into the top binade of dtype's range (an fp32 scalar
    tensor). A power of two makes the scaling and its inverse exact: quantisation error is fp8 rounding only.
    An all-zero tensor gets the largest scale (its values stay zero) instead of a division by zero.
    """
    amax = x.detach().abs().amax().float()
    exponent = torch.floor(torch.log2(torch.finfo(dtype).max / amax))
    return torch.exp2(exponent.clamp(-SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT))


def to_fp8(x, scale, dtype):
    """Saturating cast of x * scale: out-of-range values become +-max (e5m2 would give inf, which poisons a matmul)."""
    fp8_max = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)  # exact: the scale is a power of two


def from_fp8(x_fp8, scale):
    """The values x_fp8 stands for, in fp32."""
    return x_fp8.float() / scale


def _scaled_matmul(a_fp8, a_scale, b_fp8, b_scale, out_dtype, use_fast_accum):
    """a @ b from fp8 operands and their scales. The fp8 GEMMs of Hopper-class GPUs take the first operand
    row-major and the second column-major, every dim but a's rows a multiple of 16, and the inverse scales."""
    a_fp8 = a_fp8.contiguous()
    b_fp8 = b_fp8.t().contiguous().t()  # no copy when b is already column-major (a transposed weight)
    return torch._scaled_mm(a_fp8, b_fp8, a_scale.reciprocal(), b_scale.reciprocal(), out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T with x (M, K), W (N, K); one autograd node, so torch.compile sees the whole fp8 matmul."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x_scale, w_scale = fp8_scale(x, E4M3), fp8_scale(weight, E4M3)
        x_fp8, w_fp8 = to_fp8(x, x_scale, E4M3), to_fp8(weight, w_scale, E4M3)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        # Fast (lower precision) accumulation in the forward only: the usual fp8 recipe; gradients accumulate fully.
        return _scaled_matmul(x_fp8, x_scale, w_fp8.t(), w_scale, out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_scale, w_fp8, w_scale = ctx.saved_tensors
        g_scale = fp8_scale(grad_out, E5M2)
        g_fp8 = to_fp8(grad_out, g_scale, E5M2)
        grad_x = _scaled_matmul(g_fp8, g_scale, w_fp8, w_scale, ctx.x_dtype, use_fast_accum=False)
        grad_w = _scaled_matmul(g_fp8.t(), g_scale, x_fp8, x_scale, ctx.w_dtype, use_fast_accum=False)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """A bias-free Linear that trains in fp8; in eval mode it runs in the input's dtype like nn.Linear."""

    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight.to(x.dtype))
        tokens = x.numel() // self.in_features
        if tokens % 16 != 0:
            raise ValueError(f"fp8 training needs a multiple of 16 tokens per forward pass, got {tokens}: "
                             f"change the device batch size or sequence length, or drop --fp8")
        # Under autocast the output takes the autocast dtype, as nn.Linear's does; else the input's dtype.
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y = _Float8Matmul.apply(x.reshape(tokens, self.in_features), self.weight, out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear):
        """The same layer, sharing the original's weight Parameter (so optimizer and checkpoints see no change)."""
        if linear.bias is not None:
            raise ValueError("Float8Linear has no bias; nanochat's Linears have none")
        with torch.device("meta"):  # no memory for a weight that is replaced right away
            fp8_linear = cls(linear.in_features, linear.out_features, bias=False)
        fp8_linear.weight = linear.weight
        return fp8_linear.train(linear.training)


def is_fp8_eligible(linear, min_features=128):
    """Small matmuls gain nothing from fp8 (the casts cost more); the kernels need dims in multiples of 16."""
    dims = (linear.in_features, linear.out_features)
    return min(dims) >= min_features and all(d % 16 == 0 for d in dims)


def convert_to_fp8(model, min_features=128):
    """Swap every eligible nn.Linear of model for a Float8Linear in place; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, Float8Linear) \
                    and is_fp8_eligible(child, min_features):
                setattr(parent, name, Float8Linear.from_linear(child))
    return model


def check_fp8_supported(device):
    """Exit with a one-line message unless device is a CUDA GPU with fp8 tensor cores."""
    device = torch.device(device)
    if device.type != "cuda":
        raise SystemExit(f"--fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability >= 8.9), "
                         f"this run is on {device.type}: drop --fp8")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise SystemExit(f"--fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: drop --fp8")
