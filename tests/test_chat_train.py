"""
nanochat/chat_train.py, tested directly: conversations -> (inputs, targets) against a per-token
reference, best-fit packing of conversations against a simple scan packer written here, the loss
normaliser (token-level mean over a step; a fully masked micro-batch gives 0 and no NaN), the
optimizer warm-start rules, and RL's group advantages and masked policy-gradient loss.
"""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, TEST_DATA, run_torchrun
from helpers import tiny_config
from nanochat.common import UserError
from nanochat.chat_train import (IGNORE_INDEX, training_rows, conversation_batches, loss_normaliser,
                                 load_optimizer_state, group_advantages, policy_gradient_loss)


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def reference_row(ids, mask, width, pad_id):
    """One row, position by position: input t is token t; target t is token t+1 if it is learned, else -1."""
    inputs = [ids[t] if t < len(ids) - 1 else pad_id for t in range(width)]
    targets = [ids[t + 1] if t < len(ids) - 1 and mask[t + 1] else -1 for t in range(width)]
    return inputs, targets


def gsm8k_conversations(n):
    from tasks.gsm8k import GSM8K
    task = GSM8K(subset="main", split="train")
    return [task[i] for i in range(n)]


def test_training_rows_shift_mask_and_pad(tiny_tokenizer):
    # GSM8K answers hold calculator calls: learned python tokens, then forced outputs that are not learned
    rendered = [tiny_tokenizer.render_conversation(c) for c in gsm8k_conversations(3)]
    width = max(len(ids) for ids, _ in rendered) + 5  # every row padded, by different amounts
    pad_id = tiny_tokenizer.get_bos_token_id()
    inputs, targets = training_rows(rendered, width, pad_id)
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == targets.shape == (3, width)
    for row, (ids, mask) in enumerate(rendered):
        assert 0 < sum(mask) < len(mask)  # both learned and unlearned tokens
        expected_inputs, expected_targets = reference_row(ids, mask, width, pad_id)
        assert inputs[row].tolist() == expected_inputs
        assert targets[row].tolist() == expected_targets
    # what is trained is exactly the assistant's own tokens: never a user token, never a forced output
    output_start = tiny_tokenizer.encode_special("<|output_start|>")
    user_end = tiny_tokenizer.encode_special("<|user_end|>")
    trained = set(targets[targets != IGNORE_INDEX].tolist())
    assert user_end not in trained and output_start not in trained
    assert tiny_tokenizer.encode_special("<|assistant_end|>") in trained


def test_training_rows_rejects_a_row_longer_than_width():
    with pytest.raises(ValueError, match="row 1"):
        training_rows([([1, 2, 3], [0, 1, 1]), ([1, 2, 3, 4, 5], [0, 1, 1, 1, 1])], width=3, pad_id=0)


# ---------------------------------------------------------------------------------------------------
# Packing


class ScanPacker:
    """The reference: a buffer in insertion order; each row takes the longest conversation that fits
    (the earliest among equals), repeatedly, then pads. Conversations longer than a row are cut to it."""

    def __init__(self, rendered, row_len, buffer_size):
        self.rendered, self.row_len, self.buffer_size = rendered, row_len, buffer_size
        self.buffer, self.cursor = [], 0

    def take_row(self):
        while len(self.buffer) < self.buffer_size:
            ids, mask = self.rendered[self.cursor % len(self.rendered)]
            self.buffer.append((ids[:self.row_len], mask[:self.row_len]))
            self.cursor += 1
        row_ids, row_mask = [], []
        while True:
            space = self.row_len - len(row_ids)
            fitting = [i for i, (ids, _) in enumerate(self.buffer) if len(ids) <= space]
            if not fitting:
                return row_ids, row_mask
            best = max(fitting, key=lambda i: len(self.buffer[i][0]))  # max() keeps the first of equals
            ids, mask = self.buffer.pop(best)
            row_ids, row_mask = row_ids + ids, row_mask + mask


