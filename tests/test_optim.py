"""
MuonAdamW / DistMuonAdamW against simple references written here: a textbook AdamW, a per-matrix
Muon (momentum, row equalisation, Polar Express, norm restoration, NorMuon, cautious weight decay), the
SVD polar factor, the single-process optimizer (for the distributed one, under torchrun), hand-computed
schedules, and the batch-size rule's table.
"""

import math
import os

import pytest
import torch

from conftest import REPO_ROOT, run_torchrun
from helpers import tiny_config
from nanochat.common import UserError
from nanochat.optim import (
    DistMuonAdamW,
    GradScaler,
    MuonAdamW,
    apply_schedules,
    auto_batch_size,
    batch_lr_scale,
    equalize_rows,
    get_lr_multiplier,
    get_muon_momentum,
    get_weight_decay,
    polar_express,
    restore_norm,
    transfer_weight_decay,
)

# The published Polar Express coefficients, transcribed independently of nanochat/optim.py.
PUBLISHED_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def leaf(tensor):
    return torch.nn.Parameter(tensor)


# ------------------------------------------------------------------ AdamW


def reference_adamw(p, g, state, lr, betas, eps, wd):
    """Textbook AdamW in fp32 on an fp32 master value p; returns the new p."""
    beta1, beta2 = betas
    state["t"] += 1
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
    m_hat = state["m"] / (1 - beta1 ** state["t"])
    v_hat = state["v"] / (1 - beta2 ** state["t"])
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


def test_adamw_matches_textbook_including_bf16_param():
    torch.manual_seed(0)
    params = [leaf(torch.randn(33, 17)), leaf(torch.randn(5)), leaf(torch.randn(16, 8).bfloat16())]
    groups = [
        dict(kind="adamw", params=params[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1),
        dict(kind="adamw", params=params[2:], lr=0.05, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.0),
    ]
    optimizer = MuonAdamW(groups)
    ref_p = [p.detach().float().clone() for p in params]
    ref_state = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in ref_p]
    hyper = [groups[0]] * 2 + [groups[1]]
    for step in range(6):
        lrm = 1.0 - 0.1 * step  # a changing lr must be picked up every step
        apply_schedules(optimizer, lrm)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape).to(p.dtype) * (10.0 ** (i - 1))
            g = hyper[i]
            ref_p[i] = reference_adamw(p.detach().float(), p.grad.float(), ref_state[i], g["lr"] * lrm, g["betas"], g["eps"], g["weight_decay"])
        optimizer.step()
        for i in range(2):
            torch.testing.assert_close(params[i].detach(), ref_p[i], rtol=1e-5, atol=1e-6)
        # bf16 param: the step runs in fp32 from the bf16 value and rounds once at the end.
        torch.testing.assert_close(params[2].detach(), ref_p[2].bfloat16(), rtol=0, atol=0.01)  # at most 1 ulp at |p|<4
        assert (params[2].detach() != ref_p[2].bfloat16()).float().mean() < 0.05
    # Moments are fp32 and match fp32 math to fp32 precision (bf16 math would be off by ~1e-3).
    state = optimizer.state[params[2]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"], ref_state[2]["m"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state[2]["v"], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ Muon


def reference_orthogonalize(G):
    """Polar Express on one matrix, written out plainly."""
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() * 1.01 + 1e-6)
    for a, b, c in PUBLISHED_COEFFS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 160), (160, 96)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_polar_express_singular_values_near_one(shape, scale):
    torch.manual_seed(1)
    G = torch.randn(3, *shape) * scale
    X = polar_express(G, 5)
    sv = torch.linalg.svdvals(X)
    # Measured band for these well-conditioned shapes: [0.858, 1.142] at every scale (the 5-step
    # polynomial maps all of (0, 1] there); a little slack for the random draw.
    assert sv.min() > 0.84 and sv.max() < 1.16, (sv.min().item(), sv.max().item())
    # And it is the polar factor U V^T of G, not just any orthogonal matrix.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cosine = (X * (U @ Vh)).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert cosine.min() > 0.99


