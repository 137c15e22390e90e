"""--device-batch-size=-1: the probe finds the largest batch that fits, leaves the model as it was, and all ranks agree.
A device's memory limit is simulated by a forward pre-hook that raises torch.OutOfMemoryError past a number of rows."""
import re
import textwrap

import pytest
import torch

from conftest import run_torchrun
from helpers import tiny_gpt
from nanochat.common import UserError
from nanochat.device_batch import auto_device_batch_size, divisors_descending, largest_that_fits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def memory_limit(model, max_rows):
    """From now on, a forward of more than max_rows rows runs out of memory (as a too-large batch on a GPU)."""
    def hook(module, args):
        if args[0].size(0) > max_rows:
            raise torch.OutOfMemoryError(f"simulated: {args[0].size(0)} rows > {max_rows}")
    return model.register_forward_pre_hook(hook)


def test_divisors_keep_gradient_accumulation_exact():
    assert divisors_descending(24) == [24, 12, 8, 6, 4, 3, 2, 1]
    assert divisors_descending(64, cap=32) == [32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 7, 8, 23, 24, 100])
def test_the_largest_candidate_that_fits_is_found(limit):
    tried = []

    def try_rows(rows):
        tried.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError("simulated")

    candidates = divisors_descending(24)
    fitting = [c for c in candidates if c <= limit]
    assert largest_that_fits(try_rows, candidates) == (fitting[0] if fitting else None)
    assert tried == candidates[:len(candidates) - len(fitting) + (1 if fitting else 0)]  # stops at the first fit


def test_probe_picks_what_fits_and_leaves_the_model_unchanged():
    model = tiny_gpt(vocab_size=64, sequence_len=32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = memory_limit(model, max_rows=5)
    # 16 rows per step: 16 and 8 run out of memory, 4 fits (a training probe: forward + backward)
    assert auto_device_batch_size(model, seq_len=32, rows_per_step=16, probe=True) == 4
    assert auto_device_batch_size(model, seq_len=32, rows_per_step=10, train=False, probe=True) == 5  # 10 does not fit
    handle.remove()
    assert model.training  # the mode it was in
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nothing_fits_is_one_clear_error():
    model = tiny_gpt(vocab_size=64, sequence_len=32)
    memory_limit(model, max_rows=0)
    with pytest.raises(UserError, match="Not even one row of 32 tokens fits"):
        auto_device_batch_size(model, seq_len=32, rows_per_step=8, probe=True)


def test_off_cuda_no_probe_runs():
    model = tiny_gpt(vocab_size=64, sequence_len=32)
    memory_limit(model, max_rows=0)  # a probe would fail: none runs on a CPU by default
    assert auto_device_batch_size(model, seq_len=32, rows_per_step=64) == 32
    assert auto_device_batch_size(model, seq_len=32, rows_per_step=24) == 24
    assert auto_device_batch_size(model, seq_len=32, rows_per_step=48) == 24  # the largest divisor <= 32


@pytest.mark.slow
def test_all_ranks_take_the_smallest_answer_under_torchrun(tmp_path):
    """Rank 0 fits 8 rows, rank 1 only 3: both run 2, the largest divisor of the 8 rows per step that fits rank 1."""
    script = tmp_path / "dist_device_batch.py"
    script.write_text(textwrap.dedent("""
        import torch
        from helpers import tiny_gpt
        from nanochat.common import compute_init, compute_cleanup
        from nanochat.device_batch import auto_device_batch_size
        _, rank, _, _, _ = compute_init("cpu")
        model = tiny_gpt(vocab_size=64, sequence_len=32).train()
        limit = [8, 3][rank]
        def hook(module, args):
            if args[0].size(0) > limit:
                raise torch.OutOfMemoryError("simulated")
        model.register_forward_pre_hook(hook)
        rows = auto_device_batch_size(model, seq_len=32, rows_per_step=8, probe=True)
        print(f"RANK {rank} ROWS {rows}", flush=True)
        compute_cleanup()
    """))
    returncode, output = run_torchrun(script, timeout=240)
    assert returncode == 0, output[-3000:]
    # (searched, not split into lines: unbuffered ranks write a message and its newline apart, so another rank's
    # line can land between them)
    assert sorted(re.findall(r"RANK \d ROWS \d+", output)) == ["RANK 0 ROWS 2", "RANK 1 ROWS 2"], output
