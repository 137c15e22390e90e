"""
Bits per byte: the validation metric every pretraining comparison uses.

Mean cross entropy per token depends on the tokenizer (a bigger vocab packs more bytes per token and so
has a larger loss per token). Dividing the summed loss by the number of bytes those tokens stand for,
and converting nats to bits, gives a number that compares across tokenizers and vocab sizes (the
measure The Pile reports, Gao et al. 2020).
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import is_distributed, progress_bar


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    batches yields (inputs, targets[, ...]) int64 (B, T) tensors; `steps` of them are evaluated.
    token_bytes: (vocab_size,) int tensor on the model's device, UTF-8 bytes per token id, 0 for special
    tokens. Targets that are special tokens (0 bytes) or ignored (-1) count neither nats nor bytes.
    Sums are all-reduced across ranks, so every rank returns the same number. The model evaluates in eval
    mode and is then put back in the mode it was in.
    """
    device = token_bytes.device
    # float64 keeps the sum exact over millions of tokens (MPS has no float64)
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=sum_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    was_training = model.training
    model.eval()
    bar = progress_bar(steps, "bpb")
    for _ in range(steps):
        inputs, targets = next(batch_iter)[:2]
        losses = model(inputs, targets, loss_reduction="none").view(-1)
        targets = targets.view(-1)
        num_bytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += torch.where(num_bytes > 0, losses, 0.0).sum(dtype=sum_dtype)
        total_bytes += num_bytes.sum()
        bar.update(1)
    bar.close()
    model.train(was_training)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")  # nothing to score (e.g. all targets were special tokens)
    return total_nats.item() / (math.log(2) * total_bytes)
