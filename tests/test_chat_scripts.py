"""chat_cli and chat_web run for real (subprocesses): a missing or damaged checkpoint is one line, not a traceback;
a terminal chat keeps going past the model's context."""
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from helpers import MODEL_TAG, make_tiny_checkpoint
from nanochat.checkpoint_manager import model_path, save_checkpoint
from nanochat.gpt import GPTConfig, build_gpt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each run starts an interpreter that imports torch


def run_script(module, *args, stdin="", timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, "-i", "sft", "--device-type", "cpu", *args], input=stdin,
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage", ["no checkpoint", "damaged model file"])
@pytest.mark.parametrize("script", ["chat_web", "chat_cli"])
def test_checkpoint_problems_are_one_line(script, damage, tiny_tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)  # (the isolated test environment restores it)
    if damage == "no checkpoint":
        expected = f"No sft checkpoints in {base_dir / 'chatsft_checkpoints'}"
    else:
        make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"])
        path = model_path(str(base_dir / "chatsft_checkpoints" / MODEL_TAG), 0)
        os.truncate(path, os.path.getsize(path) // 2)  # a copy cut short
        expected = f"Checkpoint file {path} cannot be read"
    result = run_script(f"scripts.{script}", "--port", "0") if script == "chat_web" else run_script(f"scripts.{script}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{script}.py: error: {expected}"), result.stderr


def test_terminal_chat_keeps_going_past_the_context(tiny_tokenizer, tmp_path):
    """25 turns in chat_cli with a real tiny model of 64-token context: the oldest messages are dropped with a note,
    every turn gets its answer, and nothing fails."""
    base_dir = tmp_path / "base"
    os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    torch.manual_seed(0)
    meta = {"step": 0, "model_config": asdict(config)}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / MODEL_TAG), 0, build_gpt(config, "cpu").state_dict(), None, meta)
    questions = "".join(f"Tell me about thing number {i}, please.\n" for i in range(25))
    result = run_script("scripts.chat_cli", stdin=questions + "quit\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.count("Assistant: ") == 25
    notes = re.findall(r"\(the (\d+) oldest messages no longer fit the model's context of 64 tokens", result.stdout)
    assert len(notes) > 5 and all(int(n) % 2 == 0 for n in notes)  # whole exchanges
