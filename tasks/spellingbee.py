"""
Synthetic spelling tasks that teach a small model to see the letters inside its tokens.
SpellingBee: "How many 'r' are in strawberry?" in varied phrasings; the assistant spells the word
out, counts letter by letter, double-checks with a python tool call ("strawberry".count("r"), which
the Engine's calculator runs) and ends with "#### <count>". SimpleSpelling: "Spell the word: apple"
-> "apple:a,p,p,l,e". Examples are generated on the fly, each from its own RNG seeded by
(task, split, index): deterministic, and train and test draw different examples.
Words: words/words_alpha.txt.gz of a data tree, or base_dir/words_alpha.txt, in the data order of
nanochat/datasource.py; else downloaded once from dwyl/english-words.
"""

import functools
import gzip
import os
import random
import re

from nanochat.common import get_base_dir
from nanochat.datasource import download_once, find_data
from tasks.common import Task, content_text, local_file

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUESTION_TEMPLATES = [
    "How many {letter} are in the word {word}?",
    "How many {letter}s are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}.",
    "In the word {word}, how many {letter} are there?",
    "What is the count of the letter {letter} in {word}?",
    "how many {letter} in {word}",
    "Tell me how many times {letter} occurs in the word {word}.",
    "Can you count the {letter}'s in {word}?",
    "Number of {letter} in {word}?",
    "{word}: how many {letter}?",
    "I need to know how many {letter} the word {word} contains.",
]
QUOTES = ["", "'", '"']
NUMBER_RE = re.compile(r"-?\d+")


def word_list_path(data_dir=None):
    if data_dir is not None:
        return local_file("words", "words_alpha.txt.gz", data_dir=data_dir)
    return (find_data("words/words_alpha.txt.gz", ("words_alpha.txt",))
            or download_once(WORD_LIST_URL, os.path.join(get_base_dir(), "words_alpha.txt")))


@functools.lru_cache(maxsize=2)  # 370k words, shared by every spelling task of the process
def read_words(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]  # strip() also drops the file's CRLF endings


def final_number(text):
    """The last integer in text, or None."""
    numbers = NUMBER_RE.findall(text)
    return int(numbers[-1]) if numbers else None


class WordTask(Task):
    """size synthetic examples about words of the word list, drawn deterministically per (split, index)."""

    def __init__(self, size=1000, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be 'train' or 'test', got {split!r}")
        self.size, self.split = size, split
        self.words = read_words(word_list_path(data_dir))

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = random.Random(f"spellingbee-{self.split}-{index}")
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that 0 is a possible answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        quote = rng.choice(QUOTES)
        question = rng.choice(QUESTION_TEMPLATES).format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
        count = word.count(letter)
        tally, running = [], 0
        for i, char in enumerate(word, 1):
            running += char == letter
            tally.append(f"{i}:{char} hit! count={running}" if char == letter else f"{i}:{char}")
        manual = (f"We are asked to count the letter '{letter}' in the word '{word}'. First I spell the word out:\n"
                  f"{word}:{','.join(word)}\n\n"
                  f"Then I go through the letters one by one, counting '{letter}':\n" + "\n".join(tally) +
                  f"\n\nThat gives {count}. Let me double-check with Python:\n\n")
        answer = [
            {"type": "text", "text": manual},
            {"type": "python", "text": f'"{word}".count("{letter}")'},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython also gives {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    def evaluate(self, conversation, assistant_response):
        """Correct when the last number of the response is the count (the reference ends '#### <count>')."""
        reference = final_number(content_text(conversation["messages"][-1]["content"]))
        return final_number(assistant_response) == reference


class SimpleSpelling(WordTask):

    def get_example(self, index):
        word = random.Random(f"simplespelling-{self.split}-{index}").choice(self.words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return assistant_response.strip() == conversation["messages"][-1]["content"]
