"""
ChatCORE: the six chat evaluation tasks, how a chat model is scored on each, and the combined metric.
scripts/chat_eval.py reports it after training; chat_sft tracks a capped version while it trains.

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are multiple choice: the model reads the question
primed for its answer, and the answer letter whose token has the largest logit at the last prompt
position is its choice (no sampling, so batches of problems share one forward). Generative tasks
(GSM8K, HumanEval, SpellingBee) sample a completion with the Engine and let the task judge it.

ChatCORE = mean over tasks of (accuracy - random baseline) / (1 - random baseline): 0 is chance, 1 is
perfect, comparable across tasks with different numbers of choices.
"""

import torch

from nanochat.common import all_reduce_sum, get_dist_info, progress_bar
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
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, progress=None):
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
        if progress is not None:
            progress.update(len(conversations))
    return num_correct, num_evaluated


def letter_token_id(tokenizer, letter):
    ids = tokenizer.encode(letter)
    assert len(ids) == 1, f"answer letter {letter!r} must be a single token, got {ids}"
    return ids[0]


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, progress=None):
    """-> (num_correct, num_evaluated) on this rank. A problem counts as solved when any of its
    num_samples completions is judged correct (pass@num_samples). A prompt that fills the model's
    whole context leaves no room for an answer: it counts as unsolved."""
    num_correct, num_evaluated = 0, 0
    for i in my_problem_indices(len(task), max_problems):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        num_evaluated += 1
        if progress is not None:
            progress.update(1)
        if len(prompt) >= engine.model.config.sequence_len:
            continue
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        completions = [tokenizer.decode(row[len(prompt):]) for row in results]
        num_correct += int(any(task.evaluate(conversation, c) for c in completions))
    return num_correct, num_evaluated


def evaluate_task(task, tokenizer, model, engine, max_problems=None, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50):
    """-> (num_correct, num_evaluated) over all ranks, the task scored by its eval_type (a progress bar on rank 0)."""
    bar = progress_bar(len(my_problem_indices(len(task), max_problems)), type(task).__name__)
    if task.eval_type == "categorical":
        counts = run_categorical_eval(task, tokenizer, model, batch_size, max_problems, bar)
    else:
        counts = run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                     max_problems, bar)
    bar.close()
    num_correct, num_evaluated = all_reduce_sum(list(counts), model.get_device())
    return int(num_correct), int(num_evaluated)


def chatcore(accuracies, subset=""):
    """-> (label, value): the mean of baseline-centered accuracies. The label says how many of the six tasks it
    covers and, with subset (e.g. "first 50 problems per task"), on how much of each, so a partial score is never
    mistaken for the full one: e.g. "ChatCORE (3/6 tasks; first 50 problems per task)"."""
    centered = [(acc - TASKS[name][1]) / (1.0 - TASKS[name][1]) for name, acc in accuracies.items()]
    notes = ([] if len(accuracies) == len(TASKS) else [f"{len(accuracies)}/{len(TASKS)} tasks"]) + ([subset] if subset else [])
    label = "ChatCORE" + (f" ({'; '.join(notes)})" if notes else "")
    return label, sum(centered) / len(centered)
