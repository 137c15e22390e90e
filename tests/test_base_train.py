"""
Pretraining runs of scripts/base_train.py on the test shards, called in-process through main() (one subprocess
checks what a user sees on a user error; one torchrun run checks two ranks): files, learning, exact resume
without a second evaluation at the resume step, the evaluation schedule, device defaults, DDP.
"""
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, run_torchrun
from nanochat.common import UserError
from nanochat.run import Run
from scripts import base_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# depth 2, 128-token rows, 4 rows per forward, 2 accumulation steps in one process
TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=128", "--device-batch-size=4", "--total-batch-size=1024",
        "--eval-tokens=2048", "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu"]


@pytest.fixture
def base_dir(tiny_tokenizer, base_dir, monkeypatch):
    """The test's base dir with the tiny tokenizer in it, reading the test data."""
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))
    return base_dir


def run(args, capsys):
    """base_train.main(TINY + args) -> its output; it leaves the process as it found it (gc included)."""
    base_train.main(TINY + args)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    return capsys.readouterr().out


def step_losses(log):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ .*? loss ([\d.]+)", log)}


def val_bpbs(log):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"Step (\d+) \| val bpb ([\d.]+)", log)}


def read_meta(base_dir, step):
    return json.loads((base_dir / "base_checkpoints" / "d2" / f"meta_{step:06d}.json").read_text())


@pytest.mark.slow
def test_train_save_resume_exactly_without_evaluating_the_resume_step_again(base_dir, tmp_path, capsys, monkeypatch):
    log = run(["--num-iterations=8", "--eval-every=4", "--save-every=4"], capsys)
    ckpt = base_dir / "base_checkpoints" / "d2"
    for step in (4, 8):
        for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.pt"):
            assert (ckpt / name).is_file(), name
    bpbs = val_bpbs(log)
    assert list(bpbs) == [0, 4, 8] and bpbs[8] < bpbs[4] < bpbs[0], bpbs  # it learns (slowly: a 1K-token batch)
    meta = read_meta(base_dir, 8)
    assert meta["step"] == 8 and meta["finished"] and meta["val_bpb"] == pytest.approx(bpbs[8], abs=1e-4)
    assert meta["loss_scale"] == [2.0**16, 0]  # saved by every stage (fp16 runs resume with their loss scale)
    step_lines = [line for line in log.splitlines() if line.startswith("step ")]
    assert "mfu" not in log and step_lines[0].endswith("eta after step 10 (compiling, warming up)")  # a CPU: no peak

    # Resume from step 4 in a fresh base dir holding only the tokenizer and the step-4 checkpoint
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(base_dir / "tokenizer", resumed_dir / "tokenizer")
    (resumed_dir / "base_checkpoints" / "d2").mkdir(parents=True)
    for name in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt"):
        shutil.copy(ckpt / name, resumed_dir / "base_checkpoints" / "d2" / name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(resumed_dir))
    resumes = []  # every stage resumes through Run.resume, and nothing else
    monkeypatch.setattr(Run, "resume", lambda self, *args, real=Run.resume: resumes.append(1) or real(self, *args))
    resumed_log = run(["--num-iterations=8", "--eval-every=4", "--save-every=4", "--resume-from-step=4"], capsys)
    assert resumes == [1]
    full, resumed = step_losses(log), step_losses(resumed_log)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit-identical on CPU
    assert list(val_bpbs(resumed_log)) == [8]  # step 4 was evaluated before the interruption: not again
    a = torch.load(ckpt / "model_000008.pt", map_location="cpu")
    b = torch.load(resumed_dir / "base_checkpoints" / "d2" / "model_000008.pt", map_location="cpu")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the same state at the end, curve included (one val bpb point per evaluated step), but for flags and times
    comparable = lambda meta: {**meta, "user_config": None, "loop_state": {
        **meta["loop_state"], "total_training_time": None, "curve": [{**p, "time": None} for p in meta["loop_state"]["curve"]]}}
    assert comparable(json.loads((resumed_dir / "base_checkpoints" / "d2" / "meta_000008.json").read_text())) == \
        comparable(meta)


def scaling_params(model_config):
    """transformer matrices + lm_head of a model config, counted on meta (no memory)."""
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    return sum(p.numel() for p in model.transformer.h.parameters()) + model.lm_head.weight.numel()


