"""nanochat/pipeline.py: a re-run pipeline skips finished stages, resumes interrupted ones, skips evaluations of an
unchanged result, and redoes what follows a stage that was trained again."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from nanochat import pipeline
from nanochat.checkpoint_manager import meta_path, save_checkpoint


def save(base_dir, stage_dir, step, finished, optimizer=True, **meta):
    save_checkpoint(str(base_dir / stage_dir / "d2"), step, {"w": torch.ones(1)}, {"m": torch.ones(1)} if optimizer else None,
                    {"step": step, "finished": finished, **meta})


def run_cli(*args):
    command = [sys.executable, "-c", "import sys; print('trained with', sys.argv[1:])", "--depth=2"]
    return subprocess.run([sys.executable, "-m", "nanochat.pipeline", *args, *command], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_a_stage_runs_fresh_resumes_when_interrupted_and_skips_when_finished(base_dir, capsys):
    checkpoint_dir = str(base_dir / "chatsft_checkpoints" / "d2")
    result = run_cli("sft", "d2")  # nothing saved yet: the command as given
    assert result.returncode == 0 and result.stdout == "trained with ['--depth=2']\n"

    for step in (2, 4):
        save(base_dir, "chatsft_checkpoints", step, finished=False)
    save(base_dir, "chatsft_checkpoints", 6, finished=True)
    os.remove(meta_path(checkpoint_dir, 6))  # being saved: no meta yet
    result = run_cli("sft", "d2")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"sft d2: resuming from step 4 of {checkpoint_dir}",
                                          "trained with ['--depth=2', '--resume-from-step=4']"]

    save(base_dir, "chatsft_checkpoints", 6, finished=True)  # (no command to run: in-process from here)
    assert pipeline.main(["sft", "d2", "train"]) == 0
    assert capsys.readouterr().out == f"sft d2: finished at step 6 in {checkpoint_dir}, skipping it\n"

    # Neither finished nor resumable (no optimizer state): say so instead of guessing
    save(base_dir, "chatsft_checkpoints", 8, finished=False, optimizer=False)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["sft", "d2", "train"])
    assert exit_info.value.code == 1 and capsys.readouterr().err.splitlines() == [
        f"python -m nanochat.pipeline: error: Step 8 in {checkpoint_dir} is neither the end of a run nor resumable "
        f"(it has no optimizer state): delete {checkpoint_dir} to train that stage again"]


def evaluate(tmp_path, stage, *extra, status=0):
    """Run the runner on an evaluation that appends a line to tmp_path/runs.txt -> (exit status, runs so far)."""
    script = f"open({str(tmp_path / 'runs.txt')!r}, 'a').write('run\\n'); raise SystemExit({status})"
    code = pipeline.main(["--evaluates", stage, "d2", sys.executable, "-c", script, *extra])
    runs = (tmp_path / "runs.txt").read_text().count("run") if (tmp_path / "runs.txt").exists() else 0
    return code, runs


def test_an_evaluation_is_skipped_when_its_checkpoint_is_unchanged(base_dir, tmp_path, capsys):
    save(base_dir, "base_checkpoints", 4, finished=True, val_bpb=1.5)
    assert evaluate(tmp_path, "base") == (0, 1)
    assert evaluate(tmp_path, "base") == (0, 1)  # the same command on the same checkpoint: done
    assert "base d2 (evaluation): done before on base d2 step 4 (" in capsys.readouterr().out
    assert evaluate(tmp_path, "base", "--max-per-task=8") == (0, 2)  # another command
    assert evaluate(tmp_path, "base", "--fail", status=3) == (3, 3)  # failed: not done, so it runs again
    assert evaluate(tmp_path, "base", "--fail", status=3) == (3, 4)

    save(base_dir, "base_checkpoints", 4, finished=True, val_bpb=1.4)  # the stage was trained again (same step)
    assert evaluate(tmp_path, "base") == (0, 5)
    save(base_dir, "base_checkpoints", 6, finished=True)  # ... or further
    assert evaluate(tmp_path, "base") == (0, 6)
    assert evaluate(tmp_path, "base") == (0, 6)
    assert evaluate(tmp_path, "sft") == (0, 7)  # nothing to evaluate yet: runs (and fails in its own words), not recorded
    assert evaluate(tmp_path, "sft") == (0, 8)


def test_a_stage_trained_on_a_replaced_result_is_moved_aside_and_trained_again(base_dir, capsys):
    save(base_dir, "base_checkpoints", 4, finished=True, val_bpb=1.5)
    command = ["python", "-m", "scripts.chat_sft"]
    assert pipeline.train("sft", "d2", command, print) == command  # fresh, on base d2 step 4
    save(base_dir, "chatsft_checkpoints", 10, finished=True)
    assert pipeline.train("sft", "d2", command, print) is None  # finished
    assert pipeline.train("rl", "d2", command, print) == command
    save(base_dir, "chatrl_checkpoints", 2, finished=False)

    save(base_dir, "base_checkpoints", 4, finished=True, val_bpb=1.4)  # base d2 trained again
    capsys.readouterr()
    assert pipeline.train("sft", "d2", command, print) == command  # on the new base: from scratch
    moved = [path for path in (base_dir / "replaced" / "chatsft_checkpoints").iterdir()]
    assert len(moved) == 1 and moved[0].name.startswith("d2.") and (moved[0] / "meta_000010.json").exists()
    assert not (base_dir / "chatsft_checkpoints" / "d2").exists()
    assert f"moved {base_dir / 'chatsft_checkpoints' / 'd2'} to {moved[0]}" in capsys.readouterr().out
    save(base_dir, "chatsft_checkpoints", 10, finished=True, val_bpb=2.0)  # SFT trained again: RL's start is gone too
    assert pipeline.train("rl", "d2", command, print) == command  # (was interrupted: no resume on the old SFT)
    assert (base_dir / "replaced" / "chatrl_checkpoints").is_dir()


def test_checkpoints_made_without_the_runner_count_as_current(base_dir):
    save(base_dir, "base_checkpoints", 4, finished=True)
    save(base_dir, "chatsft_checkpoints", 6, finished=False)
    assert pipeline.train("sft", "d2", ["train"], print) == ["train", "--resume-from-step=6"]


def test_the_tokenizer_is_a_stage_too(base_dir, tmp_path, tiny_tokenizer):
    assert pipeline.train("tok", "-", ["tok_train"], print) == ["tok_train"]
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    assert pipeline.train("tok", "-", ["tok_train"], print) is None
    assert evaluate(tmp_path, "tok") == (0, 1) and evaluate(tmp_path, "tok") == (0, 1)
    assert pipeline.train("base", "d2", ["base_train"], print) == ["base_train"]
