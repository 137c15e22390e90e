"""
What the checkpoint checksums cost at d20 size: saving (sha256 of the bytes on their way to disk) and loading
(sha256 of the file before torch.load), for the model file and a single-process optimizer shard.

    python -m dev.bench_checksum [--depth 20] [--repeats 2] [--dir /tmp]

The tensors are random and have the real shapes (config_for_depth; the optimizer shard holds what MuonAdamW
keeps: AdamW's two moments per embedding/scalar, Muon's momentum per stack of matrices). Times are the best of
--repeats; loads read files the save just wrote, so from the page cache: the worst case for the checksum's share.
"""

import argparse
import gc
import os
import shutil
import tempfile
import time

import torch

from nanochat.checkpoint_manager import _save_hashed, atomic_write, file_sha256
from nanochat.gpt import GPT, config_for_depth

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--dir", type=str, default=tempfile.gettempdir(), help="where the files are written")
args = parser.parse_args()


def best(fn):
    times = []
    for _ in range(args.repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_like_shapes(shapes):
    return [torch.empty(shape).uniform_(-1, 1) for shape in shapes]


config = config_for_depth(args.depth, 32768, 2048)
with torch.device("meta"):
    meta_model = GPT(config)
names = [name for name, _ in meta_model.named_parameters()]
shapes = [p.shape for p in meta_model.parameters()]


def model_file():
    return dict(zip(names, random_like_shapes(shapes)))


def optimizer_shard():
    state = {}
    matrices = {p.shape: [] for p in meta_model.transformer.h.parameters()}
    for p in meta_model.transformer.h.parameters():
        matrices[p.shape].append(p)
    matrix_ids = {id(p) for p in meta_model.transformer.h.parameters()}
    others = [p for p in meta_model.parameters() if id(p) not in matrix_ids]
    for i, p in enumerate(others):
        exp_avg, exp_avg_sq = random_like_shapes([p.shape, p.shape])
        state[i] = {"step": 1, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for j, (shape, ps) in enumerate(sorted(matrices.items())):
        (momentum,) = random_like_shapes([(len(ps), *shape)])
        state[len(others) + j] = {"momentum_buffer": momentum, "second_moment": torch.zeros(len(ps), shape[0], 1)}
    return {"state": state, "param_groups": []}


print(f"d{args.depth}: {sum(p.numel() for p in meta_model.parameters()) / 1e6:.0f}M params; "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch {torch.__version__}")
work_dir = tempfile.mkdtemp(dir=args.dir, prefix="bench_checksum_")
try:
    for label, make in [("model file", model_file), ("optimizer shard (1 process)", optimizer_shard)]:
        data = make()
        path = os.path.join(work_dir, "file.pt")
        save_plain = best(lambda: atomic_write(path, lambda f: torch.save(data, f)))
        save_hashed = best(lambda: _save_hashed(path, data))
        del data
        size = os.path.getsize(path)
        load_plain = best(lambda: torch.load(path, map_location="cpu"))
        hash_only = best(lambda: file_sha256(path))
        load_hashed = best(lambda: (file_sha256(path), torch.load(path, map_location="cpu")))
        print(f"{label}: {size / 1e9:.2f} GB | save (fsynced) {save_plain:.2f} s, hashed while writing "
              f"{save_hashed:.2f} s (+{save_hashed - save_plain:.2f} s) | load {load_plain:.2f} s, sha256 of the file "
              f"{hash_only:.2f} s ({size / hash_only / 1e9:.2f} GB/s), verified load {load_hashed:.2f} s "
              f"(+{load_hashed - load_plain:.2f} s)")
        os.remove(path)
        gc.collect()
finally:
    shutil.rmtree(work_dir, ignore_errors=True)
