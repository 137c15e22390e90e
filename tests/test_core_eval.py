"""CORE: prompt rendering, scoring rules, batched == simple path, the partial-bundle label, end to end."""
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from nanochat import core_eval
from nanochat.checkpoint_manager import save_checkpoint
from conftest import REPO_ROOT, TEST_DATA, run_torchrun
from helpers import tiny_gpt

BUNDLE = TEST_DATA / "eval_bundle"
COPA = [  # the first rows of eval_data/commonsense_reasoning/copa.jsonl
    {"query": "The man turned on the faucet, therefore", "gold": 1,
     "choices": ["the toilet filled with water.", "water flowed from the spout."]},
    {"query": "The girl found a bug in her cereal, therefore", "gold": 1,
     "choices": ["she poured milk in the bowl.", "she lost her appetite."]},
]
WINOGRAD = [  # eval_data/language_understanding/winograd_wsc.jsonl
    {"context_options": ["The city councilmen refused the demonstrators a permit because the city councilmen",
                         "The city councilmen refused the demonstrators a permit because the demonstrators"],
     "continuation": "feared violence.", "gold": 0},
    {"context_options": ["The city councilmen refused the demonstrators a permit because the city councilmen",
                         "The city councilmen refused the demonstrators a permit because the demonstrators"],
     "continuation": "advocated violence.", "gold": 1},
]
WIKIDATA = [  # eval_data/world_knowledge/bigbench_qa_wikidata.jsonl
    {"context": "The native language of Daniel Schneidermann is", "continuation": "French"},
    {"context": "The country of Novosibirsk is", "continuation": "Russia"},
]
# One task of each type, plus multi-token and single-token ("A".."D") multiple choice.
SLICE_TASKS = ["arc_easy", "commonsense_qa", "copa", "winograd", "lambada_openai", "bigbench_qa_wikidata"]


def test_render_multiple_choice_one_shot():
    prompts = core_eval.render_multiple_choice(COPA[1], " ", fewshot=[COPA[0]])
    assert prompts == [
        "The man turned on the faucet, therefore water flowed from the spout.\n\n"
        "The girl found a bug in her cereal, therefore she poured milk in the bowl.",
        "The man turned on the faucet, therefore water flowed from the spout.\n\n"
        "The girl found a bug in her cereal, therefore she lost her appetite.",
    ]
    assert core_eval.render_multiple_choice(COPA[0], "\nAnswer: ", fewshot=[]) == [
        "The man turned on the faucet, therefore\nAnswer: the toilet filled with water.",
        "The man turned on the faucet, therefore\nAnswer: water flowed from the spout.",
    ]


def test_render_schema_one_shot():
    prompts = core_eval.render_schema(WINOGRAD[1], " ", fewshot=[WINOGRAD[0]])
    assert prompts == [
        "The city councilmen refused the demonstrators a permit because the city councilmen feared violence.\n\n"
        "The city councilmen refused the demonstrators a permit because the city councilmen advocated violence.",
        "The city councilmen refused the demonstrators a permit because the city councilmen feared violence.\n\n"
        "The city councilmen refused the demonstrators a permit because the demonstrators advocated violence.",
    ]


def test_render_language_modeling_one_shot():
    context, full = core_eval.render_language_modeling(WIKIDATA[1], " ", fewshot=[WIKIDATA[0]])
    assert full == "The native language of Daniel Schneidermann is French\n\nThe country of Novosibirsk is Russia"
    assert context == "The native language of Daniel Schneidermann is French\n\nThe country of Novosibirsk is"
    context, full = core_eval.render_language_modeling(WIKIDATA[0], "\nAnswer: ", fewshot=[])
    assert (context, full) == ("The native language of Daniel Schneidermann is\nAnswer:",
                               "The native language of Daniel Schneidermann is\nAnswer: French")


def test_fewshot_draw_is_fixed_and_excludes_the_example():
    draws = [core_eval.fewshot_indices(50, idx, 10) for idx in range(50)]
    assert draws == [core_eval.fewshot_indices(50, idx, 10) for idx in range(50)]  # same every time
    for idx, draw in enumerate(draws):
        assert len(set(draw)) == 10 and idx not in draw and all(0 <= i < 50 for i in draw)
    assert len({tuple(d) for d in draws}) > 40  # each example gets its own draw
    assert sorted(core_eval.fewshot_indices(4, 2, 10)) == [0, 1, 3]  # capped at the other examples