def mixed_conversations():
    """Real conversations of very different lengths: spelling (short), identity, GSM8K (long)."""
    from tasks.spellingbee import SimpleSpelling
    from tasks.customjson import CustomJSON, default_identity_path
    spelling = SimpleSpelling(size=40, split="train")
    identity = CustomJSON(filepath=default_identity_path())
    conversations = [spelling[i] for i in range(40)] + [identity[i] for i in range(20)] + gsm8k_conversations(20)
    random.Random(0).shuffle(conversations)
    return conversations


@pytest.mark.parametrize("seq_len", [63, 1279])  # 63: many conversations are longer than a row; 1279: none
def test_packed_rows_match_reference_scan_packer(tiny_tokenizer, seq_len):
    conversations = mixed_conversations()
    rendered = [tiny_tokenizer.render_conversation(c, max_tokens=10**6) for c in conversations]
    row_len, buffer_size, batch_size = seq_len + 1, 16, 4
    reference = ScanPacker(rendered, row_len, buffer_size)
    pad_id = tiny_tokenizer.get_bos_token_id()
    loader = conversation_batches(conversations, tiny_tokenizer, batch_size, seq_len, "cpu", buffer_size=buffer_size)
    packed = 0
    for _ in range(10):  # 40 rows: more than one pass over the conversations
        inputs, targets, state = next(loader)
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        for row in range(batch_size):
            ids, mask = reference.take_row()
            assert ids[0] == pad_id  # every row starts at a conversation start (BOS)
            expected_inputs, expected_targets = reference_row(ids, mask, seq_len, pad_id)
            assert inputs[row].tolist() == expected_inputs
            assert targets[row].tolist() == expected_targets
            packed += ids.count(pad_id)  # one BOS per packed conversation
        assert state["epoch_progress"] == pytest.approx(packed / len(conversations))
    longer = sum(len(ids) > row_len for ids, _ in rendered)
    assert (longer > 0) == (seq_len == 63)
    assert state["truncated"] == sum(len(rendered[i % len(rendered)][0]) > row_len for i in range(state["cursor"]))


def test_rank_r_of_2_packs_conversations_r_r_plus_2_and_so_on(tiny_tokenizer):
    conversations = mixed_conversations()
    rendered = [tiny_tokenizer.render_conversation(c) for c in conversations]
    seq_len, pad_id = 127, tiny_tokenizer.get_bos_token_id()
    for rank in range(2):
        reference = ScanPacker(rendered[rank::2], seq_len + 1, buffer_size=8)
        loader = conversation_batches(conversations, tiny_tokenizer, 2, seq_len, "cpu", rank=rank, world_size=2, buffer_size=8)
        for _ in range(5):
            inputs, targets, _ = next(loader)
            for row in range(2):
                expected_inputs, expected_targets = reference_row(*reference.take_row(), seq_len, pad_id)
                assert inputs[row].tolist() == expected_inputs and targets[row].tolist() == expected_targets


@pytest.mark.parametrize("rank", [0, 1])
def test_resuming_from_a_state_continues_with_exactly_the_same_batches(tiny_tokenizer, rank):
    """A state taken after any batch (through JSON, as a checkpoint stores it) restarts the loader on the
    batches the uninterrupted loader yields next: same rows, same pending conversations, same counts."""
    conversations = mixed_conversations()
    make = lambda state=None: conversation_batches(conversations, tiny_tokenizer, 3, 63, "cpu", rank=rank, world_size=2,
                                                   buffer_size=8, resume_state=state)
    uninterrupted = [next(loader) for loader in [make()] for _ in range(12)]  # past one pass over this rank's 40
    for k in (1, 5, 11):
        state = json.loads(json.dumps(uninterrupted[k - 1][2]))
        assert len(state["pending"]) > 0  # the packer holds conversations the resumed loader must rebuild
        resumed = make(state)
        for inputs, targets, expected_state in uninterrupted[k:]:
            got_inputs, got_targets, got_state = next(resumed)
            assert torch.equal(got_inputs, inputs) and torch.equal(got_targets, targets)
            assert got_state == expected_state


