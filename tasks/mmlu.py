"""
MMLU: 4-choice questions over 57 subjects, asked as a multiple-choice prompt; the answer is A-D.
subset "all" has splits dev (285), validation (1,531; "val" also accepted), test (14,042): local
files chat/mmlu/{dev,val,test}/<subject>_<split>.csv.gz (original csv: question, A, B, C, D, letter),
else the hub's cais/mmlu. subset "auxiliary_train" (split "train", ~100k questions from other
multiple-choice sets, used by SFT) exists only on the hub: see mmlu_training_set() for the
offline stand-in.
"""

import csv
import gzip
import os
import random

from nanochat.common import print0
from nanochat.datasource import load_hub_dataset
from tasks.common import Task, TaskSequence, render_mc, local_file

LETTERS = ("A", "B", "C", "D")
LOCAL_DIR_SPLIT = {"dev": "dev", "validation": "val", "val": "val", "test": "test"}


def read_mmlu_csv_dir(directory):
    """Rows {question, subject, choices, answer} of every <subject>_<split>.csv.gz in directory."""
    rows = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".csv.gz"):
            continue
        subject = name[:-len(".csv.gz")].rsplit("_", 1)[0]  # abstract_algebra_dev.csv.gz -> abstract_algebra
        with gzip.open(os.path.join(directory, name), "rt", encoding="utf-8", newline="") as f:
            for line_number, fields in enumerate(csv.reader(f), 1):
                if len(fields) != 6 or fields[5] not in LETTERS:
                    raise ValueError(f"{name} row {line_number}: expected question, A, B, C, D, answer letter; got {fields!r:.120}")
                rows.append({"question": fields[0], "subject": subject, "choices": fields[1:5], "answer": LETTERS.index(fields[5])})
    return rows


class MMLU(Task):

    def __init__(self, subset="all", split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset == "auxiliary_train":
            if split != "train":
                raise ValueError(f"MMLU auxiliary_train has only the split 'train', got {split!r}")
            self.rows = load_hub_dataset("cais/mmlu", "auxiliary_train", "train")  # not in the local data tree
        elif subset == "all":
            if split not in LOCAL_DIR_SPLIT:
                raise ValueError(f"MMLU split must be one of {list(LOCAL_DIR_SPLIT)} (or subset='auxiliary_train', split='train'), got {split!r}")
            directory = local_file("chat", "mmlu", LOCAL_DIR_SPLIT[split], data_dir=data_dir)
            if directory:
                self.rows = read_mmlu_csv_dir(directory)
            else:
                self.rows = load_hub_dataset("cais/mmlu", "all", "validation" if split == "val" else split)
        else:
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        # Both sources are sorted by subject: a fixed shuffle makes any prefix (--max-problems) a fair sample.
        self.order = list(range(len(self.rows)))
        random.Random(42).shuffle(self.order)

    @property
    def eval_type(self):
        return "categorical"

    def get_example(self, index):
        row = self.rows[self.order[index]]
        row = row.get("train", row)  # the hub's auxiliary_train nests each row under a "train" key
        messages = [
            {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
            {"role": "assistant", "content": LETTERS[row["answer"]]},
        ]
        return {"messages": messages, "letters": list(LETTERS), "subject": row.get("subject", "")}

    def evaluate(self, conversation, assistant_response):
        return assistant_response == conversation["messages"][-1]["content"]


def mmlu_training_set(data_dir=None):
    """
    The MMLU-style data SFT teaches the multiple-choice format with: auxiliary_train from
    the hub when it can be reached; otherwise (offline) the local dev + validation splits
    (1,816 questions) as a much smaller stand-in. MMLU is evaluated on test, so neither overlaps it.
    Set HF_HUB_OFFLINE=1 offline, or the hub attempt spends ~25 s in retries first.
    """
    try:
        return MMLU(subset="auxiliary_train", split="train")
    except RuntimeError as e:
        print0(f"MMLU auxiliary_train unavailable ({str(e).splitlines()[0]}); "
               "using the local MMLU dev+validation splits as a small stand-in")
        return TaskSequence([MMLU(subset="all", split="dev", data_dir=data_dir),
                             MMLU(subset="all", split="validation", data_dir=data_dir)])
