"""
Benchmark one training step of the model: forward+backward, optimizer step, the whole step's tokens/s (what
base_train reports), peak memory and (on GPU) MFU. Sizes follow base_train's rules (width = depth *
aspect_ratio rounded up to head_dim). Compute dtype, orthogonalization dtype and compile follow the machine
(common.compute_choice, printed with the reason) unless overridden: NANOCHAT_DTYPE, --orth-dtype, --compile.

    python -m dev.bench_model --depth 4 --seq 512 --batch 8 --device-type cpu          # the CPU d4 config
    python -m dev.bench_model --depth 20 --head-dim 128 --seq 2048 --batch 32           # d20 on one GPU
"""

import argparse
import time

import torch

from nanochat.common import (DTYPES, autodetect_device_type, compute_choice, get_device_name, get_max_memory_mb,
                             get_peak_flops, synchronize)
from nanochat.gpt import build_gpt, config_for_depth
from nanochat.optim import MuonAdamW

parser = argparse.ArgumentParser(description="Benchmark GPT forward+backward and the optimizer step")
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--aspect-ratio", type=int, default=64)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--vocab-size", type=int, default=8192)
parser.add_argument("--seq", type=int, default=512, help="sequence length")
parser.add_argument("--batch", type=int, default=8, help="sequences per forward+backward")
parser.add_argument("--window-pattern", type=str, default="L")
parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--compile", type=int, default=-1, help="torch.compile model and optimizer: 1/0, -1 = the machine's choice")
parser.add_argument("--orth-dtype", type=str, default="", choices=["", *DTYPES], help="Muon orthogonalization dtype (default: the machine's)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
args = parser.parse_args()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
choice = compute_choice(device_type)
compile = choice.compile if args.compile == -1 else bool(args.compile)
orth_dtype = DTYPES[args.orth_dtype] if args.orth_dtype else choice.orth_dtype
print(f"compute {choice.dtype}, orthogonalization {orth_dtype}, compile {compile} "
      f"(machine's choice: {choice.dtype}/{choice.orth_dtype}/compile {choice.compile}, because {choice.reason}); "
      f"{torch.get_num_threads()} threads")

config = config_for_depth(args.depth, args.vocab_size, args.seq, args.aspect_ratio, args.head_dim, args.window_pattern)
torch.manual_seed(0)
model = build_gpt(config, device)
optimizer = MuonAdamW(model.setup_optimizer().param_groups, orth_dtype=orth_dtype, compile=compile)
train_model = torch.compile(model, dynamic=False) if compile else model
flops_per_token = model.estimate_flops()
print(f"d{args.depth}: width {config.n_embd}, {config.n_head} heads, {model.num_scaling_params()['total']:,} params, "
      f"{flops_per_token / 1e6:.1f} MFLOP/token, window pattern {args.window_pattern}, device {get_device_name(device_type)}")

inputs = torch.randint(0, args.vocab_size, (args.batch, args.seq), device=device)
targets = torch.randint(0, args.vocab_size, (args.batch, args.seq), device=device)
fwdbwd_times, optim_times = [], []
for step in range(args.warmup + args.steps):
    synchronize(device_type)
    t0 = time.perf_counter()
    loss = train_model(inputs, targets)
    loss.backward()
    synchronize(device_type)
    t1 = time.perf_counter()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    synchronize(device_type)
    t2 = time.perf_counter()
    timed = step >= args.warmup
    print(f"step {step}{'' if timed else ' (warmup)'}: fwd+bwd {t1 - t0:.3f}s, optimizer {t2 - t1:.3f}s, loss {loss.item():.4f}")
    if timed:
        fwdbwd_times.append(t1 - t0)
        optim_times.append(t2 - t1)

fwdbwd = sorted(fwdbwd_times)[len(fwdbwd_times) // 2]  # median: robust to a noisy (shared) machine
optim = sorted(optim_times)[len(optim_times) // 2]
tokens = args.batch * args.seq
print(f"forward+backward: {tokens / fwdbwd:,.0f} tokens/s ({fwdbwd:.3f}s per {args.batch}x{args.seq} batch, "
      f"{flops_per_token * tokens / fwdbwd / 1e9:.1f} GFLOP/s)")
print(f"optimizer step: {optim:.3f}s")
print(f"training step: {tokens / (fwdbwd + optim):,.0f} tokens/s")
print(f"peak memory: {get_max_memory_mb(device_type):,.0f} MiB")
if device_type == "cuda":
    mfu = flops_per_token * tokens / fwdbwd / get_peak_flops(get_device_name(device_type))
    print(f"MFU (forward+backward): {100 * mfu:.1f}%")