def test_a_conversation_longer_than_a_row_fills_one_row_truncated(tiny_tokenizer):
    conversation = gsm8k_conversations(1)[0]
    ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=10**6)
    seq_len = len(ids) // 2
    inputs, targets, state = next(conversation_batches([conversation], tiny_tokenizer, 1, seq_len, "cpu", buffer_size=1))
    assert inputs[0].tolist() == ids[:seq_len]
    assert targets[0].tolist() == reference_row(ids[:seq_len + 1], mask[:seq_len + 1], seq_len, 0)[1]
    assert state["truncated"] == 1


# ---------------------------------------------------------------------------------------------------
# The SFT loss: summed token losses / loss_normaliser


def tiny_gpt():
    from nanochat.gpt import build_gpt
    torch.manual_seed(0)
    model = build_gpt(tiny_config(n_layer=1, n_embd=32), "cpu")
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # non-zero logits, so gradients are non-trivial
    return model


def accumulated_step(model, micro_batches):
    """The SFT step: each micro-batch's summed loss / the step's normaliser, gradients accumulated."""
    normaliser = loss_normaliser([targets for _, targets in micro_batches])
    total = 0.0
    for inputs, targets in micro_batches:
        loss = model(inputs, targets, loss_reduction="sum") / normaliser
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_step_loss_is_the_mean_over_every_trained_token():
    model = tiny_gpt()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 64, (3, 2, 16), generator=generator)
    targets = torch.randint(0, 64, (3, 2, 16), generator=generator)
    targets[0, :, 5:] = IGNORE_INDEX  # micro-batches with very different numbers of trained tokens
    targets[1] = IGNORE_INDEX  # and one with none at all
    loss, grads = accumulated_step(model, list(zip(inputs, targets)))
    model.zero_grad()
    reference = F.cross_entropy(model(inputs.flatten(0, 1)).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fully_masked_step_gives_zero_loss_and_zero_gradient():
    model = tiny_gpt()
    inputs = torch.randint(0, 64, (2, 16))
    targets = torch.full((2, 16), IGNORE_INDEX)
    loss, grads = accumulated_step(model, [(inputs, targets), (inputs, targets)])
    assert loss == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


# ---------------------------------------------------------------------------------------------------
# Optimizer warm start


def test_optimizer_state_is_used_only_with_the_ranks_that_saved_it(tmp_path):
    from nanochat.checkpoint_manager import meta_path, optim_path
    for step in (7, 8):  # complete steps of a checkpoint that predates recorded hashes (their shards load unchecked)
        with open(meta_path(str(tmp_path), step), "w") as f:
            json.dump({"step": step, "model_config": {}}, f)
    torch.save({"state": {}, "param_groups": [], "world_size": 2}, optim_path(str(tmp_path), 7, 0))
    state, note = load_optimizer_state(str(tmp_path), 7, 0, 1, "cpu")
    assert state is None and "saved by 2 rank(s)" in note  # a shard of a 2-rank run is not a whole state
    state, note = load_optimizer_state(str(tmp_path), 7, 0, 2, "cpu")
    assert state is None and "no optimizer state for 2 rank(s)" in note  # rank 1's shard is missing
    torch.save({"state": {}, "param_groups": [], "world_size": 2}, optim_path(str(tmp_path), 7, 1))
    state, note = load_optimizer_state(str(tmp_path), 7, 1, 2, "cpu")
    assert note is None and state["world_size"] == 2
    torch.save({"state": {}, "param_groups": []}, optim_path(str(tmp_path), 8, 0))  # single-process optimizer
    state, note = load_optimizer_state(str(tmp_path), 8, 0, 1, "cpu")
    assert note is None and state == {"state": {}, "param_groups": []}
    with open(optim_path(str(tmp_path), 8, 0), "r+b") as f:  # a damaged shard is named, not a traceback
        f.truncate(10)
    with pytest.raises(UserError, match="optim_000008_rank0.pt cannot be read"):
        load_optimizer_state(str(tmp_path), 8, 0, 1, "cpu")


# ---------------------------------------------------------------------------------------------------
# RL


def test_group_advantages_center_each_question_without_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.5, -0.5, 0.5]])
    torch.testing.assert_close(group_advantages(rewards), expected)


