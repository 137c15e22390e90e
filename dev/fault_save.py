"""
Fault injection for checkpoint saves: kill -9 base_train while it writes a checkpoint, resume from the
last complete step, repeat; then compare the final weights with those of an uninterrupted run.

    NANOCHAT_DATA_DIR=../shared/data python -m dev.fault_save --kills 12

Prints one row per kill (the step being saved, the temp files the kill left, the last complete step and
whether it loads), then whether the restarts removed every temp file and whether the final weights are
bit-identical to the uninterrupted run's (resume is exact on CPU).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from nanochat.checkpoint_manager import complete_steps, meta_path, model_path, optim_path
from nanochat.common import TEMP_FILE_RE

parser = argparse.ArgumentParser(description="Kill base_train during checkpoint saves, resume, compare")
parser.add_argument("--kills", type=int, default=12)
parser.add_argument("--steps", type=int, default=40, help="training steps; a checkpoint after every one")
parser.add_argument("--seed", type=int, default=0, help="picks after how many saves each run is killed")
args = parser.parse_args()
rng = random.Random(args.seed)

TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=128", "--device-batch-size=4", "--total-batch-size=1024",
        "--core-metric-every=-1", "--sample-every=-1", "--device-type=cpu", "--eval-every=-1",
        "--eval-tokens=2048", f"--num-iterations={args.steps}", "--save-every=1"]


def start(base_dir, *flags):
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "OMP_NUM_THREADS": "1"}
    log = open(os.path.join(base_dir, "train.log"), "a")  # a file, not a pipe: nobody reads it while it runs
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY, *flags], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def finished(process, base_dir):
    assert process.wait() == 0, open(os.path.join(base_dir, "train.log")).read()[-3000:]


def temp_files(checkpoint_dir, pid=None):
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    return sorted(name for name in names if (match := TEMP_FILE_RE.match(name)) and pid in (None, int(match["pid"])))


def step_of(name):
    return int(re.search(r"_(\d{6,})", name).group(1))


def kill_during_a_save(process, checkpoint_dir, num_saves):
    """SIGKILL the process while it writes its num_saves-th checkpoint; -> False if it finished first."""
    steps_seen = set()
    while process.poll() is None:
        names = temp_files(checkpoint_dir, process.pid)
        steps_seen |= {step_of(name) for name in names}
        if names and len(steps_seen) >= num_saves:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    return False


def loads(checkpoint_dir, step):
    """Read the step's files directly (load_checkpoint would already remove the temp files)."""
    torch.load(model_path(checkpoint_dir, step), map_location="cpu")
    torch.load(optim_path(checkpoint_dir, step, 0), map_location="cpu")
    with open(meta_path(checkpoint_dir, step)) as f:
        return "loop_state" in json.load(f)


work = tempfile.mkdtemp(prefix="fault_save_")
reference_dir, faulty_dir = os.path.join(work, "reference"), os.path.join(work, "faulty")
subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max-chars=2000000", "--vocab-size=1024"], check=True,
               env={**os.environ, "NANOCHAT_BASE_DIR": reference_dir}, stdout=subprocess.DEVNULL)
shutil.copytree(os.path.join(reference_dir, "tokenizer"), os.path.join(faulty_dir, "tokenizer"))
finished(start(reference_dir), reference_dir)
checkpoint_dir = os.path.join(faulty_dir, "base_checkpoints", "d2")

print("| kill | resumed from | killed while writing | last complete step | it loads | earlier kills' temp files left |")
print("|---|---|---|---|---|---|")
kills, left = 0, []
while kills < args.kills:
    steps = complete_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    resume = steps[-1] if steps else None
    if resume == args.steps:
        break
    process = start(faulty_dir, *([f"--resume-from-step={resume}"] if resume is not None else []))
    if not kill_during_a_save(process, checkpoint_dir, rng.randint(1, 3)):
        finished(process, faulty_dir)
        continue
    kills += 1
    earlier_left = sum(name in os.listdir(checkpoint_dir) for name in left)  # the restart should have removed them
    left = temp_files(checkpoint_dir, process.pid)
    last = complete_steps(checkpoint_dir)[-1] if complete_steps(checkpoint_dir) else None
    ok = last is not None and loads(checkpoint_dir, last)
    shown = ", ".join(name.split(".")[1] for name in left) or "(between files)"
    print(f"| {kills} | {resume if resume is not None else 'fresh'} | {shown} | {last} | {'yes' if ok else 'NO'} | "
          f"{earlier_left} |", flush=True)

finished(start(faulty_dir, f"--resume-from-step={complete_steps(checkpoint_dir)[-1]}"), faulty_dir)
print(f"temp files left after the final resumed run: {len(temp_files(checkpoint_dir))}")
a = torch.load(model_path(os.path.join(reference_dir, "base_checkpoints", "d2"), args.steps), map_location="cpu")
b = torch.load(model_path(checkpoint_dir, args.steps), map_location="cpu")
identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"step {args.steps} weights after {kills} kills and resumes == uninterrupted run: {identical}")
shutil.rmtree(work)
