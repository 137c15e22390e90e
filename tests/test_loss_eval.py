"""bits per byte: agreement with a hand computation, exclusions, and the sum over ranks."""
import math
import textwrap

import pytest
import torch

from conftest import run_torchrun
from helpers import BPB_ZERO_BYTE_IDS, bpb_batches, bpb_model, bpb_token_bytes
from nanochat.loss_eval import evaluate_bpb

def reference_bpb(model, batches, token_bytes):
    """Per-token cross entropy by hand, summed over targets with bytes, over ln2 * their bytes."""
    nats, num_bytes = 0.0, 0
    for x, y in batches:
        log_probs = torch.log_softmax(model(x).double(), dim=-1)
        for b in range(y.size(0)):
            for t in range(y.size(1)):
                target = y[b, t].item()
                if target == -1 or token_bytes[target] == 0:
                    continue
                nats -= log_probs[b, t, target].item()
                num_bytes += token_bytes[target].item()
    return nats / (math.log(2) * num_bytes)


def test_bpb_matches_hand_computation():
    model, token_bytes, batches = bpb_model(), bpb_token_bytes(), bpb_batches(seed=1)
    with torch.no_grad():
        expected = reference_bpb(model, batches, token_bytes)
    assert evaluate_bpb(model, iter(batches), 2, token_bytes) == pytest.approx(expected, rel=1e-5)
    # only `steps` batches are read; extra items in a batch tuple (loader state) are ignored
    with_state = [(x, y, {"pq_idx": 0}) for x, y in batches]
    with torch.no_grad():
        assert evaluate_bpb(model, iter(with_state), 1, token_bytes) == pytest.approx(
            reference_bpb(model, batches[:1], token_bytes), rel=1e-5)


def test_bpb_shows_progress_on_rank_0_only(capsys, monkeypatch):
    """A long evaluation must not be silent: a bar with the batch count on stderr, and nothing from other ranks."""
    model, token_bytes, batches = bpb_model(), bpb_token_bytes(), bpb_batches(seed=1)
    evaluate_bpb(model, iter(batches), 2, token_bytes)
    err = capsys.readouterr().err
    assert "bpb:" in err and "0/2 [" in err  # tqdm's "bpb:   0%|   | 0/2 [..." (the count of batches to evaluate)
    monkeypatch.setenv("RANK", "1")
    evaluate_bpb(model, iter(batches), 2, token_bytes)
    assert capsys.readouterr().err == ""


def test_excluded_targets_do_not_count():
    """Changing what sits at ignored or special positions changes neither nats nor bytes."""
    model, token_bytes = bpb_model(), bpb_token_bytes()
    x, y = bpb_batches(seed=2, num_batches=1)[0]
    y_all_excluded = y.clone()
    y_all_excluded[0] = -1
    y_all_excluded[1] = BPB_ZERO_BYTE_IDS[0]
    y_all_excluded[2] = BPB_ZERO_BYTE_IDS[1]
    assert evaluate_bpb(model, iter([(x, y_all_excluded)]), 1, token_bytes) == float("inf")  # nothing to score
    y_other_special = y.clone()
    y_other_special[1, 5] = BPB_ZERO_BYTE_IDS[1]
    assert evaluate_bpb(model, iter([(x, y)]), 1, token_bytes) == evaluate_bpb(model, iter([(x, y_other_special)]), 1, token_bytes)


@pytest.mark.slow
def test_bpb_sums_over_ranks(tmp_path):
    """Two gloo ranks with one batch each give the single-process result over both batches."""
    script = tmp_path / "dist_bpb.py"
    script.write_text(textwrap.dedent("""
        from helpers import bpb_model, bpb_token_bytes, bpb_batches
        from nanochat.common import compute_init, compute_cleanup
        from nanochat.loss_eval import evaluate_bpb
        _, rank, _, _, _ = compute_init("cpu")
        batches = bpb_batches(seed=3, num_batches=2)
        bpb = evaluate_bpb(bpb_model(), iter(batches[rank:rank + 1]), 1, bpb_token_bytes())
        if rank == 0:
            print(f"BPB {bpb!r}")
        compute_cleanup()
    """))
    returncode, output = run_torchrun(script, timeout=240)
    assert returncode == 0, output[-3000:]
    dist_bpb = float(output.split("BPB ")[1].split()[0])
    single = evaluate_bpb(bpb_model(), iter(bpb_batches(seed=3, num_batches=2)), 2, bpb_token_bytes())
    assert dist_bpb == pytest.approx(single, rel=1e-6)


def test_bpb_evaluates_in_eval_mode_and_restores_the_mode():
    model, token_bytes, batches = bpb_model(), bpb_token_bytes(), bpb_batches(seed=1)
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    for training in (True, False):
        model.train(training)
        evaluate_bpb(model, iter(batches), 2, token_bytes)
        assert model.training == training
    assert modes == [False] * 4
