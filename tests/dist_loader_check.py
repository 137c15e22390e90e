"""
torchrun worker for tests/test_dataloader.py (2 ranks, gloo): each rank runs the best-fit loader on
the val split of $NANOCHAT_DATA_DIR through one epoch; rank 0 checks that the ranks read disjoint
row groups that together cover the split, and that no document reached both ranks.
Usage: torchrun --nproc_per_node=2 tests/dist_loader_check.py TOKENIZER_DIR
Exits non-zero (an AssertionError) on any violation.
"""

import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.dataset import iter_row_groups
from nanochat.tokenizer import RustBPETokenizer

_, rank, _, world_size, _ = compute_init("cpu")
tokenizer = RustBPETokenizer.from_directory(sys.argv[1])
bos = tokenizer.get_bos_token_id()

row_groups, documents = set(), set()
loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, 8, 512, "val", buffer_size=50)
for inputs, targets, state in loader:
    if state["epoch"] > 1:
        break
    row_groups.add((state["pq_idx"], state["rg_idx"]))
    for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
        starts = [i for i, token in enumerate(row) if token == bos]
        # every segment but the last is a whole document (the last may be cropped)
        documents.update(tokenizer.decode(row[a + 1:b]) for a, b in zip(starts, starts[1:]))

gathered = [None] * world_size
dist.all_gather_object(gathered, (row_groups, documents))
if rank == 0:
    (groups0, docs0), (groups1, docs1) = gathered
    all_groups = {(pq_idx, rg_idx) for pq_idx, rg_idx, _ in iter_row_groups("val")}
    assert groups0 and groups1 and not groups0 & groups1, (groups0, groups1)
    assert groups0 | groups1 <= all_groups
    assert docs0 and docs1 and not docs0 & docs1, "a document reached both ranks"
    print(f"rank 0 ok: row groups {sorted(groups0)} vs {sorted(groups1)}, {len(docs0)} + {len(docs1)} documents, disjoint")
compute_cleanup()
