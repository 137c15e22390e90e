"""
--device-batch-size=-1: the largest per-device batch that fits in the GPU's memory, found by trying it.

Gradient accumulation keeps the optimizer's batch (tokens per step) the same whatever number of rows one
forward takes, so the per-device batch is only a speed knob: larger is faster until memory runs out. Instead
of leaving the user to find that edge by crashing (the most common report from people training on 16-24 GB
cards), the run tries a forward+backward at its real sequence length with the largest candidate, then
smaller ones after each out-of-memory error, and takes the first size that fits. The candidates divide the rows each rank
must process per step, so gradient accumulation stays exact. Every rank probes its own device and all take
the smallest answer: the ranks of one run must run the same shapes. Evaluation, without gradients, probes a
forward only and gets a larger answer.

The probe's forward is the eager model's (a compiled model would compile once per candidate): eager attention
and activations take more memory than compiled ones, so the answer errs on the safe side. Memory that the
optimizer allocates only at its first step (AdamW's two moments, Muon's momentum) is held aside during a
training probe so that it fits too.
"""

import torch
import torch.distributed as dist

from nanochat.common import UserError, print0

CPU_DEVICE_BATCH_SIZE = 32  # no out-of-memory to find on a CPU (the RAM is large, and rows past ~8 add no speed)


def divisors_descending(n, cap=None):
    """The divisors of n, largest first, none above cap."""
    return [d for d in range(n, 0, -1) if n % d == 0 and (cap is None or d <= cap)]


def largest_that_fits(try_rows, candidates):
    """The first of `candidates` (largest first) for which try_rows(rows) raises no torch.OutOfMemoryError, or None.
    (A failing try usually stops early in the forward, so trying each divisor in turn costs little.)"""
    for rows in candidates:
        try:
            try_rows(rows)
            return rows
        except torch.OutOfMemoryError:
            pass
    return None


def optimizer_state_bytes(model):
    """An upper bound on what the optimizer allocates at its first step: two fp32 moments per parameter."""
    return sum(2 * 4 * p.numel() for p in model.parameters())


def probe_rows(model, seq_len, rows, train):
    """One forward (+ backward when train) of `rows` rows of seq_len tokens, leaving nothing behind."""
    device = model.get_device()
    ids = torch.zeros(rows, seq_len, dtype=torch.long, device=device)  # the memory does not depend on the ids
    reserve = torch.empty(optimizer_state_bytes(model) if train else 0, dtype=torch.uint8, device=device)
    try:
        if train:
            model(ids, ids).backward()
        else:
            with torch.no_grad():
                model(ids)
    finally:
        del ids, reserve
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def auto_device_batch_size(model, seq_len, rows_per_step, train=True, probe=None):
    """
    The per-device batch (rows of seq_len tokens) for --device-batch-size=-1. rows_per_step: rows this rank
    processes per optimizer step (total batch / (seq_len x ranks)), or an upper bound for evaluation; the
    answer divides it. probe: run the probe (default: on CUDA only; a CPU takes CPU_DEVICE_BATCH_SIZE, or the
    largest divisor below it). The same answer on every rank.
    """
    device = model.get_device()
    probe = device.type == "cuda" if probe is None else probe
    if not probe:
        rows = divisors_descending(rows_per_step, CPU_DEVICE_BATCH_SIZE)[0]
    else:
        was_training = model.training
        model.train(train)
        rows = largest_that_fits(lambda n: probe_rows(model, seq_len, n, train), divisors_descending(rows_per_step))
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        agreed = torch.tensor(rows or 0, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # a rank that fits fewer rows sets the size for all
        rows = agreed.item() or None
    if rows is None:
        raise UserError(f"Not even one row of {seq_len} tokens fits for a {'training' if train else 'forward'} "
                                     f"step: use a smaller --max-seq-len or --depth, or a device with more memory")
    print0(f"Device batch size: {rows} rows of {seq_len} tokens ({'found by trying' if probe else 'the default off CUDA'}"
           f"{', forward only' if not train else ''}; of up to {rows_per_step} per step)")
    return rows