@pytest.mark.slow
def test_automatic_batch_size_is_derived_printed_and_recorded(base_dir, capsys):
    from nanochat.gpt import config_for_depth
    args = [a for a in TINY if not a.startswith("--total-batch-size")]
    base_train.main(args + ["--device-batch-size=16", "--num-iterations=1", "--eval-every=-1"])
    log = capsys.readouterr().out
    meta = read_meta(base_dir, 1)
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


@pytest.mark.slow
def test_automatic_device_batch_size_is_the_largest_that_fits_and_keeps_the_total_batch(base_dir, capsys, monkeypatch):
    """--device-batch-size=-1 with a simulated memory limit of 3 rows per forward: of the 8 rows per step (1024
    tokens / 128), 8 and 4 run out of memory, 2 fits; the run trains 2 rows x 4 accumulation steps, prints it and
    records it. Every training forward stays within the limit (a bigger one would raise)."""
    from functools import partial
    from nanochat import device_batch
    from nanochat.gpt import GPT
    forward = GPT.forward

    def limited_forward(self, idx, *args, **kwargs):
        if idx.size(0) > 3:
            raise torch.OutOfMemoryError(f"simulated: {idx.size(0)} rows")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", limited_forward)
    monkeypatch.setattr(base_train, "auto_device_batch_size", partial(device_batch.auto_device_batch_size, probe=True))
    log = run(["--device-batch-size=-1", "--num-iterations=2", "--eval-every=0"], capsys)  # (the last flag given wins)
    assert "Device batch size: 2 rows of 128 tokens (found by trying; of up to 8 per step)" in log
    assert "1,024 tokens/step = 2 rows x 128 x 1 ranks x 4 accumulation steps" in log
    assert read_meta(base_dir, 2)["device_batch_size"] == 2 and len(val_bpbs(log)) == 1


@pytest.mark.slow
def test_evaluations_run_on_their_schedule_and_at_the_end_only_when_on(base_dir, capsys):
    log = run(["--num-iterations=3", "--eval-every=0", "--sample-every=0"], capsys)  # 0: only at the end
    assert list(val_bpbs(log)) == [3] and log.count("The capital of France is") == 1
    log = run(["--num-iterations=3", "--eval-every=2"], capsys)
    assert list(val_bpbs(log)) == [0, 2, 3] and "The capital" not in log


@pytest.mark.slow
def test_the_final_checkpoint_is_saved_before_the_final_core_evaluation(base_dir, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")  # what a big CORE batch does on a full GPU

    monkeypatch.setattr(base_train, "evaluate_core", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        base_train.main([a for a in TINY if a != "--core-metric-every=-1"] + ["--num-iterations=2", "--eval-every=-1",
                                                                             "--core-metric-every=0"])
    assert read_meta(base_dir, 2)["finished"]  # the run is on disk: a re-run pipeline skips it
    assert gc.isenabled() and gc.get_freeze_count() == 0  # main() undid its gc settings on the way out


@pytest.mark.slow
def test_two_ranks_agree_with_grad_accumulation(base_dir, tmp_path, capsys):
    """
    2 ranks x 4 rows vs 1 process x 4 rows x 2 accumulation steps: the same tokens per step, model,
    init and optimizer, but the ranks read different row groups than the single process, so the
    batches hold different documents. At init both sit at ln(vocab) and val bpb is a property of the
    (identical) model, measured on a differently sharded val set; after 6 steps the trajectories may
    only differ by batch noise. Tolerances: 2% on val bpb, 3% on train loss (batch-to-batch spread of
    the train loss at this size is ~1-2%).
    """
    args = TINY + ["--num-iterations=6", "--eval-every=6"]
    single = run(args[len(TINY):], capsys)
    ddp_dir = tmp_path / "ddp"
    shutil.copytree(base_dir / "tokenizer", ddp_dir / "tokenizer")
    returncode, double = run_torchrun("-m", "scripts.base_train", "--", *args, nproc=2, timeout=600,
                                      env={"NANOCHAT_BASE_DIR": str(ddp_dir), "NANOCHAT_DATA_DIR": str(TEST_DATA)})
    assert returncode == 0, double[-6000:]
    assert "2 ranks x 1 accumulation steps" in double
    for step, bpb in val_bpbs(single).items():
        assert val_bpbs(double)[step] == pytest.approx(bpb, rel=0.02), step
    s, d = step_losses(single), step_losses(double)
    assert s[1] == pytest.approx(d[1], rel=1e-3)  # first step: both at ln(vocab)
    for step in s:
        assert d[step] == pytest.approx(s[step], rel=0.03), step


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size=1000"], "must be a multiple of"),
    (["--matrix-lr=0"], "argument --matrix-lr: must be positive, got 0"),
    (["--embedding-lr=-0.1"], "argument --embedding-lr: must be positive, got -0.1"),
    (["--device-batch-size=-4"], "--device-batch-size must be a number of rows or -1 (the largest that fits), got -4"),
    (["--eval-tokens=0"], "argument --eval-tokens: must be positive, got 0"),
    (["--head-dim=63"], "--head-dim=63 make no valid model: n_embd (189) must split into n_head (3) heads of even size"),
    (["--final-lr-frac=-0.5"], "--final-lr-frac must be >= 0"),
    (["--total-batch-size=-2"], "--total-batch-size must be a number of tokens or -1 (automatic), got -2"),
    (["--warmup-steps=-1"], "--warmup-steps must be >= 0"),
], ids=["batch-not-a-multiple", "zero-lr", "negative-lr", "negative-batch", "zero-eval-tokens", "odd-head-size",
        "negative-final-lr", "bad-batch", "negative-warmup"])
