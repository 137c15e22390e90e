"""
The DCLM CORE metric: a base model's accuracy on 22 in-context-learning tasks, each centered by its
random-guess baseline and averaged (Li et al. 2024, "DataComp-LM", https://arxiv.org/abs/2406.11794; the
tasks and their few-shot counts are its eval bundle's core.yaml).

Three task types, all scored from the model's next-token losses, never by sampling:
- multiple_choice: one prompt per choice ("query + delimiter + choice"); the choice whose tokens have
  the lowest mean loss wins.
- schema: one prompt per context option followed by a shared continuation; the option under which
  the continuation has the lowest mean loss wins.
- language_modeling: context + delimiter + continuation; right when every continuation token is the
  model's argmax prediction.
Few-shot examples (solved examples of the same task) precede each prompt, drawn with a fixed seed per
example so every run and every model sees the same prompts.

Speed: the simple path runs one forward per example (all its choices as rows), as the reference does
(batched: 4.2x faster with identical results, dev/LOG.md, "First measurements").
The batched path makes the same decisions for less work: rows of many examples share one padded
forward, rows with identical inputs (single-token choices like "A".."D") run once, and logits are
computed only where tokens are scored. On CPU, where time is FLOPs rather than kernel launches, the long
prefix that a multiple-choice example's prompts share also runs once, with the choices on top of its
KV cache.
"""

import csv
import functools
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zipfile
from functools import partial

import torch
import torch.nn.functional as F
import yaml
from filelock import FileLock

from nanochat.common import all_reduce_sum, get_base_dir, get_compute_dtype, get_dist_info, print0, progress_bar
from nanochat.datasource import DownloadError, download_once, find_data
from nanochat.kv_cache import KVCache

logger = logging.getLogger("nanochat")

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FEWSHOT_SEED = 1234  # the few-shot draw of example i uses random.Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337  # --max-per-task takes a fixed random subset (files are often sorted by category)


# ---------------------------------------------------------------------------------------------------
# Prompts

def fewshot_indices(num_examples, idx, num_fewshot):
    """Indices of the solved examples shown before example idx (never idx itself), fixed per idx."""
    rng = random.Random(FEWSHOT_SEED + idx)
    # sample from the other num_examples-1 positions without building their list (O(k), not O(N))
    draws = rng.sample(range(num_examples - 1), min(num_fewshot, num_examples - 1))
    return [i + 1 if i >= idx else i for i in draws]


def fewshot_text(shots):
    """Solved examples, each followed by a blank line (empty when zero-shot)."""
    return "".join(shot + "\n\n" for shot in shots)


def render_multiple_choice(item, delimiter, fewshot):
    """-> one prompt per choice."""
    prefix = fewshot_text(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item, delimiter, fewshot):
    """-> one prompt per context option, all ending in the same continuation."""
    prefix = fewshot_text(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}" for ex in fewshot)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_language_modeling(item, delimiter, fewshot):
    """-> (prompt without the continuation, full prompt)."""
    prefix = fewshot_text(f"{ex['context']}{delimiter}{ex['continuation']}" for ex in fewshot)
    context = f"{prefix}{item['context']}{delimiter}"
    # The delimiter's trailing space belongs to the continuation's first token (" Paris" is one token),
    # so the context alone is tokenized without it.
    return context.rstrip(), context + item["continuation"]


# ---------------------------------------------------------------------------------------------------
# Tokens: every prompt becomes a row of token ids; row[start:] is the continuation the model is scored on.

def common_prefix_length(rows):
    n = 0
    while all(len(row) > n and row[n] == rows[0][n] for row in rows):
        n += 1
    return n


def common_suffix_length(rows):
    return common_prefix_length([row[::-1] for row in rows])


def truncate_left(rows, starts, max_len):
    """
    Too long for the model: drop the same number of tokens right after BOS from every row, so the longest
    fits and rows that shared a prefix still do. The continuation is kept (unless it alone is too long).
    """
    crop = max(len(row) for row in rows) - max_len
    if crop <= 0:
        return rows, starts
    return [row[:1] + row[1 + crop:] for row in rows], [max(1, start - crop) for start in starts]


