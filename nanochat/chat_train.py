"""
What the chat training stages share: rendered conversations -> training rows, best-fit packing of
conversations into padded rows (SFT), the per-step loss normaliser, and RL's group-relative
advantages and policy-gradient loss.

A rendered conversation is (ids, mask) from tokenizer.render_conversation: mask is 1 on the tokens the
assistant must produce. A training row of width T is inputs[t] = ids[t] and targets[t] = ids[t + 1]
where mask[t + 1] is 1, else -1; the model's cross entropy ignores -1, so user turns, tool outputs the
engine forces in, and padding are never trained.
"""

import os

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_optimizer_shard, optim_path
from nanochat.common import is_distributed
from nanochat.dataloader import BestFitPacker

IGNORE_INDEX = -1  # target of a position that is not trained (the model's cross entropy skips it)


def training_rows(rows, width, pad_id):
    """
    rows: (ids, mask) pairs of at most width + 1 tokens -> inputs, targets: int64 (len(rows), width)
    CPU tensors. A shorter row is padded: inputs with pad_id (any valid id; causal attention keeps it
    from affecting the real tokens before it), targets with IGNORE_INDEX.
    """
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(rows):
        if not 1 <= len(ids) <= width + 1 or len(mask) != len(ids):
            raise ValueError(f"row {row}: need 1..{width + 1} ids and a mask of the same length, "
                             f"got {len(ids)} ids and {len(mask)} mask values")
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return inputs, targets


class RenderedConversation:
    """(ids, mask) of the dataset's conversation `index` as the packer sees it: its len() is its number of tokens."""

    __slots__ = ("ids", "mask", "index")

    def __init__(self, ids, mask, index):
        self.ids, self.mask, self.index = ids, mask, index

    def __len__(self):
        return len(self.ids)


def conversation_batches(dataset, tokenizer, batch_size, seq_len, device, rank=0, world_size=1, buffer_size=100,
                         resume_state=None):
    """
    Yield (inputs, targets, state) forever: batch_size best-fit packed rows of seq_len tokens from the
    conversations of dataset (a task), each row padded after its last whole conversation. Rank r
    renders conversations r, r + W, ... cycling through the dataset. Every row starts at a conversation
    start and no conversation is cropped, except one longer than a row: it is truncated to the row
    (it then fills a row alone), because its beginning still teaches the format and the answer's start;
    dropping it would lose that and skew the mixture against long conversations.
    buffer_size: conversations the packer chooses from (more: fuller rows, but farther from the
    mixture's order). state: {"cursor": next conversation index this rank renders, "pending": the
    conversations waiting in the packer, in the order they were added, "epoch_progress": conversations
    packed into rows on all ranks / len(dataset), "truncated": conversations this rank truncated so far}.
    Passing a state back as resume_state continues exactly where it was taken: the pending conversations
    are rendered again and re-added in their order, which rebuilds the packer as it was (it orders them
    by length, equal lengths in the order added).
    """
    row_len = seq_len + 1
    packer = BestFitPacker(row_len)
    pad_id = tokenizer.get_bos_token_id()

    def render(index):
        # one token more than a row shows which conversations are longer than a row
        ids, mask = tokenizer.render_conversation(dataset[index % len(dataset)], max_tokens=row_len + 1)
        return RenderedConversation(ids[:row_len], mask[:row_len], index), len(ids) > row_len

    state = resume_state or {"cursor": rank, "pending": [], "truncated": 0}
    cursor, num_truncated = state["cursor"], state["truncated"]
    pending = dict.fromkeys(state["pending"])  # an ordered set of the conversation indices in the packer
    for index in pending:
        packer.add(render(index)[0])
    while True:
        rows = []
        for _ in range(batch_size):
            while len(packer) < buffer_size:
                conversation, truncated = render(cursor)
                packer.add(conversation)
                pending[cursor] = None
                num_truncated += truncated
                cursor += world_size
            docs = packer.take_docs()
            for doc in docs:
                del pending[doc.index]
            rows.append(([t for doc in docs for t in doc.ids], [m for doc in docs for m in doc.mask]))
        inputs, targets = training_rows(rows, seq_len, pad_id)
        num_packed = (cursor - rank) // world_size - len(packer)  # conversations of this rank packed into rows
        state = {"cursor": cursor, "pending": list(pending), "epoch_progress": num_packed * world_size / len(dataset),
                 "truncated": num_truncated}
        yield inputs.to(device), targets.to(device), state


def loss_normaliser(step_targets):
    """
    What each micro-batch's SUMMED token loss is divided by: the number of trained targets (not -1)
    in all micro-batches of the optimizer step on all ranks, divided by the number of ranks (the
    optimizer averages gradients over ranks). The step's gradient is then the mean over every trained
    token, however they are spread over micro-batches and ranks; a micro-batch (or a whole step)
    without any trained token contributes a zero loss and zero gradient, never 0/0 = NaN.
    """
    count = sum((targets != IGNORE_INDEX).sum() for targets in step_targets).to(torch.float32)
    world_size = 1
    if is_distributed():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        world_size = dist.get_world_size()
    return count.clamp(min=1) / world_size


def load_optimizer_state(checkpoint_dir, step, rank, world_size, device):
    """
    -> (this rank's optimizer state saved with a checkpoint, None) to warm-start fine-tuning, or
    (None, why not) when there is none for this number of ranks: each rank of a multi-rank run saved
    only its shard, so the saved state is usable only with the same number of ranks.
    """
    paths = [optim_path(checkpoint_dir, step, r) for r in range(world_size)]
    if not all(os.path.exists(path) for path in paths):
        return None, f"no optimizer state for {world_size} rank(s) at step {step} in {checkpoint_dir}; starting a fresh optimizer"
    state = load_optimizer_shard(checkpoint_dir, step, device, rank)
    saved_world_size = state.get("world_size", 1)
    if saved_world_size != world_size:
        return None, (f"the optimizer state in {checkpoint_dir} was saved by {saved_world_size} rank(s), this run has "
                      f"{world_size}; starting a fresh optimizer (run on {saved_world_size} to warm-start it)")
    return state, None


# -----------------------------------------------------------------------------
# RL: GRPO-lite, after GRPO (DeepSeekMath, Shao et al. 2024): on-policy, so no importance ratio, clipping or
# KL penalty


def group_advantages(rewards):
    """
    rewards (num_questions, num_samples) -> advantage = reward - mean reward of the same question's
    samples. Not divided by the group's std as GRPO does (Dr. GRPO drops it too: Liu et al. 2025,
    "Understanding R1-Zero-Like Training: A Critical Perspective"): that would give a question almost every
    sample gets right (or wrong) as large an update as an open one, amplifying the few lucky samples,
    and it is undefined when all samples score the same (their advantages are simply 0 here).
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def policy_gradient_loss(token_nll, targets, advantages, normaliser):
    """
    token_nll (N, T): -log p of each target (model(inputs, targets, loss_reduction="none")); targets
    (N, T) with -1 on the prompt, on tokens the engine forced in and on padding; advantages (N,), one per
    sampled sequence. -> -sum(advantage * log p) over the trained tokens / normaliser (loss_normaliser),
    so minimising it raises the probability of the tokens of better-than-average answers.
    """
    trained = targets != IGNORE_INDEX
    return (torch.where(trained, token_nll, 0.0) * advantages[:, None]).sum() / normaliser
