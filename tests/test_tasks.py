"""
Chat tasks on the test data tree (real data): every task loads offline, renders valid conversations that agree
with the raw files, slices correctly, mixes deterministically, and grades answers right.
"""
import csv
import gzip
import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO_ROOT, TEST_DATA, FileServer
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU, mmlu_training_set
from tasks.smoltalk import SmolTalk, parse_hh_dialogue
from tasks.spellingbee import SimpleSpelling, SpellingBee

CHAT = TEST_DATA / "chat"


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails at once instead of retrying


def raw_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def raw_mmlu_rows(split_dir):
    rows = []
    for path in sorted((CHAT / "mmlu" / split_dir).glob("*.csv.gz")):
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            rows += list(csv.reader(f))
    return rows


def assert_valid_conversation(conversation):
    """What the tokenizer needs: user/assistant alternating from user, user text, assistant text or parts."""
    messages = conversation["messages"]
    assert len(messages) >= 2  # (4 identity conversations end on a user turn: valid, just nothing learned there)
    for i, message in enumerate(messages):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        if message["role"] == "user":
            assert isinstance(message["content"], str) and message["content"]
        elif isinstance(message["content"], list):
            assert all(p["type"] in ("text", "python", "python_output") and isinstance(p["text"], str) for p in message["content"])
        else:
            assert isinstance(message["content"], str) and message["content"]


def unannotate(parts):
    """Assistant parts back to GSM8K's annotated solution string."""
    out = []
    for part in parts:
        if part["type"] == "text":
            out.append(part["text"])
        elif part["type"] == "python":
            out.append(f"<<{part['text']}=")
        else:
            out.append(f"{part['text']}>>")
    return "".join(out)


def assistant_message(text):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": text}]}]}


# --------------------------------------------------------------------------------------------- loading

TASKS = {
    "ARC-Easy-train": (lambda: ARC("ARC-Easy", "train"), lambda: len(raw_jsonl(CHAT / "arc" / "ARC-Easy-Train.jsonl.gz"))),
    "ARC-Challenge-test": (lambda: ARC("ARC-Challenge", "test"), lambda: len(raw_jsonl(CHAT / "arc" / "ARC-Challenge-Test.reconstructed.jsonl.gz"))),
    "MMLU-dev": (lambda: MMLU("all", "dev"), lambda: len(raw_mmlu_rows("dev"))),
    "MMLU-test": (lambda: MMLU("all", "test"), lambda: len(raw_mmlu_rows("test"))),
    "GSM8K-train": (lambda: GSM8K("main", "train"), lambda: len(raw_jsonl(CHAT / "gsm8k" / "train.jsonl.gz"))),
    "HumanEval": (lambda: HumanEval(), lambda: len(raw_jsonl(CHAT / "humaneval" / "HumanEval.jsonl.gz"))),
    "SmolTalk-train": (lambda: SmolTalk("train"), None),
    "SpellingBee": (lambda: SpellingBee(size=300, split="train"), lambda: 300),
    "SimpleSpelling": (lambda: SimpleSpelling(size=300, split="test"), lambda: 300),
    "identity": (lambda: CustomJSON(str(CHAT / "identity" / "identity_conversations.jsonl.gz")),
                 lambda: len(raw_jsonl(CHAT / "identity" / "identity_conversations.jsonl.gz"))),
}


