"""
The CORE metric of a trained model (DCLM's in-context-learning tasks; see nanochat/core_eval.py).

    python -m scripts.base_eval                                   # latest base model, every example
    python -m scripts.base_eval --max-per-task=100                # quicker and noisier
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- -i sft

The eval bundle comes from $NANOCHAT_DATA_DIR/eval_bundle, else base_dir/eval_bundle (downloaded there
once). A bundle that lacks some task files gives a score labelled e.g. "CORE (18/22 tasks)".
Writes base_dir/base_eval/<source>_<tag>_<step>.csv and the "Base model evaluation" report section.
"""

import argparse
import csv
import os
import sys
import time

from nanochat.checkpoint_manager import STAGE_DIRS, find_checkpoint, load_model
from nanochat.common import compute_cleanup, compute_init, get_base_dir, print0, print_banner, positive
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
from nanochat.report import get_report
from nanochat.run import add_checkpoint_flags

CPU_MAX_PER_TASK = 100

parser = argparse.ArgumentParser(description="Evaluate a model on the CORE metric")
add_checkpoint_flags(parser, "base", sorted(STAGE_DIRS))
parser.add_argument("--max-per-task", type=int, default=None, help="examples per task, a fixed random subset (-1 = all; "
                    f"default: all on a GPU, {CPU_MAX_PER_TASK} elsewhere, where the whole bundle takes hours)")
parser.add_argument("--batch-size", type=positive(int), default=16, help="rows (prompts) per forward pass")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
args = parser.parse_args()

print_banner()
ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
try:
    bundle_dir = get_eval_bundle_dir()  # first: no point loading a model we cannot evaluate
except RuntimeError as e:
    sys.exit(str(e))
_, model_tag, step = find_checkpoint(args.source, args.model_tag, args.step)
model, tokenizer, meta = load_model(args.source, device, "eval", model_tag, step)
print0(f"Evaluating {args.source} model {model_tag} step {step} on {world_size} process(es)")

max_per_task = args.max_per_task if args.max_per_task is not None else -1 if device.type == "cuda" else CPU_MAX_PER_TASK
t0 = time.time()
core = evaluate_core(model, tokenizer, device, bundle_dir=bundle_dir, max_per_task=max_per_task,
                     batch_size=args.batch_size)
elapsed = time.time() - t0

if rank == 0:
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{args.source}_{model_tag}_{step:06d}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered"])
        for label, accuracy in core["results"].items():
            writer.writerow([label, f"{accuracy:.6f}", f"{core['centered_results'][label]:.6f}"])
        writer.writerow([core["label"], "", f"{core['core_metric']:.6f}"])
    print0(f"{core['label']}: {core['core_metric']:.4f} in {elapsed:.0f}s; per-task results in {csv_path}")

    summary = {"Source": args.source, "Model tag": model_tag, "Step": step,
               "Examples per task": "all" if max_per_task < 0 else max_per_task,
               core["label"]: core["core_metric"], "Evaluation time (s)": round(elapsed, 1)}
    if core["missing_tasks"]:
        summary["Missing tasks"] = ", ".join(core["missing_tasks"])
    per_task = {label: f"accuracy {accuracy:.4f}, centered {core['centered_results'][label]:+.4f}"
                for label, accuracy in core["results"].items()}
    get_report().log(section="Base model evaluation", data=[summary, per_task])

compute_cleanup()