def test_polar_express_bf16_matches_fp32_band():
    torch.manual_seed(2)
    G = torch.randn(2, 48, 128)
    sv = torch.linalg.svdvals(polar_express(G.bfloat16(), 5).float())
    assert sv.min() > 0.82 and sv.max() < 1.18  # bf16 rounding widens the band by ~0.01-0.02


def reference_equalize_rows(G):
    """MuonEq on one matrix: every row rescaled to the RMS of the row norms, one row at a time."""
    row_norms = [row.norm() for row in G]
    rms = math.sqrt(sum(n.item() ** 2 for n in row_norms) / len(row_norms))
    return torch.stack([row * (rms / n) for row, n in zip(G, row_norms)])


def reference_muon_step(p, g, state, lr, momentum, wd, beta2):
    """One Muon step on one matrix; returns the new p. state: buf (rows, cols), v (factored)."""
    rows, cols = p.shape
    state["buf"] = momentum * state["buf"] + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * state["buf"]
    O = reference_orthogonalize(reference_equalize_rows(u))
    O = O * math.sqrt(min(rows, cols)) / O.norm()  # Muon+: the Frobenius norm of an exact orthogonal factor
    mean_sq = (O**2).mean(dim=1, keepdim=True) if rows >= cols else (O**2).mean(dim=0, keepdim=True)
    state["v"] = beta2 * state["v"] + (1 - beta2) * mean_sq
    scaled = O / state["v"].sqrt()
    scaled = scaled * O.norm() / scaled.norm()
    lr = lr * max(1.0, rows / cols) ** 0.5
    decay_mask = (scaled * p >= 0).float()
    return p - lr * scaled - lr * wd * p * decay_mask


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_matches_per_matrix_reference(shape):
    torch.manual_seed(3)
    params = [leaf(torch.randn(*shape) * 0.1) for _ in range(3)]
    group = dict(kind="muon", params=params, lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.5)
    optimizer = MuonAdamW([group])
    ref_p = [p.detach().clone() for p in params]
    factored = (shape[0], 1) if shape[0] >= shape[1] else (1, shape[1])
    ref_state = [dict(buf=torch.zeros(shape), v=torch.zeros(factored)) for _ in params]
    for step in range(4):
        momentum, lrm = get_muon_momentum(100 * step), 1.0 - 0.2 * step
        apply_schedules(optimizer, lrm, muon_momentum=momentum)
        for i, p in enumerate(params):
            p.grad = torch.randn(shape) * 0.1
            ref_p[i] = reference_muon_step(ref_p[i], p.grad.clone(), ref_state[i], 0.02 * lrm, momentum, 0.5, 0.9)
        optimizer.step()
        for p, ref in zip(params, ref_p):
            torch.testing.assert_close(p.detach(), ref, rtol=1e-4, atol=2e-6)
    assert any((r.abs() < 1e-2).any() for r in ref_p)  # decay touched small coordinates, so the mask mattered


def test_equalize_rows_and_restore_norm_against_their_definitions():
    torch.manual_seed(5)
    G = torch.randn(3, 12, 20) * torch.logspace(-3, 3, 12)[:, None]  # row norms over six decades
    equalized = equalize_rows(G)
    for g, e in zip(G, equalized):
        torch.testing.assert_close(e, reference_equalize_rows(g), rtol=1e-5, atol=0)
    row_norms = equalized.norm(dim=-1)
    torch.testing.assert_close(row_norms, row_norms[:, :1].expand_as(row_norms), rtol=1e-5, atol=0)  # all equal
    torch.testing.assert_close(equalized.norm(dim=(-2, -1)), G.norm(dim=(-2, -1)), rtol=1e-5, atol=0)  # norm kept
    for shape in [(12, 20), (20, 12)]:
        X = torch.randn(2, *shape) * 7
        restored = restore_norm(X)
        torch.testing.assert_close(restored.norm(dim=(-2, -1)), torch.full((2,), math.sqrt(12.0)))
        torch.testing.assert_close(restored / restored.norm(dim=(-2, -1), keepdim=True), X / X.norm(dim=(-2, -1), keepdim=True))
    # zero matrices and rows (the distributed optimizer's padding) stay exactly zero
    zeros = torch.zeros(1, 4, 6)
    assert torch.equal(equalize_rows(zeros), zeros) and torch.equal(restore_norm(polar_express(zeros, 5)), zeros)
    G[0, 3] = 0
    assert torch.equal(equalize_rows(G)[0, 3], torch.zeros(20))


