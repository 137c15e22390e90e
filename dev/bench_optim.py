"""
Time one MuonAdamW step for the parameters of a GPT of a given --depth, for each orthogonalization
dtype (fp32, bf16) and with/without torch.compile, on the current device, and print which of them the
machine's rule (common.compute_choice) picks and why. Shapes are built by hand (the same groups
GPT.setup_optimizer makes), so this runs without the model code.

    python -m dev.bench_optim --depth 4 --head-dim 64 --vocab-size 8192
    python -m dev.bench_optim --depth 20            # GPU
"""

import argparse
import time

import torch

from nanochat.common import autodetect_device_type, compute_choice, synchronize
from nanochat.gpt import config_for_depth
from nanochat.optim import MuonAdamW

parser = argparse.ArgumentParser(description="Benchmark one optimizer step")
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--aspect-ratio", type=int, default=64)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--vocab-size", type=int, default=8192)
parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warmup step)")
parser.add_argument("--dtypes", type=str, default="fp32,bf16", help="orthogonalization dtypes to try")
parser.add_argument("--compile", type=str, default="0,1", help="compile settings to try (0, 1 or both)")
parser.add_argument("--device-type", type=str, default="")
args = parser.parse_args()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
config = config_for_depth(args.depth, args.vocab_size, 1, args.aspect_ratio, args.head_dim)  # (sequence_len unused)
n_embd, n_head = config.n_embd, config.n_head
vocab = -(-args.vocab_size // 64) * 64
choice = compute_choice(device_type)
embed_dtype = choice.dtype  # as GPT stores wte/value embeds


def gpt_like_groups():
    """Fresh parameters (with random grads) grouped as GPT.setup_optimizer does."""
    def param(*shape, dtype=torch.float32):
        p = torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        return p

    matrices = []
    for i in range(args.depth):
        matrices += [param(n_embd, n_embd) for _ in range(4)]  # c_q, c_k, c_v, attn c_proj
        matrices += [param(4 * n_embd, n_embd), param(n_embd, 4 * n_embd)]  # mlp c_fc, c_proj
        if i % 2 == (args.depth - 1) % 2:
            matrices.append(param(n_head, 32))  # ve_gate
    value_embeds = [param(vocab, n_embd, dtype=embed_dtype) for i in range(args.depth) if i % 2 == (args.depth - 1) % 2]
    scale = (n_embd / 768) ** -0.5
    adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, params=[param(vocab, n_embd)], lr=0.004 * scale),  # lm_head
        dict(adamw, params=[param(vocab, n_embd, dtype=embed_dtype)], lr=0.3 * scale),  # wte
        dict(adamw, params=value_embeds, lr=0.3 * scale),
        dict(adamw, params=[param(args.depth)], lr=0.005),  # resid_lambdas
        dict(adamw, params=[param(args.depth)], lr=0.5, betas=(0.96, 0.95)),  # x0_lambdas
    ]
    for shape in sorted({tuple(m.shape) for m in matrices}):
        same = [m for m in matrices if tuple(m.shape) == shape]
        groups.append(dict(kind="muon", params=same, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.2))
    return groups


def timed_step(optimizer):
    synchronize(device_type)
    t0 = time.perf_counter()
    optimizer.step()
    synchronize(device_type)
    return time.perf_counter() - t0


print(f"device {device_type}, depth {args.depth}: n_embd {n_embd}, vocab {vocab}, threads {torch.get_num_threads()}")
print(f"machine's choice: orthogonalization {choice.orth_dtype}, compile {choice.compile}, because {choice.reason}")
for dtype_name in args.dtypes.split(","):
    orth_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    for compile in [bool(int(c)) for c in args.compile.split(",")]:
        optimizer = MuonAdamW(gpt_like_groups(), orth_dtype=orth_dtype, compile=compile)
        first = timed_step(optimizer)  # includes compilation when compiled
        times = sorted(timed_step(optimizer) for _ in range(args.steps))
        print(f"orth {dtype_name} compile={int(compile)}: first step {first:7.3f} s, "
              f"then median {times[len(times) // 2] * 1e3:8.1f} ms (min {times[0] * 1e3:.1f} ms over {args.steps})", flush=True)
