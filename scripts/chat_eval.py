"""
Evaluate a chat model (mid, sft or rl checkpoint) on the chat tasks and compute ChatCORE.

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are multiple choice: the model reads the question
primed for its answer, and the answer letter whose token has the largest logit at the last prompt
position is its choice (no sampling, so batches of problems share one forward). Generative tasks
(GSM8K, HumanEval, SpellingBee) sample a completion with the Engine and let the task judge it.

ChatCORE = mean over tasks of (accuracy - random baseline) / (1 - random baseline): 0 is chance, 1 is
perfect, comparable across tasks with different numbers of choices.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a ARC-Easy,GSM8K --max-problems 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft
"""

import os
import time
import argparse

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, print0, get_dist_info, get_base_dir
from nanochat.checkpoint_manager import load_model, find_largest_model, STAGE_DIRS
from nanochat.engine import Engine
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spellingbee import SpellingBee

# task name -> (constructor, random-guess accuracy). 4-choice questions are guessed right 1 time in 4;
# a generative answer is never right by chance.
TASKS = {
    "ARC-Easy": (lambda: ARC(subset="ARC-Easy", split="test"), 0.25),
    "ARC-Challenge": (lambda: ARC(subset="ARC-Challenge", split="test"), 0.25),
    "MMLU": (lambda: MMLU(subset="all", split="test"), 0.25),
    "GSM8K": (lambda: GSM8K(subset="main", split="test"), 0.0),
    "HumanEval": (lambda: HumanEval(), 0.0),
    "SpellingBee": (lambda: SpellingBee(size=256, split="test"), 0.0),
}


def my_problem_indices(num_problems, max_problems):
    """Rank r of W evaluates problems r, r+W, r+2W, ... of the first max_problems."""
    _, rank, _, world_size = get_dist_info()
    if max_problems is not None:
        num_problems = min(num_problems, max_problems)
    return range(rank, num_problems, world_size)


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None):
    """-> (num_correct, num_evaluated) on this rank. Prompts of a batch are right-padded: with causal
    attention the logits at a prompt's last position never see the padding after it."""
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    num_correct, num_evaluated = 0, 0
    indices = list(my_problem_indices(len(task), max_problems))
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = [letter_token_id(tokenizer, letter) for letter in letters]
            letter_logits = logits[row, len(prompt) - 1, letter_ids]
            predicted = letters[letter_logits.argmax().item()]
            num_correct += int(task.evaluate(conversation, predicted))
            num_evaluated += 1
    return num_correct, num_evaluated


def letter_token_id(tokenizer, letter):
    ids = tokenizer.encode(letter)
    assert len(ids) == 1, f"answer letter {letter!r} must be a single token, got {ids}"
    return ids[0]


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None):
    """-> (num_correct, num_evaluated) on this rank. A problem counts as solved when any of its
    num_samples completions is judged correct (pass@num_samples). A prompt that fills the model's
    whole context leaves no room for an answer: it counts as unsolved."""
    num_correct, num_evaluated = 0, 0
    for i in my_problem_indices(len(task), max_problems):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        num_evaluated += 1
        if len(prompt) >= engine.model.config.sequence_len:
            continue
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        completions = [tokenizer.decode(row[len(prompt):]) for row in results]
        num_correct += int(any(task.evaluate(conversation, c) for c in completions))
    return num_correct, num_evaluated


def all_reduce_counts(num_correct, num_evaluated, device):
    if not (dist.is_available() and dist.is_initialized()):
        return num_correct, num_evaluated
    counts = torch.tensor([num_correct, num_evaluated], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts[0].item(), counts[1].item()


def chatcore(accuracies):
    """-> (label, value): the mean of baseline-centered accuracies; the label says how many of the
    six tasks it covers so a partial score is never mistaken for the full one."""
    centered = [(acc - TASKS[name][1]) / (1.0 - TASKS[name][1]) for name, acc in accuracies.items()]
    label = "ChatCORE" if len(accuracies) == len(TASKS) else f"ChatCORE ({len(accuracies)}/{len(TASKS)} tasks)"
    return label, sum(centered) / len(centered)


def parse_task_names(spec):
    names = list(TASKS) if not spec else [name.strip() for name in spec.replace("|", ",").split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {unknown}: choose from {', '.join(TASKS)} (comma-separated, or omit -a for all)")
    return names


def main():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["mid", "sft", "rl"],
                        help="which checkpoint stage to evaluate")
    parser.add_argument("-a", "--task-name", type=str, default="", help=f"comma-separated subset of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward in categorical tasks")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="completions per generative problem (pass@n)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty: autodetect)")
    args = parser.parse_args()
    task_names = parse_task_names(args.task_name)

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), STAGE_DIRS[args.source]))
    engine = Engine(model, tokenizer)

    accuracies = {}
    for name in task_names:
        t0 = time.time()
        task = TASKS[name][0]()
        if task.eval_type == "categorical":
            counts = run_categorical_eval(task, tokenizer, model, args.batch_size, args.max_problems)
        else:
            counts = run_generative_eval(task, tokenizer, engine, args.num_samples, args.max_new_tokens,
                                         args.temperature, args.top_k, args.max_problems)
        num_correct, num_evaluated = all_reduce_counts(*counts, device)
        accuracies[name] = num_correct / max(num_evaluated, 1)
        print0(f"{name}: {num_correct}/{num_evaluated} = {100 * accuracies[name]:.2f}% ({time.time() - t0:.1f}s)")

    label, value = chatcore(accuracies)
    print0(f"{label}: {value:.4f}")
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        vars(args),
        {"model_tag": model_tag, "step": meta["step"]},
        {**accuracies, label: value},
    ])
    compute_cleanup()


if __name__ == "__main__":
    main()
