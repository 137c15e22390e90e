"""
GSM8K: grade-school math word problems with worked solutions (train 7,473, test 1,319).
The solutions annotate each arithmetic step as <<48/2=24>>; the assistant message turns those
into calculator tool calls ({"type": "python", "text": "48/2"} then {"type": "python_output",
"text": "24"}) so the model learns to use the Engine's calculator. The solution ends "#### 72",
and grading compares that final number. Local files chat/gsm8k/{train,test}.jsonl.gz, else the
hub's openai/gsm8k.
"""

import re

from nanochat.datasource import load_hub_dataset
from tasks.common import Task, content_text, local_file, read_jsonl

ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
# "#### -1,234.5" -> "-1,234.5"; a "$" may precede the number and commas group thousands
ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text):
    """The number after "####" (commas dropped) as a string, or None when there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None


def solution_to_parts(answer):
    """A GSM8K solution string -> assistant content parts, calculator annotations made tool calls."""
    parts = []
    pieces = ANNOTATION_RE.split(answer)  # alternates: text, annotation, text, ...
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
        elif "=" in piece:
            expression, result = piece.rsplit("=", 1)
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        # an annotation without "=" is a typo in the data set: nothing to call, so it is dropped
    return parts


class GSM8K(Task):

    def __init__(self, subset="main", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset != "main":
            raise ValueError(f"GSM8K subset must be 'main' (the only one in the local data), got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        path = local_file("chat", "gsm8k", f"{split}.jsonl.gz", data_dir=data_dir)
        self.rows = read_jsonl(path) if path else load_hub_dataset("openai/gsm8k", subset, split)

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        reference = extract_answer(content_text(conversation["messages"][-1]["content"]))
        assert reference is not None, "every GSM8K solution ends with '#### <number>'"
        predicted = extract_answer(assistant_response)
        return predicted is not None and float(predicted) == float(reference)

    def reward(self, conversation, assistant_response):
        """RL reward: 1.0 for a correct final answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
