"""
torchrun worker for tests/test_optim.py (2 ranks) and tests/test_multinode.py (2 nodes x 2 ranks), gloo:
DistMuonAdamW on each rank's share of a global batch must follow MuonAdamW on the whole batch, keep
sharded state, and resume exactly from its per-rank state files, and fp16 loss scaling must skip an
overflowing step on every rank. Usage: torchrun --nproc_per_node=2 tests/dist_optim_check.py OUT_DIR
Exits non-zero (an AssertionError) on any mismatch.
"""

import copy
import os
import sys

import torch
import torch.nn.functional as F

from nanochat.common import compute_init, compute_cleanup
from nanochat.optim import DistMuonAdamW, GradScaler, MuonAdamW, apply_schedules, get_lr_multiplier

GLOBAL_BATCH = 16  # splits evenly over 2 or 4 ranks
STEPS = 6
SAVE_AFTER = 3
# Tolerance against the single-process run: both apply the identical update math, but the
# distributed gradient is the average of the ranks' share-of-batch means (summed in another order than one
# full-batch mean), so gradients differ by float32 rounding (~1e-7 relative). Adam's normalisation and
# Muon's orthogonalisation pass that on at about the same relative size; after 6 steps we measure
# ~8e-7 absolute. A real bug (wrong shard, missing average, bad padding) moves params by ~lr = 1e-2.
ATOL = 1e-5


def make_params():
    g = torch.Generator().manual_seed(1234)
    params = {
        "emb": torch.randn(129, 16, generator=g),  # 2064 elements, dim 0 odd: padded reduce_scatter
        "head": torch.randn(72, 16, generator=g) * 0.1,  # 1152 elements, dim 0 even: plain reduce_scatter
        "scale": torch.ones(16),  # < 1024 elements: all_reduce, updated whole on every rank
        "square": [torch.randn(16, 16, generator=g) * 0.25 for _ in range(3)],  # 3 matrices: padded to 4
        "up": [torch.randn(32, 16, generator=g) * 0.25],  # 1 tall matrix: ranks > 0 own only padding
        "down": [torch.randn(16, 32, generator=g) * 0.25],  # wide
    }
    return {k: [p.requires_grad_() for p in v] if isinstance(v, list) else v.requires_grad_() for k, v in params.items()}


def make_groups(params):
    muon = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.1)
    return [
        dict(kind="adamw", params=[params["emb"], params["head"]], lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[params["scale"]], lr=0.05, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(muon, params=params["square"]),
        dict(muon, params=params["up"]),
        dict(muon, params=params["down"]),
    ]


def loss_fn(params, idx, targets):
    h = params["emb"][idx]
    for w in params["square"]:
        h = torch.tanh(h @ w.T)
    h = torch.relu(h @ params["up"][0].T) @ params["down"][0].T
    logits = (h * params["scale"]) @ params["head"].T
    return F.cross_entropy(logits, targets)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 129, (GLOBAL_BATCH,), generator=g), torch.randint(0, 72, (GLOBAL_BATCH,), generator=g)


def flat(params):
    return [p for v in params.values() for p in (v if isinstance(v, list) else [v])]


def train_step(params, optimizer, step, rank_slice):
    idx, targets = batch(step)
    apply_schedules(optimizer, get_lr_multiplier(step, STEPS, 1, 0.5, 0.1))  # lr changes every step
    optimizer.zero_grad(set_to_none=True)
    loss_fn(params, idx[rank_slice], targets[rank_slice]).backward()
    optimizer.step()


def main():
    out_dir = sys.argv[1]
    _, rank, local_rank, world_size, _ = compute_init("cpu")
    assert world_size in (2, 4), "run with 2 or 4 ranks"
    share = GLOBAL_BATCH // world_size
    my_share = slice(rank * share, (rank + 1) * share)

    dist_params, ref_params = make_params(), make_params()
    dist_opt, ref_opt = DistMuonAdamW(make_groups(dist_params)), MuonAdamW(make_groups(ref_params))
    max_diff = 0.0
    for step in range(STEPS):
        if step == SAVE_AFTER:
            torch.save(dist_opt.state_dict(), os.path.join(out_dir, f"optim_rank{rank}.pt"))
            saved_params = {k: copy.deepcopy(v) for k, v in dist_params.items()}
        train_step(dist_params, dist_opt, step, my_share)
        train_step(ref_params, ref_opt, step, slice(None))
        max_diff = max(max_diff, max((d - r).abs().max().item() for d, r in zip(flat(dist_params), flat(ref_params))))
    print(f"rank {rank} (local rank {local_rank}) of {world_size}: max |dist - single| over {STEPS} steps = "
          f"{max_diff:.2e} (atol {ATOL})", flush=True)
    assert max_diff < ATOL, f"DistMuonAdamW diverged from MuonAdamW by {max_diff}"

    # ZeRO-2: each rank holds state only for its shard (129 rows padded to 130 or 132 -> 65 or 33 rows each;
    # 3 matrices padded to 4 -> 2 or 1 each).
    assert dist_opt.state[dist_params["emb"]]["exp_avg"].shape == (-(-129 // world_size), 16)
    assert dist_opt.state[dist_params["square"][0]]["momentum_buffer"].shape == (-(-3 // world_size), 16, 16)
    assert dist_opt.state[dist_params["scale"]]["exp_avg"].shape == (16,)

    # Resume from the per-rank file and replay the last steps: the trajectory must be identical.
    resumed_opt = DistMuonAdamW(make_groups(saved_params))
    resumed_opt.load_state_dict(torch.load(os.path.join(out_dir, f"optim_rank{rank}.pt")))
    for step in range(SAVE_AFTER, STEPS):
        train_step(saved_params, resumed_opt, step, my_share)
    for resumed, original in zip(flat(saved_params), flat(dist_params)):
        assert torch.equal(resumed, original), "resumed DistMuonAdamW trajectory differs"
    print(f"rank {rank}: resume from per-rank state is exact", flush=True)

    # Loss scaling: an overflow on one rank skips the step on all of them (a lone skip would leave the other
    # rank waiting in its collectives), then the next clean step runs everywhere.
    scaler = GradScaler(enabled=True, init_scale=2.0**8)
    for overflow in (True, False):
        before = [p.detach().clone() for p in flat(dist_params)]
        dist_opt.zero_grad(set_to_none=True)
        idx, targets = batch(STEPS)
        scaler.scale_loss(loss_fn(dist_params, idx[my_share], targets[my_share])).backward()
        if overflow and rank == 1:
            dist_params["square"][0].grad[0, 0] = float("inf")
        assert scaler.step(dist_opt) is not overflow
        changed = [not torch.equal(p, b) for p, b in zip(flat(dist_params), before)]
        assert not any(changed) if overflow else all(changed)
    assert scaler.scale == 2.0**7
    print(f"rank {rank}: an overflow on one rank skips the step on all", flush=True)
    compute_cleanup()


if __name__ == "__main__":
    main()
