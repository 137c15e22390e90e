"""
torchrun worker for tests/test_chat_train.py (2 ranks, gloo): the SFT step's gradient, with each
rank's micro-batches holding very different numbers of trained tokens (rank 1 has none in one
micro-batch), is the mean over every trained token of both ranks once the ranks' gradients are
averaged (as the optimizer does). Rank 0 compares it with one process on all the data.
Usage: torchrun --nproc_per_node=2 tests/dist_chat_check.py
Exits non-zero (an AssertionError) on any violation.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.chat_train import IGNORE_INDEX, loss_normaliser
from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import build_gpt
from helpers import tiny_config

# compute_init, not a bare init_process_group: building and running the model imports torch.distributed.nn,
# which, imported after the group exists, keeps the group and its gloo threads alive past its destruction,
# where they can abort the process at exit (see common.py)
_, rank, _, world_size, _ = compute_init("cpu")
torch.manual_seed(0)  # the same model and data on every rank; each rank trains on its own share
model = build_gpt(tiny_config(n_layer=1, n_embd=32), "cpu")
torch.nn.init.normal_(model.lm_head.weight, std=0.1)
inputs = torch.randint(0, 64, (world_size, 2, 3, 16))  # (rank, micro-batch, row, position)
targets = torch.randint(0, 64, (world_size, 2, 3, 16))
targets[0, :, :, 2:] = IGNORE_INDEX  # rank 0: few trained tokens
targets[1, 0] = IGNORE_INDEX  # rank 1: a micro-batch without any

normaliser = loss_normaliser(list(targets[rank]))
for micro_inputs, micro_targets in zip(inputs[rank], targets[rank]):
    (model(micro_inputs, micro_targets, loss_reduction="sum") / normaliser).backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
dist.all_reduce(grads, op=dist.ReduceOp.AVG)

if rank == 0:
    model.zero_grad()
    logits = model(inputs.flatten(0, 2)).flatten(0, 1)
    F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-7)
    print(f"rank 0 ok: averaged gradient = mean over {(targets != IGNORE_INDEX).sum().item()} trained tokens")
compute_cleanup()
