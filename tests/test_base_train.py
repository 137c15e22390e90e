"""End-to-end pretraining runs of scripts/base_train.py on the shared shards: files, learning, exact resume, DDP."""
import os
import re
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, run_torchrun

# depth 2, 128-token rows, 4 rows per forward, 2 accumulation steps in one process
TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=128", "--device-batch-size=4", "--total-batch-size=1024",
        "--eval-tokens=2048", "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]


def run(args, base_dir, nproc=1):
    env = {"NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA)}
    if nproc > 1:
        returncode, output = run_torchrun("-m", "scripts.base_train", "--", *args, nproc=nproc, env=env, timeout=600)
        assert returncode == 0, output[-6000:]
        return output
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO_ROOT, capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def step_losses(log):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ .*? loss ([\d.]+)", log)}


def val_bpbs(log):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"Step (\d+) \| val bpb ([\d.]+)", log)}


@pytest.fixture
def trained_tokenizer_dir(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    return base_dir


@pytest.mark.slow
def test_train_save_resume_exactly(trained_tokenizer_dir, tmp_path):
    base_dir = trained_tokenizer_dir
    log = run(TINY + ["--num-iterations=8", "--eval-every=4", "--save-every=4"], base_dir)
    ckpt = base_dir / "base_checkpoints" / "d2"
    for step in (4, 8):
        for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.pt"):
            assert (ckpt / name).is_file(), name
    bpbs = val_bpbs(log)
    assert bpbs[8] < bpbs[4] < bpbs[0], bpbs  # it learns (slowly: the LR is scaled down for a 1K-token batch)
    meta = json.loads((ckpt / "meta_000008.json").read_text())
    assert meta["step"] == 8 and meta["val_bpb"] == pytest.approx(bpbs[8], abs=1e-4)

    # Resume from step 4 in a fresh base dir holding only the tokenizer and the step-4 checkpoint
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(base_dir / "tokenizer", resumed_dir / "tokenizer")
    (resumed_dir / "base_checkpoints" / "d2").mkdir(parents=True)
    for name in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt"):
        shutil.copy(ckpt / name, resumed_dir / "base_checkpoints" / "d2" / name)
    resumed_log = run(TINY + ["--num-iterations=8", "--eval-every=4", "--save-every=4", "--resume-from-step=4"],
                      resumed_dir)
    full, resumed = step_losses(log), step_losses(resumed_log)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit-identical on CPU
    a = torch.load(ckpt / "model_000008.pt", map_location="cpu")
    b = torch.load(resumed_dir / "base_checkpoints" / "d2" / "model_000008.pt", map_location="cpu")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def scaling_params(model_config):
    """transformer matrices + lm_head of a model config, counted on meta (no memory)."""
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    return sum(p.numel() for p in model.transformer.h.parameters()) + model.lm_head.weight.numel()


@pytest.mark.slow
def test_automatic_batch_size_is_derived_printed_and_recorded(trained_tokenizer_dir):
    from nanochat.gpt import config_for_depth
    args = [a for a in TINY if not a.startswith("--total-batch-size")]
    log = run(args + ["--device-batch-size=16", "--num-iterations=1", "--eval-every=-1"], trained_tokenizer_dir)
    meta = json.loads((trained_tokenizer_dir / "base_checkpoints" / "d2" / "meta_000001.json").read_text())
    config = meta["model_config"]
    # d12 with the same vocab and shape flags is the reference the defaults were tuned at (2^19 tokens/step)
    reference = config_for_depth(12, config["vocab_size"], 128, head_dim=64).__dict__
    ratio = scaling_params(config) / scaling_params(reference)  # the tokens-per-parameter ratio cancels
    expected = 2 ** round(math.log2(2**19 * ratio**0.383))
    resolved = meta["resolved"]
    assert resolved["total_batch_size"] == expected and f"-> 2^{round(math.log2(expected))}" in log
    assert f"{expected:,} tokens/step = 16 rows x 128 x 1 ranks x {expected // 2048} accumulation steps" in log
    scale = (expected / 2**19) ** 0.5
    assert resolved["matrix_lr"] == pytest.approx(0.02 * scale) and resolved["unembedding_lr"] == pytest.approx(0.008 * scale)
    assert resolved["weight_decay"] == pytest.approx(0.28 * scale / ratio)


def test_fp8_on_a_cpu_fails_in_one_line(trained_tokenizer_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(trained_tokenizer_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA)}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--fp8"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("--fp8 needs an NVIDIA GPU"), result.stderr


@pytest.mark.slow
def test_two_ranks_agree_with_grad_accumulation(trained_tokenizer_dir, tmp_path):
    """
    2 ranks x 4 rows vs 1 process x 4 rows x 2 accumulation steps: the same tokens per step, model,
    init and optimizer, but the ranks read different row groups than the single process, so the
    batches hold different documents. At init both sit at ln(vocab) and val bpb is a property of the
    (identical) model, measured on a differently sharded val set; after 6 steps the trajectories may
    only differ by batch noise. Tolerances: 2% on val bpb, 3% on train loss (batch-to-batch spread of
    the train loss at this size is ~1-2%).
    """
    args = TINY + ["--num-iterations=6", "--eval-every=6"]
    single = run(args, trained_tokenizer_dir)
    ddp_dir = tmp_path / "ddp"
    shutil.copytree(trained_tokenizer_dir / "tokenizer", ddp_dir / "tokenizer")
    double = run(args, ddp_dir, nproc=2)
    assert "2 ranks x 1 accumulation steps" in double
    for step, bpb in val_bpbs(single).items():
        assert val_bpbs(double)[step] == pytest.approx(bpb, rel=0.02), step
    s, d = step_losses(single), step_losses(double)
    assert s[1] == pytest.approx(d[1], rel=1e-3)  # first step: both at ln(vocab)
    for step in s:
        assert d[step] == pytest.approx(s[step], rel=0.03), step


def run_failing(args, base_dir, **env):
    """Run base_train expecting a user error: -> its stderr, after checking it holds no traceback."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA),
           "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("base_train.py: error: "), result.stderr
    return result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size=1000"], "must be a multiple of"),
    (["--matrix-lr=0"], "argument --matrix-lr: must be positive, got 0"),
    (["--embedding-lr=-0.1"], "argument --embedding-lr: must be positive, got -0.1"),
    (["--device-batch-size=-4"], "argument --device-batch-size: must be positive, got -4"),
    (["--head-dim=63"], "--head-dim=63 make no valid model: n_embd (189) must split into n_head (3) heads of even size"),
    (["--final-lr-frac=-0.5"], "--final-lr-frac must be >= 0"),
    (["--total-batch-size=-2"], "--total-batch-size must be a number of tokens or -1 (automatic), got -2"),
    (["--warmup-steps=-1"], "--warmup-steps must be >= 0"),
], ids=["batch-not-a-multiple", "zero-lr", "negative-lr", "negative-batch", "odd-head-size", "negative-final-lr",
        "bad-batch", "negative-warmup"])
def test_bad_flags_fail_in_one_line(trained_tokenizer_dir, flags, message):
    assert message in run_failing(TINY + flags, trained_tokenizer_dir)


def test_missing_tokenizer_or_data_fail_in_one_line(tiny_tokenizer, base_dir, tmp_path):
    assert "No tokenizer at" in run_failing(TINY, base_dir)
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    (tmp_path / "no_data").mkdir()
    assert "pretraining shard" in run_failing(TINY, base_dir, NANOCHAT_DATA_DIR=str(tmp_path / "no_data"))


@pytest.mark.slow
def test_resume_at_or_past_the_end_is_refused(trained_tokenizer_dir):
    """It used to train forever (the loop stops only at step == num_iterations) with a negative LR."""
    run(TINY + ["--num-iterations=2", "--eval-every=-1"], trained_tokenizer_dir)
    ckpt = trained_tokenizer_dir / "base_checkpoints" / "d2"
    before = {name: (ckpt / name).read_bytes() for name in os.listdir(ckpt)}
    for num_iterations in (2, 1):  # at the end, and past it (there a zero-length warmdown divided by zero)
        stderr = run_failing(TINY + [f"--num-iterations={num_iterations}", "--resume-from-step=2"], trained_tokenizer_dir)
        assert f"Cannot resume from step 2: this run ends at step {num_iterations}" in stderr
    assert {name: (ckpt / name).read_bytes() for name in os.listdir(ckpt)} == before  # the checkpoint is untouched


@pytest.mark.slow
def test_keep_last_bounds_the_checkpoints_on_disk(trained_tokenizer_dir):
    ckpt = trained_tokenizer_dir / "base_checkpoints" / "d2"

    def steps_on_disk():
        return sorted({int(re.search(r"_(\d{6})", name).group(1)) for name in os.listdir(ckpt)})

    run(TINY + ["--num-iterations=6", "--eval-every=-1", "--save-every=2", "--keep-last=2"], trained_tokenizer_dir)
    assert steps_on_disk() == [4, 6]
    assert sorted(os.listdir(ckpt)) == sorted(f"{kind}_{step:06d}{ext}" for step in (4, 6) for kind, ext in
                                              [("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")])
    # A resumed run never deletes the step it resumed from.
    run(TINY + ["--num-iterations=8", "--eval-every=-1", "--save-every=2", "--keep-last=1", "--resume-from-step=4"],
        trained_tokenizer_dir)
    assert steps_on_disk() == [4, 8]