def prepare_example(tokenizer, data, idx, task_meta, max_len):
    """-> (rows, starts, gold) for data[idx]: token rows with BOS, continuation start per row, gold choice."""
    item = data[idx]
    task_type, delimiter = task_meta["task_type"], task_meta["continuation_delimiter"]
    fewshot = [data[i] for i in fewshot_indices(len(data), idx, task_meta["num_fewshot"])]
    bos = tokenizer.get_bos_token_id()
    if task_type == "multiple_choice":
        rows = tokenizer.encode(render_multiple_choice(item, delimiter, fewshot), prepend=bos)
        # The choices differ after a common prefix; at least one token per row is scored.
        start = min(common_prefix_length(rows), min(len(row) for row in rows) - 1)
        starts = [start] * len(rows)
    elif task_type == "schema":
        rows = tokenizer.encode(render_schema(item, delimiter, fewshot), prepend=bos)
        suffix = max(1, min(common_suffix_length(rows), min(len(row) for row in rows) - 1))
        starts = [len(row) - suffix for row in rows]
    elif task_type == "language_modeling":
        context, full = tokenizer.encode(list(render_language_modeling(item, delimiter, fewshot)), prepend=bos)
        rows = [full]
        starts = [min(common_prefix_length([context, full]), len(full) - 1)]
    else:
        raise ValueError(f"Unknown icl_task_type {task_type!r} (expected multiple_choice, schema or language_modeling)")
    rows, starts = truncate_left(rows, starts, max_len)
    return rows, starts, item.get("gold")


# ---------------------------------------------------------------------------------------------------
# Scoring rows. Row i is scored on its continuation row[start:]: position t's logits predict token t + 1.

def continuation_scores(logits, targets, lengths):
    """logits (N, V) predicting targets (N,), rows of `lengths` tokens -> (mean loss, all argmax right) per row."""
    targets = torch.tensor(targets, device=logits.device)
    token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
    hits = logits.argmax(dim=-1) == targets
    mean_losses = torch.stack([chunk.mean() for chunk in token_losses.split(lengths)])
    all_hits = torch.stack([chunk.all() for chunk in hits.split(lengths)])
    return mean_losses.tolist(), all_hits.tolist()


def padded(inputs, pad_id, device):
    """Right-pad token lists into one (B, T) tensor: causal attention, so padding never changes earlier positions."""
    batch = torch.full((len(inputs), max(len(ids) for ids in inputs)), pad_id, dtype=torch.long)
    for i, ids in enumerate(inputs):
        batch[i, :len(ids)] = torch.tensor(ids)
    return batch.to(device)


def scored_positions(rows, starts):
    """-> (row, predicting position, target token) of every scored token, and the number scored per row."""
    row_idx = [i for i, (row, start) in enumerate(zip(rows, starts)) for _ in range(start, len(row))]
    pos_idx = [t - 1 for row, start in zip(rows, starts) for t in range(start, len(row))]
    targets = [token for row, start in zip(rows, starts) for token in row[start:]]
    return row_idx, pos_idx, targets, [len(row) - start for row, start in zip(rows, starts)]


@torch.no_grad()
def forward_rows(model, rows, starts, pad_id, device):
    """The simple path: one forward of the rows (each without its last token, which predicts nothing)."""
    logits = model(padded([row[:-1] for row in rows], pad_id, device))
    row_idx, pos_idx, targets, lengths = scored_positions(rows, starts)
    return continuation_scores(logits[row_idx, pos_idx], targets, lengths)


