"""
Gather finished base runs into one CSV row each (used by runs/miniseries.sh and runs/scaling_laws.sh):
    python -m dev.collect_runs --tags s1e18_d8 s1e18_d10 ... --out results.csv [--flops 1e18 ...]
Reads base_checkpoints/<tag>/meta_<last>.json (config, val bpb) and base_eval/base_<tag>_<step>.csv (CORE).
"""
import os
import csv
import json
import argparse

import torch

from nanochat.common import get_base_dir
from nanochat.checkpoint_manager import find_last_step
from nanochat.gpt import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--tags", nargs="+", required=True)
parser.add_argument("--flops", nargs="*", default=None, help="the FLOPs budget of each tag (same order)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

rows = []
for i, tag in enumerate(args.tags):
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", tag)
    step = find_last_step(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json")) as f:
        meta = json.load(f)

    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    counts = model.num_scaling_params()
    core = ""
    core_csv = os.path.join(get_base_dir(), "base_eval", f"base_{tag}_{step:06d}.csv")
    if os.path.exists(core_csv):
        with open(core_csv) as f:
            core = list(csv.reader(f))[-1][2]  # the last row holds the CORE metric
    tokens = meta["resolved"]["total_batch_size"] * step  # (the flag may be -1: automatic)
    rows.append({"flops_budget": args.flops[i] if args.flops else "", "tag": tag,
                 "depth": meta["model_config"]["n_layer"], "params_total": counts["total"],
                 "params_scaling": counts["transformer_matrices"] + counts["lm_head"], "tokens": tokens,
                 "val_bpb": meta["val_bpb"], "core": core})

with open(args.out, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"Wrote {len(rows)} rows to {args.out}")
