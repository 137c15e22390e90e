"""bits per byte: agreement with a hand computation, exclusions, and the sum over ranks."""
import math
import textwrap

import pytest
import torch

from nanochat.gpt import GPTConfig, build_gpt
from nanochat.loss_eval import evaluate_bpb
from conftest import run_torchrun

VOCAB = 96
SPECIAL = [90, 91]  # token ids standing for special tokens: 0 bytes


def make_model():
    config = GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    model = build_gpt(config, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def make_token_bytes():
    token_bytes = torch.randint(1, 5, (VOCAB,), generator=torch.Generator().manual_seed(0))
    token_bytes[SPECIAL] = 0
    return token_bytes


def make_batches(seed, num_batches=2):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        x = torch.randint(0, VOCAB, (3, 16), generator=gen)
        y = torch.randint(0, VOCAB, (3, 16), generator=gen)
        y[0, :3] = -1  # ignored positions (e.g. masked chat tokens)
        y[1, 5], y[2, 7] = SPECIAL  # special-token targets
        batches.append((x, y))
    return batches


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
    model, token_bytes, batches = make_model(), make_token_bytes(), make_batches(seed=1)
    with torch.no_grad():
        expected = reference_bpb(model, batches, token_bytes)
    assert evaluate_bpb(model, iter(batches), 2, token_bytes) == pytest.approx(expected, rel=1e-5)
    # only `steps` batches are read; extra items in a batch tuple (loader state) are ignored
    with_state = [(x, y, {"pq_idx": 0}) for x, y in batches]
    with torch.no_grad():
        assert evaluate_bpb(model, iter(with_state), 1, token_bytes) == pytest.approx(
            reference_bpb(model, batches[:1], token_bytes), rel=1e-5)


def test_excluded_targets_do_not_count():
    """Changing what sits at ignored or special positions changes neither nats nor bytes."""
    model, token_bytes = make_model(), make_token_bytes()
    x, y = make_batches(seed=2, num_batches=1)[0]
    y_all_excluded = y.clone()
    y_all_excluded[0] = -1
    y_all_excluded[1] = SPECIAL[0]
    y_all_excluded[2] = SPECIAL[1]
    assert evaluate_bpb(model, iter([(x, y_all_excluded)]), 1, token_bytes) == float("inf")  # nothing to score
    y_other_special = y.clone()
    y_other_special[1, 5] = SPECIAL[1]
    assert evaluate_bpb(model, iter([(x, y)]), 1, token_bytes) == evaluate_bpb(model, iter([(x, y_other_special)]), 1, token_bytes)


@pytest.mark.slow
def test_bpb_sums_over_ranks(tmp_path):
    """Two gloo ranks with one batch each give the single-process result over both batches."""
    script = tmp_path / "dist_bpb.py"
    script.write_text(textwrap.dedent("""
        from tests.test_loss_eval import make_model, make_token_bytes, make_batches
        from nanochat.common import compute_init, compute_cleanup
        from nanochat.loss_eval import evaluate_bpb
        _, rank, _, _, _ = compute_init("cpu")
        batches = make_batches(seed=3, num_batches=2)
        bpb = evaluate_bpb(make_model(), iter(batches[rank:rank + 1]), 1, make_token_bytes())
        if rank == 0:
            print(f"BPB {bpb!r}")
        compute_cleanup()
    """))
    returncode, output = run_torchrun(script, timeout=240)
    assert returncode == 0, output[-3000:]
    dist_bpb = float(output.split("BPB ")[1].split()[0])
    single = evaluate_bpb(make_model(), iter(make_batches(seed=3, num_batches=2)), 2, make_token_bytes())
    assert dist_bpb == pytest.approx(single, rel=1e-6)
