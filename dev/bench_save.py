"""
Time per checkpoint save of a depth-D run on world-size GPUs, through the real save path
(checkpoint_manager.save_checkpoint: torch.save to a temp file, fsync, rename). Rank 0 writes the fp32 model
and its optimizer shard; the other ranks write one shard each at the same time, and a barrier waits for the
slowest: rank 0's bytes set the time per save on a disk that keeps up with all of them.

    python -m dev.bench_save --depth 24 --world-size 8 --dir /path/on/the/disk/to/measure

The state is made of tensors of the right shapes (a model built on the meta device), not a trained one:
torch.save does not compress, so only the byte count matters.
"""

import argparse
import shutil
import tempfile
import time

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, config_for_depth


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--dir", type=str, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    with torch.device("meta"):
        model = GPT(config_for_depth(args.depth, args.vocab_size, 2048))
    groups = model.setup_optimizer().param_groups
    # optimizer state in fp32: Muon keeps a momentum per matrix (+ a small factored second moment), AdamW two
    # moments per parameter; the distributed optimizer splits both evenly over the ranks
    optim_numel = sum(p.numel() * (1 if g["kind"] == "muon" else 2) for g in groups for p in g["params"])
    shard_numel = optim_numel // args.world_size
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    print(f"d{args.depth}: model {model_bytes / 1e9:.2f} GB fp32, optimizer {4 * optim_numel / 1e9:.2f} GB in all, "
          f"{4 * shard_numel / 1e9:.2f} GB per rank of {args.world_size}; rank 0 writes "
          f"{(model_bytes + 4 * shard_numel) / 1e9:.2f} GB, all ranks {(model_bytes + 4 * optim_numel) / 1e9:.2f} GB")

    model_data = {name: torch.ones(p.shape) for name, p in model.named_parameters()}  # (touched: really in memory)
    optimizer_data = {"state": {0: {"momentum_buffer": torch.ones(shard_numel)}}}
    directory = tempfile.mkdtemp(dir=args.dir, prefix="bench_save_")
    try:
        started = time.perf_counter()
        save_checkpoint(directory, 1, model_data, optimizer_data, {"model_config": {}}, rank=0)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(directory)
    written = model_bytes + 4 * shard_numel
    print(f"rank 0's save: {written / 1e9:.2f} GB in {seconds:.1f} s = {written / 1e9 / seconds:.2f} GB/s")


if __name__ == "__main__":
    main()