@torch.no_grad()
def logits_at(model, inputs, row_idx, pos_idx, kv_cache=None):
    """
    model(inputs)[row_idx, pos_idx] as (N, V). CORE scores a few tokens per row: logits everywhere would cost
    vocab x width FLOPs per token (~40% of a d4 model's forward) and B x T x V floats.
    """
    positions = torch.tensor(row_idx, device=inputs.device), torch.tensor(pos_idx, device=inputs.device)
    return model(inputs, kv_cache=kv_cache, logit_positions=positions)


@torch.no_grad()
def forward_rows_packed(model, rows, starts, pad_id, device):
    """forward_rows for less: rows with the same input (the choices of a single-token multiple choice) run once."""
    input_index = {}
    for row in rows:
        input_index.setdefault(tuple(row[:-1]), len(input_index))
    row_idx, pos_idx, targets, lengths = scored_positions(rows, starts)
    row_idx = [input_index[tuple(rows[i][:-1])] for i in row_idx]
    logits = logits_at(model, padded(list(input_index), pad_id, device), row_idx, pos_idx)
    return continuation_scores(logits, targets, lengths)


@torch.no_grad()
def forward_shared_prefix(model, rows, start, pad_id, device):
    """
    Rows that share row[:start] (the choices of one multiple-choice example): run the prefix once, then only
    the continuations, batched over choices on top of the prefix's KV cache. About num_choices times fewer
    FLOPs than forward_rows; the same losses up to float rounding.
    """
    conts = [row[start:] for row in rows]
    lengths = [len(cont) for cont in conts]
    new_cache = partial(KVCache.for_model, model.config, seq_len=start + max(lengths), device=device,
                        dtype=get_compute_dtype(torch.device(device).type))
    prefix_cache = new_cache(batch_size=1)
    prefix = torch.tensor([rows[0][:start]], dtype=torch.long, device=device)
    last_logits = logits_at(model, prefix, [0], [start - 1], kv_cache=prefix_cache)  # predicts every cont[0]
    targets = [token for cont in conts for token in cont]
    if max(lengths) == 1:  # single-token choices: nothing more to run
        return continuation_scores(last_logits.expand(len(rows), -1), targets, lengths)
    choices_cache = new_cache(batch_size=len(rows))
    choices_cache.prefill(prefix_cache)
    # Each choice's tokens but the last, on top of the prefix; they predict cont[1:].
    row_idx = [i for i, n in enumerate(lengths) for _ in range(n - 1)]
    pos_idx = [t for n in lengths for t in range(n - 1)]
    cont_logits = logits_at(model, padded([cont[:-1] for cont in conts], pad_id, device), row_idx, pos_idx,
                            kv_cache=choices_cache)
    # Per row: the prefix's last logits, then that row's own continuation logits.
    offsets = [sum(n - 1 for n in lengths[:i]) for i in range(len(rows))]
    selected = torch.cat([torch.cat([last_logits, cont_logits[offset:offset + n - 1]]) for offset, n in zip(offsets, lengths)])
    return continuation_scores(selected, targets, lengths)


def is_correct(task_type, losses, hits, gold):
    if task_type == "language_modeling":
        return hits[0]
    return losses.index(min(losses)) == gold  # ties go to the first choice, in every path


# ---------------------------------------------------------------------------------------------------
# Evaluating a task

def evaluate_example(model, tokenizer, data, idx, device, task_meta):
    """The simple path: one forward with all of data[idx]'s rows. -> True when the model got it right."""
    rows, starts, gold = prepare_example(tokenizer, data, idx, task_meta, model.config.sequence_len + 1)
    losses, hits = forward_rows(model, rows, starts, tokenizer.get_bos_token_id(), device)
    return is_correct(task_meta["task_type"], losses, hits, gold)


def pack_examples(examples, indices, batch_size):
    """Group examples (longest first, so padding is small) into batches of at most batch_size distinct inputs."""
    order = sorted(indices, key=lambda i: -max(len(row) for row in examples[i][0]))
    batches, batch, batch_inputs = [], [], 0
    for i in order:
        n = len({tuple(row[:-1]) for row in examples[i][0]})  # distinct inputs: what a forward pays for
        if batch and batch_inputs + n > batch_size:
            batches.append(batch)
            batch, batch_inputs = [], 0
        batch.append(i)
        batch_inputs += n
    return batches + [batch] if batch else batches


