"""
Your own data, from .jsonl files (plain or .gz), checked line by line at load time (an error names the
file and line, and nothing trains):
- CustomJSON: conversations, e.g. the identity conversations that teach the model its name and origin
  (chat_sft --data FILE.jsonl). Each line is a JSON list of messages, or {"messages": [...]}, with user
  and assistant turns alternating (an optional system message first).
- CustomQA: question/answer pairs to reinforce (chat_rl --task FILE.jsonl). Each line is
  {"question": "...", "answer": "..."}; an answer that is a number is graded numerically (the last number
  in the model's reply), any other answer by exact match (ignoring case, surrounding space and a final period).
"""

import gzip
import json
import math
import os
import re

from nanochat.common import get_base_dir
from nanochat.datasource import OFFLINE_HINT, find_data
from tasks.common import Task, check_messages, content_text

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


def read_lines(filepath):
    """-> [(where, line)] of the file's non-blank lines, where = "FILE line N"; undecodable bytes are a ValueError
    naming the line, a damaged .gz one naming the file."""
    opener = gzip.open if filepath.endswith(".gz") else open
    lines = []
    try:
        with opener(filepath, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                where = f"{filepath} line {line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e
                if line.strip():
                    lines.append((where, line))
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise ValueError(f"{filepath}: cannot be read ({type(e).__name__}: {e})") from e
    return lines


def parse_data_spec(spec):
    """"FILE.jsonl" or "FILE.jsonl:EPOCHS" (passes over the file per epoch of the mixture) -> (path, epochs)."""
    path, _, epochs = spec.rpartition(":")
    if not path or not epochs.isdigit():
        path, epochs = spec, "1"
    if int(epochs) < 1:
        raise ValueError(f"{spec}: the number of passes after ':' must be >= 1")
    return path, int(epochs)


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
        self.conversations = [parse_line(line, where) for where, line in read_lines(filepath)]
        if not self.conversations:
            raise ValueError(f"{filepath}: no conversations in it")

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}


NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def as_number(text):
    """The text as a number ("1,234.5" -> 1234.5), or None when it is not one."""
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize_answer(text):
    return " ".join(text.strip().rstrip(".").split()).casefold()


class CustomQA(Task):
    """Question/answer pairs from a .jsonl file: the task chat_rl --task FILE.jsonl trains and evaluates on."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"Question file {filepath} not found. Write one JSON object per line, e.g.\n"
                                    '  {"question": "What is 12 times 7?", "answer": "84"}')
        self.rows = []
        for where, line in read_lines(filepath):
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip() \
                    or not isinstance(row.get("answer"), (str, int, float)) or isinstance(row.get("answer"), bool):
                raise ValueError(f'{where}: need {{"question": "<text>", "answer": "<text or number>"}}, got {line.strip():.80}')
            self.rows.append({"question": row["question"], "answer": str(row["answer"])})
        if not self.rows:
            raise ValueError(f"{filepath}: no questions in it")

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}

    def evaluate(self, conversation, assistant_response):
        """A numeric answer: the last number in the reply equals it (to 1e-6 relative); else the reply is the answer."""
        reference = content_text(conversation["messages"][-1]["content"])
        number = as_number(reference)
        if number is None:
            return normalize_answer(assistant_response) == normalize_answer(reference)
        found = NUMBER_RE.findall(assistant_response)
        predicted = as_number(found[-1]) if found else None
        return predicted is not None and math.isclose(predicted, number, rel_tol=1e-6, abs_tol=1e-9)

    def reward(self, conversation, assistant_response):
        """RL reward: 1.0 for a correct answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
