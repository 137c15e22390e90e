"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices, asked as a
multiple-choice prompt; the answer is the choice's letter. Subsets ARC-Easy and ARC-Challenge.
Local files: chat/arc/<subset>-{Train,Dev}.jsonl.gz and <subset>-Test.reconstructed.jsonl.gz
(the test split rebuilt from OLMo's copy, see SOURCES.md); else the hub's allenai/ai2_arc.
"""

from nanochat.datasource import load_hub_dataset
from tasks.common import Task, render_mc, local_file, read_jsonl

LOCAL_FILE_SPLIT = {"train": "Train", "validation": "Dev", "test": "Test.reconstructed"}


class ARC(Task):

    def __init__(self, subset="ARC-Easy", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in LOCAL_FILE_SPLIT:
            raise ValueError(f"ARC split must be one of {list(LOCAL_FILE_SPLIT)}, got {split!r}")
        path = local_file("chat", "arc", f"{subset}-{LOCAL_FILE_SPLIT[split]}.jsonl.gz", data_dir=data_dir)
        if path:
            # the original release nests the question; flatten it to the hub's row layout
            self.rows = [{"question": r["question"]["stem"],
                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                      "label": [c["label"] for c in r["question"]["choices"]]},
                          "answerKey": r["answerKey"]} for r in read_jsonl(path)]
        else:
            self.rows = load_hub_dataset("allenai/ai2_arc", subset, split)

    @property
    def eval_type(self):
        return "categorical"

    def get_example(self, index):
        row = self.rows[index]
        letters = list(row["choices"]["label"])  # mostly A-D; ~4% of questions use 1-4, as released
        assert row["answerKey"] in letters, f"ARC answer {row['answerKey']!r} not among {letters}"
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": row["answerKey"]},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        return assistant_response == conversation["messages"][-1]["content"]