def test_bad_flags_fail_in_one_line(base_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        base_train.main(TINY + flags)
    assert info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last_line and message in last_line, last_line


def test_fp8_on_a_cpu_is_refused_in_one_line(base_dir):
    with pytest.raises(SystemExit, match="^--fp8 needs an NVIDIA GPU"):
        base_train.main(TINY + ["--fp8"])


@pytest.mark.slow
def test_missing_tokenizer_or_data_fail_in_one_line(tiny_tokenizer, isolated_data_env, tmp_path, monkeypatch):
    """What a user sees: one line, no traceback (a real process: compute_init's excepthook)."""
    env = {**os.environ, "NANOCHAT_DATA_DIR": str(TEST_DATA), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("base_train.py: error: No tokenizer at"), result.stderr
    tiny_tokenizer.save(str(isolated_data_env / "tokenizer"))
    (tmp_path / "no_data").mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "no_data"))
    with pytest.raises(FileNotFoundError, match="pretraining shard"):
        base_train.main(TINY)


@pytest.mark.slow
def test_resume_at_or_past_the_end_is_refused(base_dir, capsys):
    """It used to train forever (the loop stops only at step == num_iterations) with a negative LR."""
    base_train.main([a for a in TINY if not a.startswith(("--eval-tokens", "--core-metric"))] +
                    ["--num-iterations=2", "--eval-every=-1", "--core-metric-every=-1"])
    meta = read_meta(base_dir, 2)  # evaluation sizes left at their default: the CPU's, recorded as used
    assert (meta["user_config"]["eval_tokens"], meta["user_config"]["core_metric_max_per_task"]) == (2**16, 50)
    assert meta["val_bpb"] is None and "| val bpb" not in capsys.readouterr().out  # -1: never, not even at the end
    ckpt = base_dir / "base_checkpoints" / "d2"
    before = {name: (ckpt / name).read_bytes() for name in os.listdir(ckpt)}
    for num_iterations in (2, 1):  # at the end, and past it (there a zero-length warmdown divided by zero)
        with pytest.raises(UserError, match=f"Cannot resume from step 2: this run ends at step {num_iterations}"):
            base_train.main(TINY + [f"--num-iterations={num_iterations}", "--resume-from-step=2"])
    assert {name: (ckpt / name).read_bytes() for name in os.listdir(ckpt)} == before  # the checkpoint is untouched


@pytest.mark.slow
def test_keep_last_bounds_the_checkpoints_on_disk(base_dir, capsys):
    ckpt = base_dir / "base_checkpoints" / "d2"

    def steps_on_disk():
        return sorted({int(re.search(r"_(\d{6})", name).group(1)) for name in os.listdir(ckpt)})

    run(["--num-iterations=6", "--eval-every=-1", "--save-every=2", "--keep-last=2"], capsys)
    assert steps_on_disk() == [4, 6]
    assert sorted(os.listdir(ckpt)) == sorted(f"{kind}_{step:06d}{ext}" for step in (4, 6) for kind, ext in
                                              [("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")])
    # A resumed run never deletes the step it resumed from.
    run(["--num-iterations=8", "--eval-every=-1", "--save-every=2", "--keep-last=1", "--resume-from-step=4"], capsys)
    assert steps_on_disk() == [4, 8]
