"""
Inference speed of the Engine (KV cache), one JSON line per configuration: every batch size x prompt length x
decode step (eager, or compiled with --modes eager,compiled), each generating --new-tokens tokens per row.

    python -m dev.bench_engine --depth 4                                  # a random d4 model (the runcpu.sh size)
    python -m dev.bench_engine -i sft [-g TAG] [-s STEP]                  # a trained checkpoint
    python -m dev.bench_engine --depth 20 --max-seq-len 2048 --batch-sizes 1,32 --prompt-lens 64,1024 \\
        --modes eager,compiled                                            # GPU: d20

Each line: time to first token (the Engine's batch-1 prefill, its copy into every row, the first sample) and
prefill tokens/s (prompt tokens / TTFT); decode tokens/s over the remaining steps (all rows) and ms per step;
model-bandwidth utilisation (MBU) of decode: the bytes a step must read (every matmul weight once, as stored,
plus each row's cached keys and values inside each layer's window) per second, over the device's peak bandwidth;
peak memory. With batch 1 in eager mode, a line for the naive GPT.generate (the whole sequence re-run for every
token) and the Engine's speedup over it (the target: >= 3x at 256 new tokens on CPU).

Peak bandwidth: --peak-bandwidth GB/s if given; else the datasheet figure of a known GPU (PEAK_BANDWIDTH_GBS);
else measured here by copying a 256 MiB tensor (read + write), which is what the line's bandwidth_source says.
The stored weights are fp32 masters that every matmul casts to the compute dtype, so the real traffic of a bf16
step is above the bytes counted: MBU is a lower bound of the memory system's use, an upper bound of room left.
"""

import argparse
import json
import math
import sys
import time

import torch

from nanochat.common import autodetect_device_type, get_compute_dtype, get_max_memory_mb, synchronize
from nanochat.engine import Engine

# Datasheet memory bandwidth (GB/s), matched in order against torch.cuda.get_device_name()
PEAK_BANDWIDTH_GBS = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300),
    ("A10G", 600), ("A10", 600), ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]


