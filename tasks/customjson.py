"""
Conversations from your own .jsonl file (plain or .gz), e.g. the identity conversations that teach
the model its name and origin. Each line is a JSON list of messages, or {"messages": [...]}, with
user and assistant turns alternating (an optional system message first). Every line is checked at
load time, and an error names the line.
"""

import gzip
import json
import os

from nanochat.common import get_base_dir
from nanochat.datasource import OFFLINE_HINT, find_data
from tasks.common import Task, check_messages

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def default_identity_path():
    """The identity conversations, in the data order; base_dir/identity_conversations.jsonl when nowhere."""
    return (find_data("chat/identity/identity_conversations.jsonl.gz", ("identity_conversations.jsonl",))
            or os.path.join(get_base_dir(), "identity_conversations.jsonl"))


def parse_line(line, where):
    """One line -> its list of messages, or a ValueError naming where the bad line is."""
    try:
        row = json.loads(line)
        messages = row.get("messages") if isinstance(row, dict) else row
        check_messages(messages)
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{where}: {e}") from e
    return messages


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(
                f"Conversation file {filepath} not found. Write one JSON list of messages per line, e.g.\n"
                '  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]\n'
                f"For the identity conversations: curl -L -o {os.path.join(get_base_dir(), 'identity_conversations.jsonl')} {IDENTITY_URL}\n"
                f"{OFFLINE_HINT}"
            )
        self.conversations = []
        opener = gzip.open if filepath.endswith(".gz") else open
        with opener(filepath, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    self.conversations.append(parse_line(line, f"{filepath} line {line_number}"))

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
