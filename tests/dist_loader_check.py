"""
torchrun worker for tests/test_dataloader.py (2 ranks) and tests/test_multinode.py (2 nodes x 2 ranks),
gloo: each rank runs the best-fit loader on the val split of $NANOCHAT_DATA_DIR through one epoch; rank 0
checks that the ranks read disjoint row groups that together stay inside the split, that no document
reached two ranks, and that each rank's first batch is the one a single process computes for that
global RANK (with LOCAL_RANK 0: the shard follows the global rank, never the rank on the node).
Usage: torchrun --nproc_per_node=2 tests/dist_loader_check.py TOKENIZER_DIR
Exits non-zero (an AssertionError) on any violation.
"""

import itertools
import os
import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.dataset import iter_row_groups
from nanochat.tokenizer import RustBPETokenizer

_, rank, local_rank, world_size, _ = compute_init("cpu")
tokenizer = RustBPETokenizer.from_directory(sys.argv[1])
bos = tokenizer.get_bos_token_id()


def loader():
    return tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, 8, 512, "val", buffer_size=50)


row_groups, documents, first_batch = set(), set(), None
batches = loader()
for inputs, targets, state in batches:
    if state["epoch"] > 1:
        break
    first_batch = inputs.clone() if first_batch is None else first_batch
    row_groups.add((state["pq_idx"], state["rg_idx"]))
    for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
        starts = [i for i, token in enumerate(row) if token == bos]
        # every segment but the last is a whole document (the last may be cropped)
        documents.update(tokenizer.decode(row[a + 1:b]) for a, b in zip(starts, starts[1:]))
batches.close()

gathered = [None] * world_size
dist.all_gather_object(gathered, (local_rank, row_groups, documents, first_batch))
if rank == 0:
    all_groups = {(pq_idx, rg_idx) for pq_idx, rg_idx, _ in iter_row_groups("val")}
    for (_, groups_a, docs_a, _), (_, groups_b, docs_b, _) in itertools.combinations(gathered, 2):
        assert groups_a and groups_b and not groups_a & groups_b, (groups_a, groups_b)
        assert docs_a and docs_b and not docs_a & docs_b, "a document reached two ranks"
    assert set().union(*(groups for _, groups, _, _ in gathered)) <= all_groups
    # The single-process reference: this process, told it is global rank r on a node of its own.
    saved = {name: os.environ[name] for name in ("RANK", "LOCAL_RANK")}
    for r, (_, _, _, batch) in enumerate(gathered):
        os.environ.update(RANK=str(r), LOCAL_RANK="0")
        reference = loader()
        inputs, _, _ = next(reference)
        reference.close()
        assert torch.equal(inputs, batch), f"rank {r}'s first batch is not the single-process one for RANK={r}"
    os.environ.update(saved)
    print(f"rank 0 ok: {world_size} ranks (local ranks {[g[0] for g in gathered]}), row groups "
          f"{[sorted(g[1]) for g in gathered]}, {[len(g[2]) for g in gathered]} documents, disjoint; first batches "
          "match the single-process reference")
compute_cleanup()