# ------------------------------------------------------------------ state dict round trip


def make_mixed_model():
    torch.manual_seed(4)
    return [leaf(torch.randn(20, 12)), leaf(torch.randn(6).bfloat16()), leaf(torch.randn(8, 12)), leaf(torch.randn(8, 12))]


def mixed_groups(params):
    return [
        dict(kind="adamw", params=params[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="muon", params=params[2:], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.1),
    ]


def run_steps(params, optimizer, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        apply_schedules(optimizer, 1.0 / (1 + step))
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        optimizer.step()


def test_state_dict_round_trip_continues_identically(tmp_path):
    params = make_mixed_model()
    optimizer = MuonAdamW(mixed_groups(params))
    run_steps(params, optimizer, range(3))
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    snapshot = [p.detach().clone() for p in params]
    run_steps(params, optimizer, range(3, 6))

    resumed = [leaf(p.clone()) for p in snapshot]
    resumed_optimizer = MuonAdamW(mixed_groups(resumed))
    resumed_optimizer.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert resumed_optimizer.state[resumed[1]]["exp_avg"].dtype == torch.float32  # not cast to the bf16 param
    run_steps(resumed, resumed_optimizer, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_clear_errors():
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[leaf(torch.randn(4, 4)), leaf(torch.randn(4, 5))], lr=0.1,
                        momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.0)])
    p = leaf(torch.randn(3))
    optimizer = MuonAdamW([dict(kind="adamw", params=[p], lr=0.1, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)])
    with pytest.raises(RuntimeError, match="no gradient"):
        optimizer.step()


# ------------------------------------------------------------------ fp16 loss scaling


def test_grad_scaler_unscales_skips_overflows_and_grows():
    params = make_mixed_model()
    reference = [leaf(p.detach().clone()) for p in params]
    optimizer, reference_optimizer = MuonAdamW(mixed_groups(params)), MuonAdamW(mixed_groups(reference))
    scaler = GradScaler(enabled=True, init_scale=2.0**10, growth_interval=2)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(params, reference, grads):
            p.grad = scaler.scale_loss(g).to(p.dtype)  # what backward() of a scaled loss leaves
            q.grad = g.to(q.dtype)
        if step == 1:
            params[2].grad[0, 0] = float("inf")  # an overflow: the whole step is skipped, everywhere
            before = [p.detach().clone() for p in params]
            assert scaler.step(optimizer) is False and scaler.scale == 2.0**9
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            continue
        assert scaler.step(optimizer) is True
        reference_optimizer.step()
        for p, q in zip(params, reference):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    assert scaler.scale == 2.0**10  # two clean steps since the overflow: doubled once


def test_disabled_grad_scaler_is_a_pass_through():
    params, reference = make_mixed_model(), make_mixed_model()
    scaler = GradScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert scaler.scale_loss(loss) is loss
    optimizer, reference_optimizer = MuonAdamW(mixed_groups(params)), MuonAdamW(mixed_groups(reference))
    for p, q in zip(params, reference):
        p.grad = q.grad = torch.ones_like(p) * 1e6  # past fp16's range, no overflow check: bf16/fp32 have the range
    assert scaler.step(optimizer) is True
    reference_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


