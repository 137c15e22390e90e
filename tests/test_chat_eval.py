"""
ChatCORE (tasks/chatcore.py) and scripts/chat_eval.py: the categorical eval reads the right logits,
ChatCORE centres by the random baselines, and the whole script runs every task end to end,
single-process and under torchrun (2 ranks, gloo) with identical counts.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, run_torchrun
from helpers import MODEL_TAG, make_tiny_checkpoint

import scripts.chat_eval as chat_eval
from tasks.chatcore import TASKS, run_categorical_eval, chatcore


class AnswerAfterPromptModel:
    """
    Logits favour `answer_id` only at positions holding <|assistant_start|> (the last prompt token of
    render_for_completion) and `decoy_id` everywhere else, including the padding. An eval that reads any
    position but each row's own last prompt token picks the decoy.
    """

    def __init__(self, vocab_size, trigger_id, answer_id, decoy_id):
        self.vocab_size, self.trigger_id, self.answer_id, self.decoy_id = vocab_size, trigger_id, answer_id, decoy_id

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        at_trigger = ids == self.trigger_id
        logits[..., self.decoy_id] = torch.where(at_trigger, 0.0, 5.0)
        logits[..., self.answer_id] = torch.where(at_trigger, 5.0, 0.0)
        return logits


def test_categorical_accuracy_is_fraction_of_gold_letter(tiny_tokenizer):
    from tasks.mmlu import MMLU
    task = MMLU(subset="all", split="test", data_dir=str(TEST_DATA))
    num_problems = 23  # batch size 5: the last batch is partial; prompts differ in length, so rows are padded
    golds = [task[i]["messages"][-1]["content"] for i in range(num_problems)]
    letter_id = {letter: tiny_tokenizer.encode(letter)[0] for letter in "ABCD"}
    trigger_id = tiny_tokenizer.encode_special("<|assistant_start|>")
    accuracies = {}
    for answer, decoy in [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")]:
        model = AnswerAfterPromptModel(tiny_tokenizer.get_vocab_size(), trigger_id, letter_id[answer], letter_id[decoy])
        num_correct, num_evaluated = run_categorical_eval(task, tiny_tokenizer, model, batch_size=5,
                                                                    max_problems=num_problems)
        assert num_evaluated == num_problems
        assert num_correct == sum(gold == answer for gold in golds)
        accuracies[answer] = num_correct / num_evaluated
    assert sum(accuracies.values()) == pytest.approx(1.0)  # every problem has exactly one gold letter
    assert len({g for g in golds}) > 1  # the sample mixes letters, so the per-letter counts are informative


def test_chatcore_centres_by_random_baseline():
    accuracies = {"ARC-Easy": 0.40, "MMLU": 0.25, "GSM8K": 0.10}
    label, value = chatcore(accuracies)
    assert label == "ChatCORE (3/6 tasks)"
    assert value == pytest.approx(((0.40 - 0.25) / 0.75 + 0.0 + 0.10) / 3)
    label, value = chatcore({name: 1.0 for name in TASKS})
    assert (label, value) == ("ChatCORE", pytest.approx(1.0))
    # a score on the first problems of each task says so (chat_sft's in-training figure, chat_eval on a CPU)
    assert chatcore(accuracies, subset="first 50 problems per task")[0] == "ChatCORE (3/6 tasks; first 50 problems per task)"
    assert chatcore({name: 1.0 for name in TASKS}, subset="first 4 problems")[0] == "ChatCORE (first 4 problems)"


def test_parse_task_names_rejects_unknown():
    assert chat_eval.parse_task_names("ARC-Easy|GSM8K") == ["ARC-Easy", "GSM8K"]
    assert chat_eval.parse_task_names("") == list(TASKS)
    with pytest.raises(SystemExit, match="Unknown task"):
        chat_eval.parse_task_names("ARC-Easy,Hellaswag")


# ---------------------------------------------------------------------------------------------------
# End to end: the script against a tiny random model saved as an SFT checkpoint

RESULT_RE = re.compile(r"^([\w-]+): (\d+)/(\d+) = [\d.]+% ", re.MULTILINE)
COMMON_ARGS = ["-i", "sft", "--device-type=cpu", "--max-problems=4", "--max-new-tokens=8"]


def run_chat_eval(base_dir, args, nproc=1):
    env = {"NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA)}
    if nproc > 1:
        returncode, output = run_torchrun("-m", "scripts.chat_eval", *args, nproc=nproc, env=env)
    else:  # a tiny model on a shared CPU: extra threads only add contention
        result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", *args], cwd=REPO_ROOT, capture_output=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **env}, text=True, timeout=300)
        returncode, output = result.returncode, result.stdout + result.stderr
    assert returncode == 0, f"chat_eval failed:\n{output[-4000:]}"
    return output, {name: (int(c), int(n)) for name, c, n in RESULT_RE.findall(output)}


@pytest.fixture(scope="module")
def sft_base_dir(tmp_path_factory, tiny_tokenizer):
    base_dir = tmp_path_factory.mktemp("chat_eval_base")
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"])
    return base_dir


@pytest.fixture(scope="module")
def single_process_run(sft_base_dir):
    return run_chat_eval(sft_base_dir, COMMON_ARGS)


@pytest.mark.slow
def test_chat_eval_all_tasks_report_accuracy_and_chatcore(sft_base_dir, single_process_run):
    output, counts = single_process_run
    assert set(counts) == set(TASKS)
    assert all(n == 4 and 0 <= c <= n for c, n in counts.values()), counts
    baselines = {name: baseline for name, (_, baseline) in TASKS.items()}
    expected = sum((c / n - baselines[name]) / (1 - baselines[name]) for name, (c, n) in counts.items()) / len(counts)
    label = "ChatCORE (first 4 problems per task)"  # --max-problems=4: the label says the score is on a subset
    printed = float(re.search(rf"^{re.escape(label)}: (-?[\d.]+)$", output, re.MULTILINE).group(1))
    assert printed == pytest.approx(expected, abs=1e-4)

    with open(sft_base_dir / "report" / "chat-evaluation-sft.json") as f:
        report = json.load(f)
    assert report["section"] == "Chat evaluation sft"
    metrics = next(item for item in report["data"] if label in item)
    assert metrics[label] == pytest.approx(expected, abs=1e-4)
    assert {name: metrics[name] for name in counts} == pytest.approx({name: c / n for name, (c, n) in counts.items()})
    assert any(item.get("model_tag") == MODEL_TAG for item in report["data"])


@pytest.mark.slow
def test_chat_eval_torchrun_matches_single_process(sft_base_dir, single_process_run):
    """Two ranks split the problems (r, r+2, ...) and all-reduce the counts: same totals as one process."""
    tasks = ["ARC-Easy", "MMLU", "GSM8K"]
    output, counts = run_chat_eval(sft_base_dir, [*COMMON_ARGS, "-a", ",".join(tasks)], nproc=2)
    assert counts == {name: single_process_run[1][name] for name in tasks}
    assert "ChatCORE (3/6 tasks; first 4 problems per task):" in output