def score_examples_batched(model, examples, task_type, pad_id, device, batch_size, share_prefix, progress=None):
    """-> correct flag per example, with many examples per forward (or one shared prefix per example).
    progress: a bar that counts the examples as they are scored."""
    correct = [False] * len(examples)
    packed = list(range(len(examples)))
    if share_prefix and task_type == "multiple_choice":
        # Multi-token choices go through the KV cache; single-token ones pack well already (one input each).
        shared = {i for i in packed if max(len(row) for row in examples[i][0]) - examples[i][1][0] > 1}
        for i in sorted(shared):
            rows, starts, gold = examples[i]
            correct[i] = is_correct(task_type, *forward_shared_prefix(model, rows, starts[0], pad_id, device), gold)
            if progress is not None:
                progress.update(1)
        packed = [i for i in packed if i not in shared]
    for batch in pack_examples(examples, packed, batch_size):
        rows = [row for i in batch for row in examples[i][0]]
        starts = [start for i in batch for start in examples[i][1]]
        losses, hits = forward_rows_packed(model, rows, starts, pad_id, device)
        offset = 0
        for i in batch:
            n = len(examples[i][0])
            correct[i] = is_correct(task_type, losses[offset:offset + n], hits[offset:offset + n], examples[i][2])
            offset += n
        if progress is not None:
            progress.update(len(batch))
    return correct


def evaluate_task(model, tokenizer, data, device, task_meta, batch_size=16, share_prefix=None, per_example=False,
                  progress=None):
    """
    Accuracy on `data` (a list of task items). task_meta: task_type, num_fewshot, continuation_delimiter.
    Rank r of W evaluates examples r, r+W, ...; the counts are summed over ranks.
    share_prefix (multiple choice only): None = on wherever FLOPs dominate (not CUDA).
    per_example: the simple one-forward-per-example path (slow; the reference the batched path must match).
    progress: a bar that counts this rank's examples as they are scored.
    """
    _, rank, _, world_size = get_dist_info()
    indices = list(range(rank, len(data), world_size))
    if per_example:
        correct = [evaluate_example(model, tokenizer, data, idx, device, task_meta) for idx in indices]
    else:
        if share_prefix is None:
            share_prefix = torch.device(device).type != "cuda"
        max_len = model.config.sequence_len + 1  # the input is the row without its last token
        examples = [prepare_example(tokenizer, data, idx, task_meta, max_len) for idx in indices]
        correct = score_examples_batched(model, examples, task_meta["task_type"], tokenizer.get_bos_token_id(),
                                         device, batch_size, share_prefix, progress)
    num_correct, num_total = all_reduce_sum([sum(correct), len(correct)], torch.device(device))
    return num_correct / max(num_total, 1)


# ---------------------------------------------------------------------------------------------------
# The eval bundle and the CORE score

def unzip_eval_bundle(zip_path):
    """Unpack the zip's eval_bundle/ folder into base_dir/eval_bundle (ValueError when it is no such zip)."""
    base_dir = get_base_dir()
    with tempfile.TemporaryDirectory(dir=base_dir) as tmp_dir:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp_dir)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{zip_path} is not a zip file ({e})") from e
        if not os.path.isdir(os.path.join(tmp_dir, "eval_bundle")):
            raise ValueError(f"{zip_path} has no eval_bundle/ folder")
        shutil.move(os.path.join(tmp_dir, "eval_bundle"), os.path.join(base_dir, "eval_bundle"))