class NoTokenizer:
    """The Engine only needs the special ids from a tokenizer to sample; put them past the vocab so a
    random model never stops early or triggers the calculator."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode_special(self, name):
        return self.vocab_size + 1

    def get_bos_token_id(self):
        return self.vocab_size + 1


def random_model(depth, head_dim, vocab_size, sequence_len, device):
    """A model sized as base_train sizes it."""
    from nanochat.gpt import build_gpt, config_for_depth
    return build_gpt(config_for_depth(depth, vocab_size, sequence_len, head_dim=head_dim), device).eval()


def peak_bandwidth(device, override):
    """-> (GB/s, where the figure comes from)."""
    if override:
        return override, "flag --peak-bandwidth"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in PEAK_BANDWIDTH_GBS:
            if key in name:
                return gbs, f"datasheet ({name})"
    size = 256 * 2**20
    src, dst = torch.empty(size, dtype=torch.uint8, device=device), torch.empty(size, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(5):
        synchronize(device.type)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device.type)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best / 1e9, "measured (copy of a 256 MiB tensor, read + write; no datasheet figure here)"


def weight_bytes(model):
    """Bytes of every matmul weight as stored (read once per step); embeddings are lookups of a few rows."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def kv_bytes_read(model, cache_dtype, batch_size, prompt_len, new_tokens):
    """Bytes of cached keys and values the decode steps read in all: a step at length L reads min(L, window + 1)
    positions of every layer (the new token's own included), for every row."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    per_position = 2 * config.n_kv_head * head_dim * torch.tensor([], dtype=cache_dtype).element_size()
    lengths = range(prompt_len + 1, prompt_len + new_tokens)  # the decode steps after the first token
    positions = sum(min(length, (left if left >= 0 else length) + 1) for length in lengths
                    for left, _ in model.window_sizes)
    return batch_size * positions * per_position


def timed_generation(engine, prompt, batch_size, new_tokens, device_type):
    """-> (seconds to the first token, seconds of the decode steps after it)."""
    synchronize(device_type)
    start = time.perf_counter()
    stamps = []
    for _ in engine.generate(prompt, num_samples=batch_size, max_tokens=new_tokens, temperature=1.0):
        stamps.append(time.perf_counter())  # (sampling copies the tokens to the host: the step is done)
    assert len(stamps) == new_tokens, "the Engine stopped early"
    return stamps[0] - start, stamps[-1] - stamps[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("-i", "--source", type=str, default="", help="base|sft|rl: benchmark a checkpoint instead")
    parser.add_argument("-g", "--model-tag", type=str, default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--prompt-lens", type=str, default="64", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=str, default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--modes", type=str, default="eager", help="eager,compiled: the decode step's modes")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--peak-bandwidth", type=float, default=0.0, help="GB/s for MBU (default: datasheet/measured)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive generate comparison")
    parser.add_argument("--device-type", type=str, default="")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
    modes = args.modes.split(",")
    if set(modes) - {"eager", "compiled"}:
        parser.error(f"--modes takes eager and/or compiled, got {args.modes}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (a first token, then decode steps)")

    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    if args.source:
        from nanochat.checkpoint_manager import load_model
        model, *_ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    else:
        model = random_model(args.depth, args.head_dim, args.vocab_size, args.max_seq_len, device)
    config = model.config
    if max(prompt_lens) + args.new_tokens > config.sequence_len:
        parser.error(f"the longest prompt + --new-tokens must fit the model's context ({config.sequence_len})")
    dtype = get_compute_dtype(device_type)
    bandwidth_gbs, bandwidth_source = peak_bandwidth(device, args.peak_bandwidth)
    common = {"device": torch.cuda.get_device_name(device) if device_type == "cuda" else
              f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)",
              "dtype": str(dtype).removeprefix("torch."), "model": args.source or "random",
              "n_layer": config.n_layer, "n_embd": config.n_embd, "params": sum(p.numel() for p in model.parameters()),
              "new_tokens": args.new_tokens}
    memory_kind = "cuda max allocated in this configuration" if device_type == "cuda" else \
        "process peak RSS so far (never resets)"

    def best_generation(engine, prompt, batch_size):
        return min((timed_generation(engine, prompt, batch_size, args.new_tokens, device_type)
                    for _ in range(args.repeats)), key=sum)

    for mode in modes:
        engine = Engine(model, NoTokenizer(config.vocab_size), compile=mode == "compiled")
        for prompt_len in prompt_lens:
            prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
            engine_batch1_s = None
            for batch_size in batch_sizes:
                if device_type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                warmup_s = sum(timed_generation(engine, prompt, batch_size, min(8, args.new_tokens), device_type))
                ttft_s, decode_s = best_generation(engine, prompt, batch_size)
                steps = args.new_tokens - 1
                step_bytes = weight_bytes(model) + kv_bytes_read(model, engine.dtype, batch_size, prompt_len,
                                                                 args.new_tokens) / steps
                achieved_gbs = step_bytes * steps / decode_s / 1e9
                line = {**common, "mode": mode, "batch_size": batch_size, "prompt_len": prompt_len,
                        "ttft_ms": round(ttft_s * 1000, 2), "prefill_tok_s": round(prompt_len / ttft_s, 1),
                        "decode_tok_s": round(batch_size * steps / decode_s, 1),
                        "decode_ms_per_step": round(decode_s / steps * 1000, 3),
                        "decode_bytes_per_step": int(step_bytes), "decode_gb_s": round(achieved_gbs, 2),
                        "peak_bandwidth_gb_s": round(bandwidth_gbs, 1), "bandwidth_source": bandwidth_source,
                        "mbu": round(achieved_gbs / bandwidth_gbs, 4),
                        "peak_memory_mb": round(get_max_memory_mb(device_type), 1), "memory": memory_kind}
                if mode == "compiled":
                    line["first_generation_s"] = round(warmup_s, 2)  # compiling the decode step
                print(json.dumps(line), flush=True)
                if batch_size == 1:
                    engine_batch1_s = ttft_s + decode_s
            if mode == "eager" and engine_batch1_s is not None and not args.no_naive:
                naive_s = min(timed_naive(model, prompt, args.new_tokens, device_type) for _ in range(args.repeats))
                print(json.dumps({**common, "mode": "naive GPT.generate", "batch_size": 1, "prompt_len": prompt_len,
                                  "tok_s": round(args.new_tokens / naive_s, 1),
                                  "engine_speedup": round(naive_s / engine_batch1_s, 2)}), flush=True)
    print(f"{len(modes) * len(prompt_lens) * len(batch_sizes)} configurations, {common['device']}", file=sys.stderr)


def timed_naive(model, prompt, new_tokens, device_type):
    synchronize(device_type)
    start = time.perf_counter()
    for _ in model.generate(prompt, max_tokens=new_tokens, temperature=1.0):
        pass
    synchronize(device_type)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
