"""
Derive the embedded sample data/ (shipped in the repo for the CPU demo and the tests) from the full
local data tree, reproducibly: same source, same output, byte for byte.

    python -m dev.make_embedded_data --source ../shared/data --out data

data/ keeps the source's layout (pretrain/, eval_bundle/, chat/<task>/, words/), so one code path
reads both. What is taken from each file, and why that much, is in data/SOURCES.md (written by hand:
update it when a number below changes).
"""

import argparse
import csv
import gzip
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.core_eval import SUBSET_SEED, load_core_tasks

# Pretraining text. The CPU demo trains d4 for 300 steps x 4096 tokens = 1.2M tokens. At T=512 the
# best-fit loader's 1000-document buffer fills up with documents longer than a row (~1.6M tokens sit
# there by step 300), so the run reads ~12.5M chars of this text (measured): all of it is taken in
# one epoch, none twice.
TRAIN_CHARS = 12_500_000
VAL_CHARS = 1_200_000  # --eval-tokens=131072 scores ~0.5M chars of it
DOCS_PER_ROW_GROUP = 128  # small groups: the val shard has several, so 2 ranks each get some
DOCS_PER_SHARD = 1024

CORE_ROWS = 100  # per task: the demo takes --max-per-task=50 (few-shot examples are drawn among those)
MMLU_TEST_ROWS_PER_SUBJECT = 20  # 57 subjects -> 1,140 test questions (chat_eval samples 50)
GSM8K_TRAIN_ROWS = 3000  # of 7,473 (mid-training and SFT sample ~1,000 of them)
GSM8K_TEST_ROWS = 500  # of 1,319 (chat_eval samples 50, mid-training's val mixture 420)
SMOLTALK_STANDIN_ROWS = 1500  # of 2,312 HH-RLHF dialogues (every 10th is the test split)
ARC_EVAL_ROWS = 500  # of each Test and Dev file (the train files are kept whole: SFT trains on them)
WORDS = 20_000  # of 370k: the spelling tasks draw words at random, any list works
WORDS_SEED = 42


def write_gzip(path, data):
    """gzip with a zero timestamp and no file name, so the same content gives the same bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)


def read_lines(path):
    """Non-blank lines of a (gzipped) text file, as bytes with their line endings."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return [line for line in f if line.strip()]


def head(source, out, relative, rows):
    """The first rows lines of a (gzipped) jsonl/csv file."""
    write_gzip(os.path.join(out, relative), b"".join(read_lines(os.path.join(source, relative))[:rows]))


def copy(source, out, relative):
    os.makedirs(os.path.dirname(os.path.join(out, relative)), exist_ok=True)
    shutil.copyfile(os.path.join(source, relative), os.path.join(out, relative))


def take_documents(paths, max_chars):
    """Documents of the shards in order until max_chars characters."""
    docs, total = [], 0
    for path in paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            if total >= max_chars:
                return docs
            docs.append(text)
            total += len(text)
    return docs


def write_pretrain(source, out):
    shards = sorted(os.path.join(source, "pretrain", f) for f in os.listdir(os.path.join(source, "pretrain"))
                    if f.endswith(".parquet"))
    train = take_documents(shards[:-1], TRAIN_CHARS)
    val = take_documents(shards[-1:], VAL_CHARS)
    groups = [train[i:i + DOCS_PER_SHARD] for i in range(0, len(train), DOCS_PER_SHARD)] + [val]
    os.makedirs(os.path.join(out, "pretrain"))
    for i, docs in enumerate(groups):
        table = pa.table({"text": pa.array(docs, type=pa.string())})
        pq.write_table(table, os.path.join(out, "pretrain", f"shard_{i:05d}.parquet"),
                       row_group_size=DOCS_PER_ROW_GROUP, compression="zstd")