def get_eval_bundle_dir():
    """
    The eval bundle, in the data order of nanochat/datasource.py: $NANOCHAT_DATA_DIR/eval_bundle,
    base_dir/eval_bundle, the embedded sample's; else downloaded and unpacked into base_dir/eval_bundle.
    """
    found = find_data("eval_bundle", ("eval_bundle",))
    if found:
        return found
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    try:
        zip_path = download_once(EVAL_BUNDLE_URL, bundle_dir + ".zip", on_complete=unzip_eval_bundle)
    except DownloadError as e:
        raise DownloadError(f"No CORE eval bundle. {e} Or unzip {EVAL_BUNDLE_URL} into {bundle_dir} by hand.") from e
    with FileLock(zip_path + ".lock"):
        if not os.path.isdir(bundle_dir):  # the zip was there already (placed by hand): unpack it now
            unzip_eval_bundle(zip_path)
    return bundle_dir


def load_core_tasks(bundle_dir):
    """-> list of task dicts (label, task_type, num_fewshot, continuation_delimiter, random_baseline, path)."""
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        random_baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for task in config["icl_tasks"]:
        tasks.append({
            "label": task["label"],
            "task_type": task["icl_task_type"],
            "num_fewshot": task["num_fewshot"][0],
            "continuation_delimiter": task.get("continuation_delimiter", " "),  # llm-foundry's default
            "random_baseline": random_baselines[task["label"]],
            "path": os.path.join(bundle_dir, "eval_data", task["dataset_uri"]),
        })
    return tasks


def load_task_data(path, max_per_task=-1):
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    if max_per_task > 0:
        random.Random(SUBSET_SEED).shuffle(data)
        data = data[:max_per_task]
    return data


def core_label(num_present, num_total):
    """'CORE' for the full task set, else e.g. 'CORE (18/22 tasks)' so a partial score is never mistaken for CORE."""
    return "CORE" if num_present == num_total else f"CORE ({num_present}/{num_total} tasks)"


@functools.cache  # once per process: base_train evaluates CORE many times
def warn_missing_tasks(bundle_dir, missing_labels):
    logger.warning(f"The eval bundle {bundle_dir} lacks {len(missing_labels)} CORE task files "
                   f"({', '.join(missing_labels)}); evaluating the others only")


def centered_accuracy(accuracy, random_baseline):
    """0 at random guessing, 1 at perfect; random_baseline in percent as in eval_meta_data.csv."""
    baseline = 0.01 * random_baseline
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task=-1, batch_size=16, share_prefix=None):
    """
    Every CORE task present in the bundle.
    -> {"core_metric", "label", "results" (accuracy per task), "centered_results", "missing_tasks"}.
    """
    bundle_dir = bundle_dir or get_eval_bundle_dir()
    tasks = load_core_tasks(bundle_dir)
    present = [task for task in tasks if os.path.exists(task["path"])]
    missing = tuple(task["label"] for task in tasks if task not in present)
    if not present:
        raise FileNotFoundError(f"No CORE task files under {os.path.join(bundle_dir, 'eval_data')}")
    if missing:
        warn_missing_tasks(bundle_dir, missing)
    label = core_label(len(present), len(tasks))
    datas = {task["label"]: load_task_data(task["path"], max_per_task) for task in present}
    _, rank, _, world_size = get_dist_info()
    bar = progress_bar(sum(len(range(rank, len(data), world_size)) for data in datas.values()), label)
    results, centered_results = {}, {}
    for task in present:
        t0 = time.time()
        data = datas[task["label"]]
        accuracy = evaluate_task(model, tokenizer, data, device, task, batch_size, share_prefix, progress=bar)
        results[task["label"]] = accuracy
        centered_results[task["label"]] = centered_accuracy(accuracy, task["random_baseline"])
        print0(f"{task['label']:<34} accuracy {accuracy:.4f} | centered {centered_results[task['label']]:+.4f} "
               f"| {len(data)} examples, {time.time() - t0:.1f}s")
    bar.close()
    core_metric = sum(centered_results.values()) / len(centered_results)
    print0(f"{label}: {core_metric:.4f}")
    return {"core_metric": core_metric, "label": label, "results": results,
            "centered_results": centered_results, "missing_tasks": list(missing)}
