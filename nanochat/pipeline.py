"""
Re-running a pipeline after a crash: a run script passes each step through this runner, and started again,
it redoes only what is not done yet.

    python -m nanochat.pipeline STAGE MODEL_TAG COMMAND...              # COMMAND trains STAGE
    python -m nanochat.pipeline --evaluates STAGE MODEL_TAG COMMAND...  # COMMAND evaluates STAGE's result

STAGE: tok (the tokenizer; MODEL_TAG unused, write -), base, sft or rl (base_dir/<stage dir>/MODEL_TAG). A
training command is skipped when its stage finished, gets --resume-from-step=<newest step> when it was
interrupted, and runs as given otherwise. An evaluation is skipped when it succeeded before on exactly the
result it would evaluate now. So a stage trained again invalidates what follows: the evaluations of its new
result run, and a later stage trained on its old result is moved aside (never deleted) and trained again.
What the runner has seen: base_dir/pipeline.json.
"""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys

from nanochat.checkpoint_manager import (STAGE_DIRS, _read_file, _read_json, complete_steps, meta_path, optim_path,
                                        set_aside)
from nanochat.common import UserError, atomic_write, get_base_dir

STAGES = ["tok", "base", "sft", "rl"]  # in pipeline order: each trains on the result of the one before
TOKENIZER_FILES = ["tokenizer.pkl", "token_bytes.pt"]  # (tokenizer.py writes token_bytes.pt last)


def stage_dir(stage, model_tag):
    return os.path.join(get_base_dir(), "tokenizer" if stage == "tok" else os.path.join(STAGE_DIRS[stage], model_tag))


def result_of(stage, model_tag):
    """What identifies a stage's current result: the newest complete checkpoint and a hash of its meta (which
    differs between any two runs: it holds their timings), or the tokenizer's hash; None when there is none."""
    directory = stage_dir(stage, model_tag)
    if stage == "tok":
        if not all(os.path.exists(os.path.join(directory, name)) for name in TOKENIZER_FILES):
            return None
        path, label = os.path.join(directory, TOKENIZER_FILES[0]), "tokenizer"
    else:
        steps = complete_steps(directory)
        if not steps:
            return None
        path, label = meta_path(directory, steps[-1]), f"{stage} {model_tag} step {steps[-1]}"
    with open(path, "rb") as f:
        return f"{label} ({hashlib.sha256(f.read()).hexdigest()[:16]})"


def stage_progress(stage, model_tag):
    """-> ("finished", step) when the newest complete checkpoint is its run's last (the tokenizer: both files there),
    ("interrupted", step) when --save-every wrote it (the run resumes from it), ("fresh", None) when there is none."""
    directory = stage_dir(stage, model_tag)
    if stage == "tok":
        return ("finished", None) if result_of(stage, model_tag) else ("fresh", None)
    steps = complete_steps(directory)
    if not steps:
        return "fresh", None
    step = steps[-1]
    if _read_file(meta_path(directory, step), step, _read_json).get("finished"):
        return "finished", step
    if not os.path.exists(optim_path(directory, step, 0)):
        raise UserError(f"Step {step} in {directory} is neither the end of a run nor resumable (it has no optimizer "
                        f"state): delete {directory} to train that stage again")
    return "interrupted", step


def read_record():
    """base_dir/pipeline.json: {"trained_on": {"STAGE TAG": result of the stage before}, "evaluated": {command: result}}."""
    path = os.path.join(get_base_dir(), "pipeline.json")
    record = _read_json(path) if os.path.exists(path) else {}
    return {"trained_on": record.get("trained_on", {}), "evaluated": record.get("evaluated", {})}


def write_record(record):
    payload = json.dumps(record, indent=2).encode("utf-8")
    atomic_write(os.path.join(get_base_dir(), "pipeline.json"), lambda f: f.write(payload))


def train(stage, model_tag, command, say):
    """-> the command to run (with --resume-from-step when resuming), or None when the stage is done."""
    key, record = f"{stage} {model_tag}", read_record()
    upstream = result_of(STAGES[STAGES.index(stage) - 1], model_tag) if stage != "tok" else None
    progress, step = stage_progress(stage, model_tag)
    if progress != "fresh" and record["trained_on"].setdefault(key, upstream) != upstream:
        # trained (or begun) on a result of the stage before that has since been replaced: start it again
        directory = stage_dir(stage, model_tag)
        aside = set_aside(directory)
        say(f"trained on {record['trained_on'][key]}, which was replaced by {upstream}: moved {directory} to {aside} "
            f"(delete it when no longer needed); training again")
        progress = "fresh"
    record["trained_on"][key] = upstream
    write_record(record)
    if progress == "finished":
        say(f"finished{f' at step {step}' if step is not None else ''} in {stage_dir(stage, model_tag)}, skipping it")
        return None
    if progress == "interrupted":
        say(f"resuming from step {step} of {stage_dir(stage, model_tag)}")
        return command + [f"--resume-from-step={step}"]
    return command


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluates", action="store_true", help="COMMAND evaluates STAGE's result (else it trains STAGE)")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("model_tag", help="the stage's checkpoint directory, e.g. d20 (tok: -)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command that trains or evaluates the stage")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the command that trains or evaluates the stage")

    def say(text):
        print(f"{args.stage} {args.model_tag}{' (evaluation)' if args.evaluates else ''}: {text}", flush=True)

    try:
        if not args.evaluates:
            command = train(args.stage, args.model_tag, args.command, say)
            if command is not None:
                os.execvp(command[0], command)  # the training command becomes this process (signals, exit status)
            return 0
        result, key = result_of(args.stage, args.model_tag), shlex.join(args.command)
        if result is not None and read_record()["evaluated"].get(key) == result:
            say(f"done before on {result}, skipping `{key}`")
            return 0
        status = subprocess.call(args.command)
    except UserError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except (FileNotFoundError, PermissionError) as e:  # (from execvp or call: no such program)
        parser.exit(127, f"{parser.prog}: error: cannot run {args.command[0]}: {e.strerror}\n")
    except KeyboardInterrupt:  # the command got the Ctrl-C too, and stopped
        return 130
    if status == 0 and result is not None and result == result_of(args.stage, args.model_tag):
        record = read_record()
        record["evaluated"][key] = result
        write_record(record)
    return status


if __name__ == "__main__":
    sys.exit(main())