@pytest.mark.slow
def test_fp16_training_with_the_scaler_learns(monkeypatch):
    from nanochat.gpt import build_gpt
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    torch.manual_seed(0)
    config = tiny_config(window_pattern="SSSL")
    model = build_gpt(config, "cpu")
    optimizer, scaler = model.setup_optimizer(), GradScaler(enabled=True)
    idx = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(idx[:, :-1], idx[:, 1:])
        scaler.scale_loss(loss).backward()
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_dist_muon_adamw_matches_single_process_under_torchrun(tmp_path):
    """2 gloo ranks: same params as MuonAdamW on the global batch, sharded state, exact per-rank resume."""
    returncode, output = run_torchrun(REPO_ROOT / "tests" / "dist_optim_check.py", tmp_path)
    assert returncode == 0, output
    assert output.count("resume from per-rank state is exact") == 2, output
    assert output.count("an overflow on one rank skips the step on all") == 2, output
    assert sorted(os.listdir(tmp_path)) == ["optim_rank0.pt", "optim_rank1.pt"]


def test_dist_state_from_other_world_size_is_refused(monkeypatch):
    optimizer = DistMuonAdamW([dict(kind="adamw", params=[leaf(torch.randn(3))], lr=0.1, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(UserError, match="nproc_per_node=1"):
        optimizer.load_state_dict({"state": {}, "param_groups": optimizer.param_groups, "world_size": 1})


# ------------------------------------------------------------------ schedules


def test_schedules_against_hand_values():
    # 100 steps, 10 warmup steps, 40 warmdown: ramps 0.1..1.0, flat until step 60, then linear to final_lr_frac.
    assert get_lr_multiplier(0, 100, 10, 0.4, 0.0) == pytest.approx(0.1)
    assert get_lr_multiplier(9, 100, 10, 0.4, 0.0) == pytest.approx(1.0)
    assert get_lr_multiplier(60, 100, 10, 0.4, 0.0) == pytest.approx(1.0)
    assert get_lr_multiplier(80, 100, 10, 0.4, 0.0) == pytest.approx(0.5)
    assert get_lr_multiplier(80, 100, 10, 0.4, 0.2) == pytest.approx(0.6)
    assert get_lr_multiplier(100, 100, 0, 0.4, 0.2) == pytest.approx(0.2)
    # momentum: 0.85 -> 0.97 over 400 steps; without a horizon it then holds
    assert get_muon_momentum(0) == pytest.approx(0.85)
    assert get_muon_momentum(200) == pytest.approx(0.91)
    assert get_muon_momentum(400) == get_muon_momentum(5000) == pytest.approx(0.97)
    # with one, it is pulled to 0.90 across the warmdown (here steps 500..1000)
    assert get_muon_momentum(500, 1000, 0.5) == pytest.approx(0.97)
    assert get_muon_momentum(750, 1000, 0.5) == pytest.approx(0.935)
    assert get_muon_momentum(1000, 1000, 0.5) == get_muon_momentum(1200, 1000, 0.5) == pytest.approx(0.90)
    assert get_muon_momentum(150, 200, 0.5) == pytest.approx(0.5 * (0.85 + 0.12 * 150 / 400) + 0.5 * 0.90)  # mid-ramp
    # weight decay: cosine from the full value to 0
    assert get_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert get_weight_decay(25, 100, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert get_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert get_weight_decay(100, 100, 0.2) == get_weight_decay(150, 100, 0.2) == 0.0

    params = make_mixed_model()
    optimizer = MuonAdamW(mixed_groups(params))
    apply_schedules(optimizer, 0.5, muon_momentum=0.9, muon_weight_decay=0.05)
    adamw, muon = optimizer.param_groups
    assert adamw["lr"] == pytest.approx(0.005) and adamw["weight_decay"] == 0.01  # AdamW decay untouched
    assert muon["lr"] == pytest.approx(0.01) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.05


@pytest.mark.parametrize("num_iterations", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("warmup_steps, warmdown_ratio, final_lr_frac",
                         [(0, 0.4, 0.0), (1, 0.4, 0.2), (0, 0.0, 0.0), (0, 1.0, 0.0), (40, 0.65, 0.05)])
def test_schedules_stay_in_range_and_hold_past_the_end(num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Over the whole run and far past its end (a resumed run, a miscounted horizon): never negative."""
    steps = range(3 * num_iterations + 2)
    lrms = [get_lr_multiplier(s, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac) for s in steps]
    assert all(0.0 <= lrm <= 1.0 for lrm in lrms), lrms
    has_warmdown = round(warmdown_ratio * num_iterations) > 0
    if warmup_steps <= num_iterations:
        assert lrms[num_iterations:] == [pytest.approx(final_lr_frac if has_warmdown else 1.0)] * (len(lrms) - num_iterations)
    decays = [get_weight_decay(s, num_iterations, 0.2) for s in steps]
    assert all(0.0 <= wd <= 0.2 for wd in decays) and decays[num_iterations:] == [0.0] * (len(decays) - num_iterations)
    momenta = [get_muon_momentum(s, num_iterations, warmdown_ratio) for s in steps]
    assert all(0.85 <= m <= 0.97 for m in momenta)
    if has_warmdown:
        assert momenta[num_iterations:] == [pytest.approx(0.90)] * (len(momenta) - num_iterations)


# ------------------------------------------------------------------ batch size and hyperparameter transfer


def scaling_tokens(depth, ratio=12, vocab_size=32768):
    """ratio x (transformer matrices + lm_head) of the model config_for_depth builds, counted on meta."""
    from nanochat.gpt import GPT, config_for_depth
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab_size, sequence_len=2048))
    return ratio * (sum(p.numel() for p in model.transformer.h.parameters()) + model.lm_head.weight.numel())


@pytest.mark.parametrize("depth, batch_size", [(8, 2**18), (10, 2**19), (12, 2**19), (16, 2**19), (18, 2**20),
                                               (20, 2**20), (24, 2**20), (26, 2**20), (32, 2**21), (40, 2**21)])
def test_auto_batch_size_table(depth, batch_size):
    assert auto_batch_size(scaling_tokens(depth), scaling_tokens(12)) == batch_size


def test_hyperparameter_transfer_against_hand_values():
    assert auto_batch_size(10**9, 10**9) == 2**19
    assert auto_batch_size(2 ** (1 / 0.383) * 10**9, 10**9) == 2**20  # twice the batch at 2^(1/0.383) x the tokens
    assert batch_lr_scale(2**19) == 1.0 and batch_lr_scale(2**17) == pytest.approx(0.5)
    # decay timescale kept: 4x the batch doubles the lr, so half the decay per step... and 4x the tokens quarter it
    assert transfer_weight_decay(0.28, 2**19, 10**9, 10**9) == pytest.approx(0.28)
    assert transfer_weight_decay(0.28, 2**21, 4 * 10**9, 10**9) == pytest.approx(0.28 * 2 / 4)
    assert transfer_weight_decay(0.28, 2**12, 10**8, 10**9) == pytest.approx(0.28 * 2 ** -3.5 * 10)


# ------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled steps run only on GPU by default")
def test_compiled_cuda_step_matches_eager_and_does_not_recompile_on_lr_change():
    import torch._dynamo

    params = [leaf(p.detach().cuda()) for p in make_mixed_model()]
    eager_params = [leaf(p.detach().clone()) for p in params]
    compiled = MuonAdamW(mixed_groups(params), orth_dtype=torch.float32)
    eager = MuonAdamW(mixed_groups(eager_params), orth_dtype=torch.float32, compile=False)
    torch._dynamo.utils.counters.clear()
    for step in range(4):
        for opt, ps in ((compiled, params), (eager, eager_params)):
            apply_schedules(opt, 1.0 / (1 + step), muon_momentum=0.85 + 0.02 * step)
            gen = torch.Generator(device="cuda").manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype)
            opt.step()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # One graph per (function, shape/dtype): the lr/momentum changes above added none.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