def test_prepare_example_spans_and_truncation(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    meta = {"task_type": "multiple_choice", "num_fewshot": 1, "continuation_delimiter": " "}
    rows, starts, gold = core_eval.prepare_example(tiny_tokenizer, COPA, 1, meta, max_len=1000)
    assert gold == 1 and rows[0][0] == bos and starts[0] == starts[1]
    assert rows[0][:starts[0]] == rows[1][:starts[1]]
    for row, prompt in zip(rows, core_eval.render_multiple_choice(COPA[1], " ", [COPA[0]])):
        assert tiny_tokenizer.decode(row[1:]) == prompt

    meta = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
    rows, starts, _ = core_eval.prepare_example(tiny_tokenizer, WINOGRAD, 0, meta, max_len=1000)
    assert [tiny_tokenizer.decode(row[start:]) for row, start in zip(rows, starts)] == [" feared violence."] * 2

    meta = {"task_type": "language_modeling", "num_fewshot": 1, "continuation_delimiter": " "}
    rows, starts, gold = core_eval.prepare_example(tiny_tokenizer, WIKIDATA, 1, meta, max_len=1000)
    assert gold is None and tiny_tokenizer.decode(rows[0][starts[0]:]) == " Russia"

    # Too long: cropped from the left after BOS, the same amount in every row; the continuation survives.
    meta = {"task_type": "multiple_choice", "num_fewshot": 1, "continuation_delimiter": " "}
    full_rows, full_starts, _ = core_eval.prepare_example(tiny_tokenizer, COPA, 1, meta, max_len=1000)
    max_len = max(len(row) for row in full_rows) - 5
    rows, starts, _ = core_eval.prepare_example(tiny_tokenizer, COPA, 1, meta, max_len=max_len)
    assert max(len(row) for row in rows) == max_len
    for row, start, full_row, full_start in zip(rows, starts, full_rows, full_starts):
        assert row[0] == bos and row[1:] == full_row[6:] and row[start:] == full_row[full_start:]


def test_centered_accuracy_and_label():
    assert core_eval.centered_accuracy(0.25, 25) == 0.0  # random guessing
    assert core_eval.centered_accuracy(1.0, 25) == 1.0
    assert core_eval.centered_accuracy(0.625, 25) == pytest.approx(0.5)  # (0.625 - 0.25) / 0.75
    assert core_eval.centered_accuracy(0.3, 0) == pytest.approx(0.3)  # LM tasks: no baseline
    assert core_eval.core_label(18, 22) == "CORE (18/22 tasks)"
    assert core_eval.core_label(22, 22) == "CORE"


def test_local_bundle_tasks_and_v1_baselines():
    tasks = {t["label"]: t for t in core_eval.load_core_tasks(str(BUNDLE))}
    assert len(tasks) == 22 and sum(os.path.exists(t["path"]) for t in tasks.values()) == 18
    assert not os.path.exists(tasks["hellaswag"]["path"]) and not os.path.exists(tasks["squad"]["path"])
    with open(BUNDLE / "eval_meta_data.csv", encoding="utf-8") as f:
        csv_baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    assert all(t["random_baseline"] == csv_baselines[label] for label, t in tasks.items())
    assert tasks["commonsense_qa"]["random_baseline"] == 20  # v1 (DCLM's 2025 file says 40.3)
    assert tasks["piqa"]["continuation_delimiter"] == "\nAnswer: " and tasks["arc_easy"]["num_fewshot"] == 10


# ---------------------------------------------------------------------------------------------------
# Models: mocks with known answers, and a tiny random GPT

class LogitsModel(torch.nn.Module):
    """A stand-in model: logits from a rule on the token ids, no weights. Ignores any KV cache."""

    def __init__(self, vocab_size, next_token=None):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=100_000, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.vocab_size = vocab_size
        self.next_token = next_token or {}

    def forward(self, ids, kv_cache=None, logit_positions=None):
        logits = torch.zeros(ids.size(0), ids.size(1), self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 30.0
        return logits if logit_positions is None else logits[logit_positions]


def oracle_model(tokenizer, data, task_meta):
    """All probability on the next token of the example's gold prompt wherever the input is a prefix of it."""
    next_token = {}
    for idx, item in enumerate(data):
        fewshot = [data[i] for i in core_eval.fewshot_indices(len(data), idx, task_meta["num_fewshot"])]
        delimiter = task_meta["continuation_delimiter"]
        if task_meta["task_type"] == "multiple_choice":
            gold_prompt = core_eval.render_multiple_choice(item, delimiter, fewshot)[item["gold"]]
        elif task_meta["task_type"] == "schema":
            gold_prompt = core_eval.render_schema(item, delimiter, fewshot)[item["gold"]]
        else:
            gold_prompt = core_eval.render_language_modeling(item, delimiter, fewshot)[1]
        row = tokenizer.encode(gold_prompt, prepend=tokenizer.get_bos_token_id())
        next_token.update({tuple(row[:t + 1]): row[t + 1] for t in range(len(row) - 1)})
    return LogitsModel(tokenizer.get_vocab_size(), next_token)


def load_slice(label, n):
    task = next(t for t in core_eval.load_core_tasks(str(BUNDLE)) if t["label"] == label)
    return task, core_eval.load_task_data(task["path"], n)


@pytest.mark.parametrize("label", ["copa", "commonsense_qa", "winograd", "bigbench_qa_wikidata"])
def test_model_given_the_answers_scores_one(tiny_tokenizer, label):
    task, data = load_slice(label, 4)
    task = {**task, "num_fewshot": min(task["num_fewshot"], 2)}  # short prompts keep the mock fast
    oracle = oracle_model(tiny_tokenizer, data, task)
    assert core_eval.evaluate_task(oracle, tiny_tokenizer, data, "cpu", task, per_example=True) == 1.0
    assert core_eval.evaluate_task(oracle, tiny_tokenizer, data, "cpu", task, share_prefix=False, batch_size=3) == 1.0


@pytest.mark.parametrize("label", ["copa", "commonsense_qa", "winograd", "bigbench_qa_wikidata"])
def test_uniform_model_picks_the_first_choice(tiny_tokenizer, label):
    """Equal losses are a tie, and ties go to the first choice in every path; LM needs real argmax hits."""
    task, data = load_slice(label, 6)
    task = {**task, "num_fewshot": min(task["num_fewshot"], 2)}
    expected = 0.0 if task["task_type"] == "language_modeling" else sum(item["gold"] == 0 for item in data) / len(data)
    uniform = LogitsModel(tiny_tokenizer.get_vocab_size())
    for kwargs in [dict(per_example=True), dict(share_prefix=False), dict(share_prefix=True)]:
        assert core_eval.evaluate_task(uniform, tiny_tokenizer, data, "cpu", task, **kwargs) == expected


@pytest.mark.slow
def test_batched_paths_match_the_simple_path(tiny_tokenizer):
    """Same rows, same decisions: one forward per example vs packed batches vs a shared prefix + KV cache."""
    model = tiny_gpt(tiny_tokenizer.get_vocab_size())
    pad = tiny_tokenizer.get_bos_token_id()
    truncated = 0
    for label in SLICE_TASKS:
        task, data = load_slice(label, 6)
        examples = [core_eval.prepare_example(tiny_tokenizer, data, i, task, model.config.sequence_len + 1)
                    for i in range(len(data))]
        truncated += sum(max(len(r) for r in rows) == model.config.sequence_len + 1 for rows, _, _ in examples)
        simple = [core_eval.forward_rows(model, rows, starts, pad, "cpu") for rows, starts, _ in examples]
        simple_correct = [core_eval.is_correct(task["task_type"], *out, gold) for out, (_, _, gold) in zip(simple, examples)]
        for share_prefix in (False, True):
            batched = core_eval.score_examples_batched(model, examples, task["task_type"], pad, "cpu", 5, share_prefix)
            assert batched == simple_correct, (label, share_prefix)
        if task["task_type"] == "multiple_choice":
            for (rows, starts, _), (losses, hits) in zip(examples, simple):
                shared_losses, shared_hits = core_eval.forward_shared_prefix(model, rows, starts[0], pad, "cpu")
                assert shared_losses == pytest.approx(losses, rel=1e-4) and shared_hits == hits
        assert core_eval.evaluate_task(model, tiny_tokenizer, data, "cpu", task) == sum(simple_correct) / len(data)
    assert truncated > 0  # the 10-shot prompts exceed this model's 128 tokens


def make_partial_bundle(root, labels, rows_per_task):
    """A copy of the local bundle's metadata with only a few short task files."""
    shutil.copy(BUNDLE / "core.yaml", root / "core.yaml")
    shutil.copy(BUNDLE / "eval_meta_data.csv", root / "eval_meta_data.csv")
    for task in core_eval.load_core_tasks(str(BUNDLE)):
        if task["label"] in labels:
            relative = os.path.relpath(task["path"], BUNDLE)
            os.makedirs(root / os.path.dirname(relative), exist_ok=True)
            with open(task["path"], encoding="utf-8") as src, open(root / relative, "w", encoding="utf-8") as dst:
                dst.writelines(src.readlines()[:rows_per_task])
    return root


def test_partial_bundle_is_labelled_and_warned_once(tiny_tokenizer, tmp_path, caplog):
    labels = ["copa", "winograd", "bigbench_operators"]
    bundle = make_partial_bundle(tmp_path, labels, rows_per_task=4)
    model = tiny_gpt(tiny_tokenizer.get_vocab_size())
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        out = core_eval.evaluate_core(model, tiny_tokenizer, "cpu", bundle_dir=str(bundle))
        again = core_eval.evaluate_core(model, tiny_tokenizer, "cpu", bundle_dir=str(bundle))
    assert caplog.text.count("lacks 19 CORE task files") == 1
    assert out["label"] == "CORE (3/22 tasks)" and len(out["missing_tasks"]) == 19
    assert sorted(out["results"]) == sorted(labels) and again["results"] == out["results"]
    baselines = {"copa": 50, "winograd": 50, "bigbench_operators": 0}
    centered = [(out["results"][t] - baselines[t] / 100) / (1 - baselines[t] / 100) for t in labels]
    assert out["core_metric"] == pytest.approx(sum(centered) / 3)


@pytest.mark.slow
def test_base_eval_script_end_to_end(tiny_tokenizer, base_dir):
    """A tiny random model through scripts.base_eval on the local 18-task bundle."""
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = tiny_gpt(tiny_tokenizer.get_vocab_size())
    meta = {"step": 7, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 7, model.state_dict(), None, meta)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--max-per-task=3", "--device-type=cpu"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CORE (18/22 tasks)" in result.stdout
    with open(base_dir / "base_eval" / "base_d2_000007.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["task", "accuracy", "centered"] and len(rows) == 1 + 18 + 1
    assert rows[-1][0] == "CORE (18/22 tasks)"
    centered = [float(row[2]) for row in rows[1:-1]]
    assert float(rows[-1][2]) == pytest.approx(sum(centered) / 18, abs=1e-5)
    assert all(math.isclose(float(row[1]) * 3, round(float(row[1]) * 3), abs_tol=1e-5) for row in rows[1:-1])  # k/3
    section = (base_dir / "report" / "base-model-evaluation.md").read_text()
    assert "CORE (18/22 tasks)" in section and "arc_easy" in section


@pytest.mark.slow
def test_evaluate_task_sums_over_ranks(tiny_tokenizer, tmp_path):
    """Two gloo ranks split the examples (r, r+2, ...) and all-reduce the counts: same accuracy as one process."""
    tiny_tokenizer.save(str(tmp_path / "tok"))
    task, data = load_slice("copa", 7)
    (tmp_path / "data.json").write_text(json.dumps({"task": task, "data": data}))
    script = tmp_path / "dist_core.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from nanochat.common import compute_init, compute_cleanup
        from nanochat.core_eval import evaluate_task
        from nanochat.tokenizer import RustBPETokenizer
        from helpers import tiny_gpt
        _, rank, _, _, _ = compute_init("cpu")
        tokenizer = RustBPETokenizer.from_directory({str(tmp_path / "tok")!r})
        spec = json.load(open({str(tmp_path / "data.json")!r}))
        accuracy = evaluate_task(tiny_gpt(tokenizer.get_vocab_size()), tokenizer, spec["data"], "cpu", spec["task"])
        print(f"RANK {{rank}} ACC {{accuracy!r}}")
        compute_cleanup()
    """))
    returncode, output = run_torchrun(script, timeout=240)
    assert returncode == 0, output[-3000:]
    single = core_eval.evaluate_task(tiny_gpt(tiny_tokenizer.get_vocab_size()), tiny_tokenizer, data, "cpu", task)
    assert f"RANK 0 ACC {single!r}" in output and f"RANK 1 ACC {single!r}" in output
