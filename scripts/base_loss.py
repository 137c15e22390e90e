"""
Bits per byte of a trained model on the train and val splits, plus a few samples to eyeball.

    python -m scripts.base_loss --device-batch-size=8 --split-tokens=131072
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss

Writes the "Base model loss" report section.
"""

import argparse

from nanochat.checkpoint_manager import STAGE_DIRS, find_checkpoint, load_model
from nanochat.common import compute_cleanup, compute_init, print0, print_banner, positive
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.device_batch import auto_device_batch_size
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.run import add_checkpoint_flags
from nanochat.tokenizer import get_token_bytes

GPU_SPLIT_TOKENS, CPU_SPLIT_TOKENS = 40 * 524288, 2**16

parser = argparse.ArgumentParser(description="bpb on train/val and samples of a trained model")
add_checkpoint_flags(parser, "base", sorted(STAGE_DIRS))
parser.add_argument("--split-tokens", type=positive(int), default=None,
                    help=f"tokens evaluated per split (default: {GPU_SPLIT_TOKENS:,} on a GPU, {CPU_SPLIT_TOKENS:,} "
                    "elsewhere: ~15 s per split for a d4 model on 2 AVX2 cores in fp32)")
parser.add_argument("--device-batch-size", type=int, default=-1,
                    help="rows per forward pass (-1 = the largest that fits: found by trying on a GPU, 32 elsewhere)")
parser.add_argument("--num-samples", type=int, default=8, help="unconditioned samples to print")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
args = parser.parse_args()
if args.device_batch_size == 0 or args.device_batch_size < -1:
    parser.error(f"--device-batch-size must be a number of rows or -1 (the largest that fits), got {args.device_batch_size}")

print_banner()
ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
_, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
model, tokenizer, meta = load_model(args.source, device, "eval", model_tag, step)
token_bytes = get_token_bytes(device=device)
seq_len = model.config.sequence_len

# bpb on each split: the same number of tokens, read by all ranks in parallel
# any batch works for an evaluation: the largest power of two up to 128 rows that fits a forward
device_batch_size = args.device_batch_size if args.device_batch_size > 0 else auto_device_batch_size(model, seq_len, 128, train=False)
tokens_per_step = device_batch_size * seq_len * world_size
split_tokens = args.split_tokens or (GPU_SPLIT_TOKENS if device.type == "cuda" else CPU_SPLIT_TOKENS)
steps = max(1, split_tokens // tokens_per_step)
bpb_results = {}
for split in ("train", "val"):
    batches = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, device_batch_size, seq_len, split, device=device)
    bpb_results[split] = evaluate_bpb(model, batches, steps, token_bytes)
    print0(f"{split} bpb: {bpb_results[split]:.4f} ({steps * tokens_per_step:,} tokens)")

# Samples (rank 0): greedy completions of prompts with known answers, then free-running samples from BOS
samples = []
if rank == 0:
    engine = Engine(model, tokenizer)
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
               "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
               "If 5*x + 3 = 13, then x is"]
    print0("Prompted samples (greedy):")
    for prompt in prompts:
        results, _ = engine.generate_batch(tokenizer(prompt, prepend="<|bos|>"), max_tokens=16, temperature=0)
        samples.append(tokenizer.decode(results[0][1:]))
        print0(f"  {samples[-1]!r}")
    print0("Unconditioned samples (temperature 1.0):")
    results, _ = engine.generate_batch([tokenizer.get_bos_token_id()], num_samples=args.num_samples,
                                       max_tokens=128, temperature=1.0)
    for tokens in results:
        samples.append(tokenizer.decode(tokens[1:]))
        print0(f"  {samples[-1]!r}")

get_report().log(section="Base model loss", data=[
    {"Source": args.source, "Step": step, "Tokens per split": steps * tokens_per_step,
     "train bpb": bpb_results["train"], "val bpb": bpb_results["val"]},
    "Samples:\n" + "\n".join(f"- {sample!r}" for sample in samples),
])
compute_cleanup()
