"""
The embedded sample (data/): every stage of the CPU demo finds what it needs there, offline; it is what
dev/make_embedded_data.py derives from the full data tree; its CORE rows are the full bundle's.
"""
import filecmp
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED_DATA, needs_shared_data
from nanochat import core_eval, dataset

EMBEDDED = REPO_ROOT / "data"
DEMO_MAX_PER_TASK = 50  # runs/runcpu.sh: base_eval --max-per-task=50


@pytest.fixture
def embedded(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")


def test_every_stage_finds_its_data_in_the_sample(embedded):
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON, default_identity_path
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU, mmlu_training_set
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SpellingBee

    assert dataset.get_data_dir() == str(EMBEDDED / "pretrain")
    assert len(list(dataset.iter_row_groups("val"))) >= 2  # a row group for each of 2 ranks
    bundle = core_eval.get_eval_bundle_dir()
    assert bundle == str(EMBEDDED / "eval_bundle")
    tasks = [t for t in core_eval.load_core_tasks(bundle) if os.path.exists(t["path"])]
    assert len(tasks) == 18
    for task in tasks:  # the demo's slice (bigbench_repeat_copy_logic has only 32 rows in all)
        assert len(core_eval.load_task_data(task["path"])) >= min(DEMO_MAX_PER_TASK, 32), task["label"]
    chat_tasks = [ARC(subset, split) for subset in ("ARC-Easy", "ARC-Challenge") for split in ("train", "test")]
    chat_tasks += [MMLU("all", split) for split in ("dev", "val", "test")] + [GSM8K(split=s) for s in ("train", "test")]
    chat_tasks += [HumanEval(), SmolTalk("train"), SmolTalk("test"), CustomJSON(default_identity_path())]
    chat_tasks += [mmlu_training_set(), SpellingBee(size=DEMO_MAX_PER_TASK)]  # no hub attempt: nothing is downloaded
    assert all(len(task) >= DEMO_MAX_PER_TASK for task in chat_tasks)  # chat_eval --max-problems=50

@needs_shared_data
@pytest.mark.parametrize("max_per_task", [8, DEMO_MAX_PER_TASK, 100])
def test_core_rows_are_those_of_the_full_bundle(max_per_task):
    """Stored in draw order: any --max-per-task up to 100 evaluates the full bundle's examples (few-shot included)."""
    for task in core_eval.load_core_tasks(str(EMBEDDED / "eval_bundle")):
        if os.path.exists(task["path"]):
            full = os.path.join(SHARED_DATA, "eval_bundle", os.path.relpath(task["path"], EMBEDDED / "eval_bundle"))
            assert core_eval.load_task_data(task["path"], max_per_task) == core_eval.load_task_data(full, max_per_task)


@needs_shared_data
@pytest.mark.slow  # reads and writes ~9 MB
def test_make_embedded_data_reproduces_the_sample(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dev.make_embedded_data", "--source", str(SHARED_DATA),
                             "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(str(p.relative_to(EMBEDDED)) for p in EMBEDDED.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    assert made == shipped
    _, mismatch, errors = filecmp.cmpfiles(EMBEDDED, tmp_path, made, shallow=False)
    assert mismatch == [] and errors == []
