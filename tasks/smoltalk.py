"""
SmolTalk: general multi-turn conversations for SFT.
Online: the hub's HuggingFaceTB/smol-smoltalk (splits train and test, ~460k + ~24k conversations).
Offline STAND-IN: no permissively licensed general chat set is in the local data tree, so the MIT
licensed Anthropic HH-RLHF harmless-base test file (chat/instruct/hh-rlhf_harmless-base_test.jsonl.gz,
2,312 dialogues) is used instead: its "chosen" dialogues become conversations, every 10th one goes to
the test split. It is red-teaming data (offensive prompts, cautious answers) and small: good enough
to exercise the pipeline, not a substitute for SmolTalk's quality. (The local Alpaca file is
CC BY-NC, non-commercial, so it is deliberately not used.)
"""

import re

from nanochat.datasource import load_hub_dataset
from tasks.common import Task, check_messages, local_file, read_jsonl

TURN_RE = re.compile(r"\n\n(Human|Assistant): ")
ROLES = {"Human": "user", "Assistant": "assistant"}
TEST_EVERY = 10  # offline stand-in: dialogue i is in the test split when i % 10 == 0


def parse_hh_dialogue(text):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages, or None when the dialogue is malformed."""
    pieces = TURN_RE.split(text)  # ['', 'Human', '...', 'Assistant', '...', ...]
    if pieces[0].strip():
        return None  # text before the first turn
    messages = [{"role": ROLES[speaker], "content": content.strip()} for speaker, content in zip(pieces[1::2], pieces[2::2])]
    if not messages or messages[-1]["role"] != "assistant" or any(not m["content"] for m in messages):
        return None  # nothing to learn from a dialogue that ends on the user or has an empty turn
    try:
        check_messages(messages)  # e.g. two Human turns in a row
    except ValueError:
        return None
    return messages


class SmolTalk(Task):

    def __init__(self, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        path = local_file("chat", "instruct", "hh-rlhf_harmless-base_test.jsonl.gz", data_dir=data_dir)
        if path:
            dialogues = [parse_hh_dialogue(row["chosen"]) for row in read_jsonl(path)]
            in_split = (lambda i: i % TEST_EVERY == 0) if split == "test" else (lambda i: i % TEST_EVERY != 0)
            self.rows = [{"messages": m} for i, m in enumerate(dialogues) if m is not None and in_split(i)]
        else:
            self.rows = load_hub_dataset("HuggingFaceTB/smol-smoltalk", split=split)

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        messages = self.rows[index]["messages"]
        check_messages(messages)  # the hub rows are trusted to be well-formed; this keeps that honest
        return {"messages": messages}
