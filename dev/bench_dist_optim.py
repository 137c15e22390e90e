"""
Memory and time of one DistMuonAdamW step beyond what the run already holds (parameters, gradients,
optimizer state), for the real param groups of a GPT of a given --depth, on CPU ranks (gloo). Every rank
prints its figures:
- tensors: the peak bytes of the tensors the step itself allocates and that are alive at once (counted
  at the dispatcher: every new storage an op returns, until it is freed). A GPU step allocates the same
  buffers (its compiled update math, fewer temporaries); gloo's internal copies are not counted here.
- RSS: the peak resident memory during the step above the resident memory before it (Linux VmHWM,
  reset before each step), which does include gloo's internal copies. MALLOC_MMAP_THRESHOLD_ makes glibc
  hand every large block back to the system when it is freed, so that RSS follows the live memory.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 \
        -m dev.bench_dist_optim --depth 8 --vocab-size 8192
"""

import argparse
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanochat.common import compute_cleanup, compute_init, print0
from nanochat.gpt import build_gpt, config_for_depth

parser = argparse.ArgumentParser(description="Memory and time of one distributed optimizer step")
parser.add_argument("--depth", type=int, default=8)
parser.add_argument("--aspect-ratio", type=int, default=64)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--vocab-size", type=int, default=8192)
parser.add_argument("--steps", type=int, default=2, help="measured steps (after one step that creates the state)")
args = parser.parse_args()


class NewTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is on (not views, not in-place results), live and peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                if getattr(storage, "_counted", False):
                    continue
                storage._counted = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


ddp, rank, _, world_size, device = compute_init("cpu")
assert ddp, "run under torchrun (see the docstring)"
config = config_for_depth(args.depth, args.vocab_size, 256, args.aspect_ratio, args.head_dim)
model = build_gpt(config, device)
optimizer = model.setup_optimizer()
muon_bytes = sum(p.nbytes for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"])
adamw_bytes = sum(p.nbytes for g in optimizer.param_groups if g["kind"] == "adamw" for p in g["params"])
print0(f"depth {args.depth}, n_embd {config.n_embd}, {world_size} ranks, {torch.get_num_threads()} threads/rank: "
       f"Muon matrices {muon_bytes / 2**20:.1f} MiB, AdamW tensors {adamw_bytes / 2**20:.1f} MiB")

generator = torch.Generator().manual_seed(rank)
for p in model.parameters():
    p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype)
optimizer.step()  # creates the (sharded) state: not part of what a step adds
figures = []
for _ in range(args.steps):
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss_before = rss_bytes("VmRSS")
    counter = NewTensorBytes()
    with counter:
        optimizer.step()
    rss = rss_bytes("VmHWM") - rss_before
    dist.barrier()
    t0 = time.perf_counter()
    optimizer.step()  # timed apart: the counting slows every op down
    figures.append((counter.peak, rss, counter.live, time.perf_counter() - t0))
peaks, rsses, lefts, dts = zip(*figures)
peak, rss, left, dt = max(peaks), max(rsses), max(lefts), min(dts)
print(f"rank {rank}: step adds tensors peak {peak / 2**20:.1f} MiB ({peak / muon_bytes:.2f}x the Muon matrices, "
      f"{peak / (muon_bytes + adamw_bytes):.2f}x all parameters), "
      f"still held after the step {left / 2**20:.1f} MiB; RSS peak +{rss / 2**20:.1f} MiB; "
      f"step {dt * 1e3:.0f} ms (memory: max, time: min of {args.steps} steps)", flush=True)
compute_cleanup()
