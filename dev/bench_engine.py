"""
Inference speed: Engine (KV cache) prefill and decode throughput at a few batch sizes, against the
naive GPT.generate that re-runs the whole sequence for every token (the target: >= 3x at 256 new
tokens on CPU).

    python -m dev.bench_engine --depth 4                    # a random d4 model (the runcpu.sh size)
    python -m dev.bench_engine -i sft                       # a trained checkpoint
    python -m dev.bench_engine --depth 20 --max-seq-len 2048 --batch-sizes 1,32 --compile   # GPU: d20 decode
"""

import argparse
import time

import torch

from nanochat.common import autodetect_device_type, synchronize
from nanochat.engine import Engine


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


def timed(fn, device_type):
    synchronize(device_type)
    start = time.perf_counter()
    result = fn()
    synchronize(device_type)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("-i", "--source", type=str, default="", help="base|sft|rl: benchmark a checkpoint instead")
    parser.add_argument("-g", "--model-tag", type=str, default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--batch-sizes", type=str, default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (Engine(compile=True))")
    parser.add_argument("--device-type", type=str, default="")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    if args.source:
        from nanochat.checkpoint_manager import load_model
        model, *_ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    else:
        model = random_model(args.depth, args.head_dim, args.vocab_size, args.max_seq_len, device)
    config = model.config
    if args.prompt_len + args.new_tokens > config.sequence_len:
        parser.error(f"--prompt-len + --new-tokens must fit the model's context ({config.sequence_len})")
    engine = Engine(model, NoTokenizer(config.vocab_size), compile=args.compile)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model: {config.n_layer} layers, width {config.n_embd}, vocab {config.vocab_size}; device {device_type}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens; "
          f"decode step {'compiled' if args.compile else 'eager'}")

    def best(fn):
        return min(timed(fn, device_type)[0] for _ in range(args.repeats))

    def run_engine(batch_size, max_tokens):
        return sum(1 for _ in engine.generate(prompt, num_samples=batch_size, max_tokens=max_tokens, temperature=1.0))

    for batch_size in batch_sizes:  # warm-up: allocator and kernel setup, and compiling the decode step
        compile_s, _ = timed(lambda: run_engine(batch_size, 8), device_type)
        if args.compile:
            print(f"compile   batch {batch_size}: {compile_s:.1f} s (first generation)")
    prefill_s = best(lambda: run_engine(1, 1))  # one step = the prefill forward (+ one sample)
    print(f"prefill   batch 1: {args.prompt_len / prefill_s:10.0f} tokens/s ({prefill_s * 1000:.1f} ms)")
    engine_s = {}
    for batch_size in batch_sizes:
        engine_s[batch_size] = best(lambda: run_engine(batch_size, args.new_tokens))
        decode_s = engine_s[batch_size] - prefill_s
        print(f"decode    batch {batch_size}: {batch_size * (args.new_tokens - 1) / decode_s:10.0f} tokens/s, "
              f"{decode_s / (args.new_tokens - 1) * 1000:.2f} ms/step (whole generation {engine_s[batch_size]:.2f} s)")
    if 1 in engine_s:
        naive_s = best(lambda: list(model.generate(prompt, max_tokens=args.new_tokens, temperature=1.0)))
        print(f"naive     batch 1: {args.new_tokens / naive_s:10.0f} tokens/s (whole generation {naive_s:.2f} s)")
        print(f"Engine vs naive generate at {args.new_tokens} new tokens, batch 1: {naive_s / engine_s[1]:.1f}x faster")


if __name__ == "__main__":
    main()