@pytest.mark.parametrize("name", TASKS)
def test_task_loads_locally_and_renders_valid_conversations(name):
    make_task, expected_len = TASKS[name]
    task = make_task()
    if expected_len is not None:
        assert len(task) == expected_len()
    assert task.eval_type in ("categorical", "generative")
    stride = max(1, len(task) // 300)  # a few hundred examples spread over the whole task
    for i in range(0, len(task), stride):
        conversation = task[i]
        assert_valid_conversation(conversation)
        if task.eval_type == "categorical":
            assert conversation["messages"][-1]["content"] in conversation["letters"]


def test_tasks_render_with_the_tokenizer(request):
    """Masks are 1 exactly on what the assistant writes (text and tool calls), 0 on prompts and tool outputs."""
    pytest.importorskip("nanochat.tokenizer")
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    special = re.compile(r"<\|[a-z_]+\|>")
    conversations = [ARC("ARC-Easy", "validation")[0], GSM8K(split="test")[0], SpellingBee(size=5)[3],
                     SimpleSpelling(size=5)[0], SmolTalk("test")[0], MMLU("all", "dev")[0]]
    for conversation in conversations:
        ids, mask = tokenizer.render_conversation(conversation)
        assert len(ids) == len(mask) < 2048  # not truncated, so every part is there
        learned = special.sub("", tokenizer.decode([t for t, m in zip(ids, mask) if m]))
        expected = ""
        for message in conversation["messages"][1::2]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            expected += "".join(p["text"] for p in parts if p["type"] != "python_output")
        assert learned == expected
        outputs = [p["text"] for m in conversation["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "python_output"]
        if outputs:  # tool outputs are in the rendering, unlearned
            unlearned = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
            assert all(f"<|output_start|>{o}<|output_end|>" in unlearned for o in outputs)


def test_explicit_data_dir_and_missing_files(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    assert len(GSM8K(split="test", data_dir=str(TEST_DATA))) == len(raw_jsonl(CHAT / "gsm8k" / "test.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="data_dir must be a data tree"):
        GSM8K(split="test", data_dir=str(tmp_path))


@pytest.mark.slow
def test_hub_failure_names_the_offline_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))  # an empty tree: no local copy, so the hub is tried
    for make_task in [lambda: GSM8K(split="test"), lambda: ARC("ARC-Easy", "test"), lambda: MMLU("all", "test")]:
        with pytest.raises(RuntimeError, match="NANOCHAT_DATA=embedded"):
            make_task()


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s on a busy 2-core machine
def test_importing_tasks_touches_no_hub():
    code = ("import sys, tasks.arc, tasks.mmlu, tasks.gsm8k, tasks.humaneval, tasks.smoltalk, tasks.spellingbee, "
            "tasks.customjson; print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_bad_arguments_raise_clear_errors():
    for make_task in [lambda: ARC("ARC-Medium", "train"), lambda: ARC("ARC-Easy", "dev"), lambda: MMLU("all", "train"),
                      lambda: MMLU("auxiliary_train", "test"), lambda: GSM8K(split="validation"), lambda: SmolTalk("dev"),
                      lambda: SpellingBee(10, "validation"), lambda: GSM8K(split="test", start=5, stop=2)]:
        with pytest.raises(ValueError):
            make_task()


# --------------------------------------------------------------------------------------------- slicing, mixtures

class Numbers(Task):
    """n examples whose only content is (name, index): easy to follow through mixtures."""

    def __init__(self, name, n, **kwargs):
        super().__init__(**kwargs)
        self.name, self.n = name, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.name}, {"role": "assistant", "content": str(index)}]}


def ident(conversation):
    return conversation["messages"][0]["content"], int(conversation["messages"][1]["content"])


def test_slicing_matches_range_semantics():
    full = GSM8K(split="test")
    for start, stop, step in [(0, None, 1), (10, 20, 3), (5, 6, 1), (1300, 5000, 7), (0, 0, 1)]:
        view = GSM8K(split="test", start=start, stop=stop, step=step)
        expected = range(len(full))[start:stop:step]
        assert len(view) == len(expected)
        assert [view[i] for i in range(len(view))] == [full[j] for j in expected]
    view = GSM8K(split="test", start=10, stop=20, step=3)
    assert view[-1] == full[19]
    with pytest.raises(IndexError):
        view[len(view)]
    assert [ident(c) for c in Numbers("a", 10, start=2, step=4)] == [("a", 2), ("a", 6)]  # iteration stops


def test_mixture_is_deterministic_and_covers_every_example_once():
    tasks = [Numbers("a", 50), Numbers("b", 7), Numbers("c", 23, start=3, step=2), Numbers("a2", 5)]
    mixture = TaskMixture(tasks)
    seen = [ident(mixture[i]) for i in range(len(mixture))]
    expected = [ident(c) for task in tasks for c in task]
    assert Counter(seen) == Counter(expected) and len(seen) == len(expected)
    assert seen == [ident(c) for c in TaskMixture(tasks)]  # same seed, same order
    assert seen != [ident(c) for c in TaskMixture(tasks, seed=1)]
    assert seen != expected  # actually shuffled
    assert {name for name, _ in seen[:len(seen) // 2]} == {"a", "b", "c", "a2"}  # interleaved, not in blocks
    for i in range(len(mixture)):
        t, j = mixture.locate(i)
        assert ident(tasks[t][j]) == seen[i]
    # listing a task twice oversamples it; slicing a mixture works like any task
    assert len(TaskMixture([tasks[1], tasks[1]])) == 14
    assert [ident(c) for c in TaskMixture(tasks, start=4, stop=10)] == seen[4:10]


def test_mixture_of_real_tasks():
    tasks = [ARC("ARC-Easy", "train", stop=40), GSM8K(split="train", stop=30), SpellingBee(size=20)]
    mixture = TaskMixture(tasks)
    as_json = lambda c: json.dumps(c, sort_keys=True)
    assert Counter(as_json(c) for c in mixture) == Counter(as_json(c) for task in tasks for c in task)


def test_sequence_is_concatenation():
    tasks = [Numbers("a", 3), Numbers("b", 0), Numbers("c", 4, start=1)]
    sequence = TaskSequence(tasks)
    assert [ident(c) for c in sequence] == [("a", 0), ("a", 1), ("a", 2), ("c", 1), ("c", 2), ("c", 3)]
    assert [ident(c) for c in TaskSequence(tasks, start=2, step=2)] == [("a", 2), ("c", 2)]


# --------------------------------------------------------------------------------------------- multiple choice

def test_render_mc():
    prompt = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    lines = prompt.split("\n")
    assert "What is 2+2?" in lines[0]
    assert lines[1:4] == ["- 3=A", "- 4=B", "- 5=C"]  # each letter glued to its choice
    assert "letter" in lines[-1]


def test_arc_agrees_with_raw_file_and_grades_letters():
    raw = raw_jsonl(CHAT / "arc" / "ARC-Challenge-Dev.jsonl.gz")
    task = ARC("ARC-Challenge", "validation")
    for i in [0, 17, len(raw) - 1]:
        conversation, row = task[i], raw[i]
        prompt = conversation["messages"][0]["content"]
        assert row["question"]["stem"] in prompt
        for choice in row["question"]["choices"]:
            assert f"- {choice['text']}={choice['label']}" in prompt
        answer = conversation["messages"][-1]["content"]
        assert answer == row["answerKey"]
        assert task.evaluate(conversation, answer)
        assert not any(task.evaluate(conversation, letter) for letter in conversation["letters"] if letter != answer)


def test_mmlu_agrees_with_raw_files_and_is_shuffled():
    task = MMLU("all", "dev")
    letters = ["A", "B", "C", "D"]
    raw = Counter((render_mc(r[0], letters, r[1:5]), r[5]) for r in raw_mmlu_rows("dev"))  # render_mc: tested above
    rendered = Counter()
    for conversation in task:
        answer = conversation["messages"][-1]["content"]
        rendered[(conversation["messages"][0]["content"], answer)] += 1
        assert task.evaluate(conversation, answer) and not task.evaluate(conversation, letters[(letters.index(answer) + 1) % 4])
    assert rendered == raw
    assert len({task[i]["subject"] for i in range(20)}) > 5  # a prefix is a mix of subjects, not one file


@pytest.mark.slow
def test_mmlu_auxiliary_train_offline_and_its_stand_in():
    with pytest.raises(RuntimeError, match="NANOCHAT_DATA_DIR"):
        MMLU("auxiliary_train", "train")
    stand_in = mmlu_training_set()
    assert len(stand_in) == len(raw_mmlu_rows("dev")) + len(raw_mmlu_rows("val"))
    assert_valid_conversation(stand_in[len(stand_in) - 1])


# --------------------------------------------------------------------------------------------- GSM8K

def test_gsm8k_tool_calls_round_trip_to_the_original_solution():
    raw = raw_jsonl(CHAT / "gsm8k" / "train.jsonl.gz")
    task = GSM8K(split="train")
    for i in range(len(raw)):
        conversation = task[i]
        assert conversation["messages"][0]["content"] == raw[i]["question"]
        assert unannotate(conversation["messages"][1]["content"]) == raw[i]["answer"]
    parts = task[0]["messages"][1]["content"]
    assert [p["type"] for p in parts][:3] == ["text", "python", "python_output"]


@pytest.mark.parametrize("reference, response, correct", [
    ("#### 72", "so the answer is #### 72", True),
    ("#### 72", "#### 72.", True),
    ("#### 72", "#### 72.0", True),
    ("#### 72", "#### 73", False),
    ("#### 72", "The answer is 72", False),  # no marker, no answer
    ("#### 1234", "#### 1,234", True),
    ("#### 1,234", "#### 1234", True),
    ("#### 1234", "#### 123", False),
    ("#### -7", "#### -7", True),
    ("#### -7", "#### 7", False),
    ("#### 2.5", "#### 2.50", True),
    ("#### 2.5", "#### 25", False),
    ("#### 18", "#### $18", True),
    ("#### 18", "#### 18\n#### 19", True),  # the first answer counts
])
def test_gsm8k_number_extraction(reference, response, correct):
    task = GSM8K(split="test", stop=1)
    assert task.evaluate(assistant_message(f"work...\n{reference}"), response) == correct


def test_gsm8k_grades_real_solutions():
    task = GSM8K(split="test")
    raw = raw_jsonl(CHAT / "gsm8k" / "test.jsonl.gz")
    for i in range(0, len(raw), 50):
        answer = raw[i]["answer"]
        assert task.evaluate(task[i], answer)
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        assert not task.evaluate(task[i], answer.rsplit("####", 1)[0] + f"#### {int(final) + 1}")


# --------------------------------------------------------------------------------------------- HumanEval

def test_humaneval_runs_the_tests():
    task = HumanEval()
    raw = raw_jsonl(CHAT / "humaneval" / "HumanEval.jsonl.gz")
    for i in [0, 38]:  # 38's prompt defines a helper the solution needs (encode_cyclic)
        conversation, row = task[i], raw[i]
        assert conversation["messages"][0]["content"] == row["prompt"]
        assert task.evaluate(conversation, row["canonical_solution"])  # body continuing the prompt
        fenced = f"Sure:\n```python\n{conversation['messages'][1]['content']}\n```\nHope it helps."
        assert task.evaluate(conversation, fenced)  # whole function in a code block, prose around it
        assert not task.evaluate(conversation, "    return None\n")
        assert not task.evaluate(conversation, "```python\nthis is not python\n```")


# --------------------------------------------------------------------------------------------- SmolTalk

def test_hh_dialogue_parsing():
    good = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:  Fine. "
    assert parse_hh_dialogue(good) == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                       {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]
    for bad in ["preamble\n\nHuman: a\n\nAssistant: b",  # text before the first turn
                "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",  # ends on the user
                "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",  # not alternating
                "\n\nAssistant: a\n\nHuman: b\n\nAssistant: c",  # starts with the assistant
                "\n\nHuman: a\n\nAssistant: ",  # empty turn
                "no turns at all"]:
        assert parse_hh_dialogue(bad) is None


def test_smoltalk_offline_stand_in_splits_the_dialogues():
    raw = raw_jsonl(CHAT / "instruct" / "hh-rlhf_harmless-base_test.jsonl.gz")
    parsed = [parse_hh_dialogue(row["chosen"]) for row in raw]
    train, test = SmolTalk("train"), SmolTalk("test")
    assert [c["messages"] for c in test] == [m for i, m in enumerate(parsed) if m is not None and i % 10 == 0]
    assert len(train) + len(test) == sum(m is not None for m in parsed) > 0.9 * len(raw)


# --------------------------------------------------------------------------------------------- spelling

def test_spellingbee_examples_are_right_and_deterministic():
    task = SpellingBee(size=200, split="train")
    questions = []
    for i in range(len(task)):
        conversation = task[i]
        parts = conversation["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        word, letter = re.fullmatch(r'"([a-z]+)"\.count\("([a-z])"\)', call).groups()
        count = sum(char == letter for char in word)
        assert eval(call, {"__builtins__": {}}) == count  # the tool call computes what the output says
        assert next(p["text"] for p in parts if p["type"] == "python_output") == str(count)
        assert f"{word}:{','.join(word)}" in parts[0]["text"]  # spelled out
        question = conversation["messages"][0]["content"]
        assert word in question and letter in question
        questions.append(question.replace(word, "W"))
        assert task.evaluate(conversation, f"blah 99 blah. #### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
        assert not task.evaluate(conversation, "I don't know")
    assert len({q.split()[0] for q in questions}) >= 5  # varied phrasings
    assert task[7] == SpellingBee(size=200, split="train")[7]  # deterministic per index
    test = SpellingBee(size=200, split="test")
    assert sum(task[i] != test[i] for i in range(20)) >= 18  # train and test draw differently


def test_simple_spelling():
    task = SimpleSpelling(size=50, split="train")
    for conversation in task:
        word = conversation["messages"][0]["content"].rsplit(" ", 1)[1]
        answer = conversation["messages"][1]["content"]
        assert answer == word + ":" + ",".join(word)
        assert task.evaluate(conversation, answer) and not task.evaluate(conversation, word)
    assert task[3] == SimpleSpelling(size=50, split="train")[3]


def test_word_list_download_failure_names_the_offline_fix(monkeypatch, base_dir):
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    with FileServer({}) as server:  # answers 404: not retried
        monkeypatch.setattr("tasks.spellingbee.WORD_LIST_URL", f"{server.url}/words_alpha.txt")
        with pytest.raises(RuntimeError, match="NANOCHAT_DATA=embedded"):
            SpellingBee(size=10)
    assert server.requests == {"words_alpha.txt": 1}


# --------------------------------------------------------------------------------------------- CustomJSON

def test_customjson_formats_and_errors(tmp_path):
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanochat."}]
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps({"messages": chat[:1] + chat[1:]}) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[0] == task[1] == {"messages": chat}

    path.write_text(json.dumps(chat) + "\n\n" + json.dumps(chat[::-1]) + "\n")  # line 3: assistant first
    with pytest.raises(ValueError, match="line 3"):
        CustomJSON(str(path))
    path.write_text(json.dumps(chat) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        CustomJSON(str(path))
    with pytest.raises(FileNotFoundError, match="identity_conversations"):
        CustomJSON(str(tmp_path / "missing.jsonl"))
