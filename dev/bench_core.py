"""
Time CORE on the local eval bundle: the simple path (one forward per example, as the reference does)
against the batched path, on the same examples and few-shot draws. The two must decide every example
the same way; the script fails loudly if any task's accuracy differs.

    NANOCHAT_DATA_DIR=../shared/data python -m dev.bench_core --max-per-task=20          # random d4 model
    NANOCHAT_DATA_DIR=../shared/data python -m dev.bench_core --source=base --max-per-task=20

Without --source it builds the CPU demo's d4 configuration (depth 4, head_dim 64, seq 512, window L)
with random weights, and a tokenizer of --vocab-size trained on the train shards (NANOCHAT_DATA=embedded
works too: the embedded sample holds the same first rows of each task, see data/SOURCES.md).
"""

import argparse
import os
import time

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import centered_accuracy, evaluate_task, get_eval_bundle_dir, load_core_tasks, load_task_data
from nanochat.dataset import parquets_iter_batched
from nanochat.gpt import GPTConfig, build_gpt
from nanochat.tokenizer import RustBPETokenizer

parser = argparse.ArgumentParser(description="CORE: batched vs one-forward-per-example timing")
parser.add_argument("--source", type=str, default="", help="base|sft|rl checkpoint (default: random d4 model)")
parser.add_argument("--max-per-task", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer for the random model")
parser.add_argument("--tokenizer-chars", type=int, default=5_000_000, help="chars of local text to train it on")
parser.add_argument("--tasks", type=str, default="", help="comma-separated task labels (default: all present)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 is steadier on a busy machine")
args = parser.parse_args()
torch.manual_seed(0)
if args.threads > 0:
    torch.set_num_threads(args.threads)


def random_d4_model(tokenizer):
    config = GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=4,
                       n_embd=256, window_pattern="L")
    model = build_gpt(config, "cpu")
    with torch.no_grad():  # init leaves the output projections at zero: perturb them so context matters
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    return model.eval()


def local_texts(max_chars):
    total = 0
    for texts in parquets_iter_batched("train"):
        for text in texts:
            if total >= max_chars:
                return
            total += len(text)
            yield text


if args.source:
    model, tokenizer, *_ = load_model(args.source, "cpu", phase="eval")
else:
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(local_texts(args.tokenizer_chars), args.vocab_size)
    print(f"Trained a {tokenizer.get_vocab_size()}-token tokenizer in {time.time() - t0:.0f}s")
    model = random_d4_model(tokenizer)

tasks = [t for t in load_core_tasks(get_eval_bundle_dir()) if os.path.exists(t["path"])]
if args.tasks:
    tasks = [t for t in tasks if t["label"] in args.tasks.split(",")]
print(f"torch threads: {torch.get_num_threads()}, {len(tasks)} tasks x {args.max_per_task} examples")
print(f"{'task':<34} {'per-example':>12} {'batched':>9} {'speedup':>8}   accuracy")
totals = {"per_example": 0.0, "batched": 0.0}
centered = {"per_example": [], "batched": []}
for task in tasks:
    data = load_task_data(task["path"], args.max_per_task)
    timings, accuracies = {}, {}
    for mode in ("per_example", "batched"):
        t0 = time.time()
        accuracies[mode] = evaluate_task(model, tokenizer, data, "cpu", task, batch_size=args.batch_size,
                                         per_example=mode == "per_example")
        timings[mode] = time.time() - t0
        totals[mode] += timings[mode]
        centered[mode].append(centered_accuracy(accuracies[mode], task["random_baseline"]))
    print(f"{task['label']:<34} {timings['per_example']:>11.1f}s {timings['batched']:>8.1f}s "
          f"{timings['per_example'] / timings['batched']:>7.1f}x   {accuracies['per_example']:.4f} {accuracies['batched']:.4f}")
    if accuracies["per_example"] != accuracies["batched"]:
        raise SystemExit(f"MISMATCH on {task['label']}: the batched path decided differently")
scores = {mode: sum(values) / len(values) for mode, values in centered.items()}
print(f"total: per-example {totals['per_example']:.1f}s, batched {totals['batched']:.1f}s, "
      f"speedup {totals['per_example'] / totals['batched']:.2f}x")
print(f"CORE over these tasks: per-example {scores['per_example']:.4f}, batched {scores['batched']:.4f}")
