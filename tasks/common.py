"""
What every chat task shares: the Task base class (a sliceable view over examples), mixtures and
sequences of tasks, the multiple-choice prompt, conversation checks, and finding local data files.

A task is a list of conversations {"messages": [{"role": ..., "content": ...}, ...]} plus a way to
grade a model's answer (evaluate). A task's files come from an explicit data_dir argument, else
from the data order of nanochat/datasource.py ($NANOCHAT_DATA_DIR, the embedded sample when
NANOCHAT_DATA=embedded); only when no local copy exists is the Hugging Face hub asked (imported
lazily, so importing a task never touches the network).
"""

import bisect
import gzip
import json
import os
import random

from nanochat.datasource import find_data


class Task:
    """
    A view over a task's examples, sliced like range(start, stop, step) so that scripts can take a
    prefix (tasks[:100] style evaluation) or a rank's share (start=rank, step=world_size).
    Subclasses implement eval_type, get_example(index), evaluate(...) and num_examples() unless they hold self.rows.
    """

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"Bad task slice start={start} stop={stop} step={step}: need 0 <= start <= stop, step >= 1")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        """'categorical' (pick one of the allowed letters) or 'generative' (free-form completion)."""
        raise NotImplementedError

    def num_examples(self):
        """Number of underlying examples, before slicing (tasks that load a list of self.rows need not say)."""
        return len(self.rows)

    def get_example(self, index):
        """The conversation for an underlying (unsliced) index."""
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        """True when assistant_response answers conversation correctly."""
        raise NotImplementedError

    def _indices(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self._indices())

    def __getitem__(self, index):
        return self.get_example(self._indices()[index])  # range indexing raises IndexError past the end


class TaskMixture(Task):
    """
    All examples of several tasks, shuffled together with a fixed seed so that training sees the
    tasks interleaved, identically on every run and every rank. List a task twice to oversample it.
    """

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def locate(self, index):
        """-> (task number, index within that task) of a mixture example."""
        return self.index_map[index]

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The examples of several tasks one after the other (a curriculum), in order."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.offsets = [0]  # offsets[t] = index of task t's first example
        for task in tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t][index - self.offsets[t]]


def first_examples(task, n):
    """The first n examples of a task (all of them when n < 0): caps each task of a mixture in tiny runs."""
    return task if n < 0 else TaskSequence([task], stop=n)


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Each choice is written "- choice=X" so that the letter follows "="
    directly: the answer the model gives is the bare letter, and a letter glued to "=" tokenizes the
    same way in every line (" A" and "A" would be different tokens).
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines += ["", "Respond only with the letter of the correct answer."]
    return "\n".join(lines)


def content_text(content):
    """The text of a message content (a str, or a list of parts): the text parts, without tool calls and outputs."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def check_messages(messages):
    """
    Raise ValueError unless messages form a conversation the tokenizer can render: an optional
    system message, then user and assistant turns alternating, starting with user.
    """
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("a conversation needs a list of at least 2 messages (user, then assistant)")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    turns = messages[1:] if has_system else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            raise ValueError(f"message {i} should have role {expected!r} (roles must alternate user/assistant), got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") in ("text", "python", "python_output") and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"message {i}: content parts must be {{'type': 'text'|'python'|'python_output', 'text': str}}")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")


def local_file(*parts, data_dir=None):
    """
    A file of a data tree: under data_dir when given (then it must exist), else found in the data
    order. None means "no local copy": the caller goes to the hub.
    """
    if data_dir is None:
        return find_data(os.path.join(*parts))
    path = os.path.join(data_dir, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: data_dir must be a data tree laid out like the repo's data/ "
                                f"(see its SOURCES.md)")
    return path


def read_jsonl(path):
    """Rows of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