def test_policy_gradient_loss_masks_and_normalises_by_trained_tokens():
    token_nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    targets = torch.tensor([[-1, 7, 7], [-1, -1, 7]])  # prompt / forced tokens are -1
    advantages = torch.tensor([0.5, -1.0])
    normaliser = loss_normaliser([targets])
    assert normaliser.item() == 3
    loss = policy_gradient_loss(token_nll, targets, advantages, normaliser)
    # -sum(A * log p) / 3 with log p = -nll: (0.5 * (2 + 3) - 1.0 * 6) / 3
    assert loss.item() == pytest.approx((0.5 * 5 - 6) / 3)
    loss.backward()
    torch.testing.assert_close(token_nll.grad, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, -1.0]]) / 3)


def test_policy_gradient_loss_of_a_fully_masked_batch_is_zero_not_nan():
    token_nll = torch.tensor([[float("nan"), 2.0]], requires_grad=True)  # a masked position's value is never read
    targets = torch.full((1, 2), IGNORE_INDEX)
    loss = policy_gradient_loss(token_nll, targets, torch.tensor([1.0]), loss_normaliser([targets]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(token_nll.grad, torch.zeros(1, 2))


def test_rl_step_gradient_matches_a_per_token_reference():
    """
    The RL step as chat_rl runs it (engine masks -> training_rows, group advantages, micro-batches sharing one
    normaliser) against the objective written out token by token: -sum over questions q, samples s and trained
    tokens t of (reward[q, s] - mean reward of q) * log p(token t) / number of trained tokens.
    """
    model = tiny_gpt()
    generator = torch.Generator().manual_seed(2)
    prompt_len, num_samples = 4, 3
    sequences, masks = [], []
    for length in [9, 7, 12, 8, 10, 7]:  # 2 questions x 3 samples of different lengths
        sequences.append(torch.randint(0, 64, (length,), generator=generator).tolist())
        mask = [0] * prompt_len + [1] * (length - prompt_len)
        mask[prompt_len + 1] = 0  # a token the engine forced in (a tool's output) is not trained
        masks.append(mask)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])

    inputs, targets = training_rows(list(zip(sequences, masks)), max(map(len, sequences)) - 1, pad_id=0)
    advantages, normaliser = group_advantages(rewards).flatten(), loss_normaliser([targets])
    for first in range(0, len(sequences), 4):  # micro-batches of 4 rows and 2 rows
        rows = slice(first, first + 4)
        token_nll = model(inputs[rows], targets[rows], loss_reduction="none")
        policy_gradient_loss(token_nll, targets[rows], advantages[rows], normaliser).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    objective, trained = 0.0, 0
    for index, (ids, mask) in enumerate(zip(sequences, masks)):
        question, sample = divmod(index, num_samples)
        advantage = rewards[question, sample] - rewards[question].mean()
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        for t in range(1, len(ids)):
            if mask[t]:
                objective = objective - advantage * log_probs[t - 1, ids[t]]
                trained += 1
    (objective / trained).backward()
    assert normaliser.item() == trained
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_step_gradient_is_the_mean_over_all_ranks_under_torchrun():
    returncode, output = run_torchrun(REPO_ROOT / "tests" / "dist_chat_check.py")
    assert returncode == 0 and "rank 0 ok" in output, output
