"""
Evaluate a chat model (sft or rl checkpoint) on the chat tasks and compute ChatCORE: the tasks,
how each is scored and the metric are in tasks/chatcore.py.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i sft -a ARC-Easy,GSM8K --max-problems 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft
"""

import time
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, positive
from nanochat.checkpoint_manager import find_checkpoint, load_model
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.run import add_checkpoint_flags
from tasks.chatcore import TASKS, evaluate_task, chatcore


CPU_MAX_PROBLEMS = 50  # a d4 model answers 50 generative problems in ~35-50 s on 2 AVX2 cores (dev/LOG.md)


def parse_task_names(spec):
    names = list(TASKS) if not spec else [name.strip() for name in spec.replace("|", ",").split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {unknown}: choose from {', '.join(TASKS)} (comma-separated, or omit -a for all)")
    return names


def main():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee")
    add_checkpoint_flags(parser, None, ["sft", "rl"], required=True)
    parser.add_argument("-a", "--task-name", type=str, default="", help=f"comma-separated subset of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--max-problems", type=positive(int), default=None, help=f"evaluate the first N problems of each "
                        f"task (default: all on a GPU, {CPU_MAX_PROBLEMS} elsewhere, where all of them take hours)")
    parser.add_argument("-b", "--batch-size", type=positive(int), default=8, help="problems per forward in categorical tasks")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("-n", "--num-samples", type=positive(int), default=1, help="completions per generative problem (pass@n)")
    parser.add_argument("-m", "--max-new-tokens", type=positive(int), default=512, help="longest answer, in tokens")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    args = parser.parse_args()
    task_names = parse_task_names(args.task_name)

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    max_problems = args.max_problems or (None if device.type == "cuda" else CPU_MAX_PROBLEMS)
    _, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag, step)
    engine = Engine(model, tokenizer)

    accuracies = {}
    for name in task_names:
        t0 = time.time()
        num_correct, num_evaluated = evaluate_task(TASKS[name][0](), tokenizer, model, engine, max_problems,
                                                   args.batch_size, args.num_samples, args.max_new_tokens,
                                                   args.temperature, args.top_k)
        accuracies[name] = num_correct / max(num_evaluated, 1)
        print0(f"{name}: {num_correct}/{num_evaluated} = {100 * accuracies[name]:.2f}% ({time.time() - t0:.1f}s)")

    label, value = chatcore(accuracies, subset=f"first {max_problems} problems per task" if max_problems else "")
    print0(f"{label}: {value:.4f}")
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        vars(args),
        {"model_tag": model_tag, "step": step, "Problems per task": max_problems or "all"},
        {**accuracies, label: value},
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