def core_subset(lines, k):
    """
    The rows core_eval would use from the full file, stored so that it picks the same ones here.
    core_eval shuffles a task's rows with random.Random(SUBSET_SEED) and takes the first
    --max-per-task. A shuffle of k rows applies the same permutation whatever the rows are, so rows
    stored at the positions that permutation reads from come out in the chosen order: for every
    --max-per-task <= k the embedded file gives the examples (and few-shot examples) of the full file.
    """
    chosen = list(lines)
    random.Random(SUBSET_SEED).shuffle(chosen)
    chosen = chosen[:k]
    order = list(range(len(chosen)))
    random.Random(SUBSET_SEED).shuffle(order)  # the shuffle puts stored[order[j]] at position j
    stored = [None] * len(chosen)
    for j, i in enumerate(order):
        stored[i] = chosen[j]
    return stored


def write_eval_bundle(source, out):
    for name in ("core.yaml", "eval_meta_data.csv"):
        copy(source, out, os.path.join("eval_bundle", name))
    for task in load_core_tasks(os.path.join(source, "eval_bundle")):
        if not os.path.exists(task["path"]):
            continue  # absent in the source too: core_eval evaluates the tasks present
        relative = os.path.relpath(task["path"], source)
        os.makedirs(os.path.dirname(os.path.join(out, relative)), exist_ok=True)
        with open(os.path.join(out, relative), "wb") as f:
            f.writelines(core_subset(read_lines(task["path"]), CORE_ROWS))


def write_chat(source, out):
    head(source, out, "chat/gsm8k/train.jsonl.gz", GSM8K_TRAIN_ROWS)
    head(source, out, "chat/gsm8k/test.jsonl.gz", GSM8K_TEST_ROWS)
    copy(source, out, "chat/humaneval/HumanEval.jsonl.gz")
    copy(source, out, "chat/identity/identity_conversations.jsonl.gz")
    head(source, out, "chat/instruct/hh-rlhf_harmless-base_test.jsonl.gz", SMOLTALK_STANDIN_ROWS)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        copy(source, out, f"chat/arc/{subset}-Train.jsonl.gz")
        head(source, out, f"chat/arc/{subset}-Dev.jsonl.gz", ARC_EVAL_ROWS)
        head(source, out, f"chat/arc/{subset}-Test.reconstructed.jsonl.gz", ARC_EVAL_ROWS)
    mmlu = os.path.join(source, "chat", "mmlu")
    for split in ("dev", "val", "test"):
        for name in sorted(os.listdir(os.path.join(mmlu, split))):
            relative = f"chat/mmlu/{split}/{name}"
            if split == "test":
                with gzip.open(os.path.join(source, relative), "rt", encoding="utf-8", newline="") as f:
                    lines = list(f)  # line endings kept as they are (some files use CRLF)
                reader = csv.reader(lines)
                for _ in range(MMLU_TEST_ROWS_PER_SUBJECT):
                    next(reader, None)
                # reader.line_num: the lines those rows took (a quoted field may span several)
                write_gzip(os.path.join(out, relative), "".join(lines[:reader.line_num]).encode("utf-8"))
            else:
                copy(source, out, relative)


def write_words(source, out):
    words = read_lines(os.path.join(source, "words", "words_alpha.txt.gz"))
    sample = sorted(random.Random(WORDS_SEED).sample(range(len(words)), WORDS))
    write_gzip(os.path.join(out, "words", "words_alpha.txt.gz"), b"".join(words[i] for i in sample))


def main():
    parser = argparse.ArgumentParser(description="Derive the embedded sample data/ from the full local data tree")
    parser.add_argument("--source", default=os.path.join("..", "shared", "data"), help="the full data tree")
    parser.add_argument("--out", default="data", help="output dir (its generated folders are replaced)")
    args = parser.parse_args()
    for part in ("pretrain", "eval_bundle", "chat", "words"):
        shutil.rmtree(os.path.join(args.out, part), ignore_errors=True)
    write_pretrain(args.source, args.out)
    write_eval_bundle(args.source, args.out)
    write_chat(args.source, args.out)
    write_words(args.source, args.out)
    for part in ("pretrain", "eval_bundle", "chat", "words"):
        files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(args.out, part)) for f in names]
        print(f"{part:<12} {len(files):>4} files {sum(map(os.path.getsize, files)):>12,} bytes")


if __name__ == "__main__":
    main()
