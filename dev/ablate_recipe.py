"""
Ablation of the 2026 training recipe: run scripts/base_train.py unchanged, with chosen groups of the
recipe turned back to their January 2026 values, to see what each group is worth at a given size.

    python -m dev.ablate_recipe --turn-back=muon,adamw -- --depth=4 --max-seq-len=512 ...   # base_train flags after --
    python -m dev.ablate_recipe --turn-back=all -- ...                                      # the whole January recipe

No user-facing switch exists for the January values: each group below swaps library functions, optimizer
group settings or model config fields before base_train runs, so the training loop itself is the one users
run. Groups (2026 -> January):
  wd       Muon weight decay 0.28 x sqrt(B / 2^19) x D_ref / D, cosine  ->  0.2 x (12 / depth)^2, linear
  horizon  warmup 40 steps, warmdown 0.65, final LR 0.05                ->  no warmup, warmdown 0.4, final LR 0
  lrs      unembedding LR 0.008, value embeddings at 0.5x the embedding LR  ->  0.004, 1x
  adamw    per-group AdamW betas and decays                              ->  betas (0.8, 0.95), no decay
  muon     momentum 0.85 -> 0.97 -> 0.90, NorMuon beta2 0.9, margin 1.01, MuonEq + Muon+
           ->  momentum 0.85 -> 0.95 over 300 steps, beta2 0.95, margin 1.02, neither
  attention  rotary base 100,000, q/k x1.2, short window seq/4  ->  10,000, x1, seq/2
  ve       value-embedding gate 3 sigmoid over 12 channels  ->  2 sigmoid over 32
  init     2026 init (wte std 0.8, c_fc 0.4x, depth-graded lambdas, VE gate U(0, 0.02))  ->  January init
  smear    smear  ->  none
  backout  backout  ->  none
"""

import argparse
import dataclasses
import functools
import runpy
import sys

from nanochat import gpt, optim


def january_weight_decay(argv):
    depth = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--depth=")), 20))
    optim.transfer_weight_decay = lambda weight_decay, *_: weight_decay
    optim.get_weight_decay = lambda step, num_iterations, weight_decay: weight_decay * max(0.0, 1 - step / num_iterations)
    return [f"--weight-decay={0.2 * (12 / depth) ** 2}"]


def january_horizon(argv):
    return ["--warmup-steps=0", "--warmdown-ratio=0.4", "--final-lr-frac=0.0"]


def change_groups(change):
    """Wrap GPT.setup_optimizer so that change(model, group) edits every param group it builds."""
    setup_optimizer = gpt.GPT.setup_optimizer

    def patched(model, *args, **kwargs):
        optimizer = setup_optimizer(model, *args, **kwargs)
        for group in optimizer.param_groups:
            change(model, group)
        return optimizer
    gpt.GPT.setup_optimizer = patched


def is_group_of(group, params):
    return {id(p) for p in group["params"]} == {id(p) for p in params}


def january_lrs(argv):
    def change(model, group):
        if is_group_of(group, model.value_embeds.parameters()):
            group["lr"] = group["initial_lr"] = 2 * group["initial_lr"]
    change_groups(change)
    return ["--unembedding-lr=0.004"]


def january_adamw(argv):
    def change(model, group):
        # x0 kept its own betas in January; the smear/backout gates did not exist (their group stays)
        gates = [p for name, p in model.named_parameters() if name.startswith(gpt.SMEAR_BACKOUT_PARAMS)]
        if group["kind"] == "adamw" and not is_group_of(group, [model.x0_lambdas]) and not is_group_of(group, gates):
            group["betas"], group["weight_decay"] = (0.8, 0.95), 0.0
    change_groups(change)
    return []


def january_muon(argv):
    optim.get_muon_momentum = lambda step, *_: 0.85 + 0.10 * min(step / 300, 1.0)
    optim.POLAR_EXPRESS_MARGIN = 1.02
    optim.equalize_rows = optim.restore_norm = lambda X: X

    def change(model, group):
        if group["kind"] == "muon":
            group["beta2"] = 0.95
    change_groups(change)
    return []


def january_config(**fields):
    """Wrap config_for_depth (the 2026 architecture) to give these fields their January values."""
    config_for_depth = gpt.config_for_depth
    gpt.config_for_depth = lambda *args, **kwargs: dataclasses.replace(config_for_depth(*args, **kwargs), **fields)
    return []


def january_init(argv):
    gpt.build_gpt = functools.partial(gpt.build_gpt, init="january")
    return []


GROUPS = {"wd": january_weight_decay, "horizon": january_horizon, "lrs": january_lrs, "adamw": january_adamw,
          "muon": january_muon,
          "attention": lambda argv: january_config(rotary_base=10000.0, qk_scale=1.0, short_window=0),
          "ve": lambda argv: january_config(ve_gate_channels=32, ve_gate_scale=2.0),
          "init": january_init,
          "smear": lambda argv: january_config(smear=False),
          "backout": lambda argv: january_config(backout=False)}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--turn-back", default="", help=f"comma-separated groups: {', '.join(GROUPS)}, or all")
parser.add_argument("base_train_args", nargs=argparse.REMAINDER, help="-- then base_train's flags")
args = parser.parse_args()
argv = [a for a in args.base_train_args if a != "--"]
names = list(GROUPS) if args.turn_back == "all" else [n for n in args.turn_back.split(",") if n]
unknown = [n for n in names if n not in GROUPS]
if unknown:
    parser.error(f"unknown group(s) {unknown}: choose from {', '.join(GROUPS)}, or all")
extra = []
for name in names:
    extra += GROUPS[name](argv)
print(f"ablate_recipe: January values for {names or 'nothing'}; base_train {' '.join(argv + extra)}")
sys.argv = ["base_train.py", *argv, *extra]  # later flags win: the group's values override
runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
