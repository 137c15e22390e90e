"""
A training run's life, the same for base_train, chat_sft and chat_rl: its flags, its start (device, ranks,
wandb), its state (RunState: exactly what a checkpoint's meta_*.json holds), resuming it, saving it, when an
evaluation is due, and its log (the per-step line, the curve, wandb, the report). The loop itself stays in
each script: `if run.due(args.eval_every, step, last_step): ...`, `if run.save_due(step, last_step): run.save(...)`.
"""

import functools
import gc
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields

import torch.distributed as dist

from nanochat.checkpoint_manager import complete_steps, load_checkpoint, prune_checkpoints, save_checkpoint, set_aside
from nanochat.common import (UserError, compute_cleanup, compute_init, format_duration, get_max_memory_mb, init_wandb,
                             is_distributed, positive, print0, print_banner)
from nanochat.report import get_report


@dataclass
class RunState:
    """
    What a checkpoint's meta_{step:06d}.json holds: its fields are the JSON keys. It rebuilds the model
    (model_config) and, with the weights and every rank's optimizer shard, lets a resumed run continue
    exactly. A field that a stage does not use stays None.
    """
    step: int = 0  # optimizer steps taken
    finished: bool = False  # the run's last step: a re-run pipeline skips the stage (nanochat/pipeline.py)
    model_config: dict = None  # GPTConfig as a dict
    user_config: dict = None  # the script's flags, device defaults resolved
    # smooth_train_loss and total_training_time (StepMeter's), curve: [{step, metric: value, time}] (the report
    # plots it); sft adds progress (the fraction of training done)
    loop_state: dict = field(default_factory=lambda: {"smooth_train_loss": 0.0, "total_training_time": 0.0, "curve": []})
    loss_scale: list = None  # [scale, clean_steps] of fp16's GradScaler
    device_batch_size: int = None  # base, sft: rows per forward pass
    max_seq_len: int = None  # base, sft: tokens per row
    resolved: dict = None  # base, sft: total_batch_size and the batch-scaled LRs trained with (SFT starts from these)
    source: dict = None  # sft, rl: {stage, model_tag, step} of the checkpoint the run started from
    dataloader_state_dict: dict = None  # base: the pretraining loader's position (every rank derives its own)
    data_states: list = None  # sft: each rank's position in the mixture, rank 0's first
    val_bpb: float = None  # base, sft: the last val bpb
    chatcore: dict = None  # sft: the last ChatCORE and its per-task accuracies
    val_pass_at_k: dict = None  # rl: the last GSM8K pass@1 and pass@k
    sha256: dict = None  # {file name: sha256} of the step's files, written by save_checkpoint (checked when loading)

    @classmethod
    def from_meta(cls, meta):
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in meta.items() if key in known})


def add_run_flags(parser, dry_run=True):
    """The flags of every training run: where it runs, its wandb name, and its checkpoints."""
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    parser.add_argument("--keep-last", type=positive(int), default=None, help="keep only the N newest checkpoints (default: all)")
    parser.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-1 = fresh run)")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help="train and evaluate, but write no checkpoint or report")


def add_checkpoint_flags(parser, source, choices, required=False):
    """-i/-g/-s: the checkpoint a script loads (stage, model tag, step); load_model picks what is not given."""
    parser.add_argument("-i", "--source", type=str, default=source, choices=choices, required=required,
                        help="which stage's checkpoint")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag (default: the largest model)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")


def check_resume_step(resume_step, num_iterations):
    """
    Every stage that resumes calls this once its horizon is known: the loop runs from the resumed step
    up to num_iterations, so a step at or past the end would never reach its last step.
    """
    if not 0 <= resume_step < num_iterations:
        raise UserError(f"Cannot resume from step {resume_step}: this run ends at step {num_iterations}. Resume "
                        f"from an earlier step, or train for more steps (--num-iterations > {resume_step})")


def gather_from_ranks(value):
    """-> [rank 0's value, rank 1's, ...] on every rank: per-rank state (a data position) for meta, which rank 0 writes."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def restore_process_state(main):
    """
    For a script's main(): leave the interpreter as main() found it, so that tests can call it in-process. A run
    freezes and disables the garbage collector (base_train, after its first step), undone however main() ends,
    and installs compute_init's excepthook, undone when main() returns: an error escaping main() still needs it
    (it prints a user error as one line; tests/conftest.py restores the hook after every test).
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        excepthook, gc_enabled, gc_frozen = sys.excepthook, gc.isenabled(), gc.get_freeze_count()
        try:
            result = main(*args, **kwargs)
        finally:
            if not gc_frozen:
                gc.unfreeze()
            if gc_enabled:
                gc.enable()
        sys.excepthook = excepthook
        return result
    return wrapper


class Run:
    """One training run: its flags, device and ranks, wandb, and the steps it resumes, saves and evaluates at."""

    def __init__(self, args, wandb_project, device_defaults=None):
        """
        The banner, the device and ranks (compute_init), then the flags left at None take their device default
        (device_defaults: {flag: (value on CUDA, value elsewhere)}: evaluations sized for an H100 would take
        hours on a CPU), then wandb, which records the flags.
        """
        print_banner()
        self.args = args
        self.ddp, self.rank, _, self.world_size, self.device = compute_init(args.device_type)
        for name, (gpu, other) in (device_defaults or {}).items():
            if getattr(args, name) is None:
                setattr(args, name, gpu if self.device.type == "cuda" else other)
        self.user_config = vars(args).copy()
        self.wandb = init_wandb(args.run, wandb_project, self.user_config, self.rank == 0)
        self.state = None  # the RunState that log() adds curve points to: set by resume(), or by the script
        self.saved = False  # whether this run saved a checkpoint yet

    def resume(self, checkpoint_dir, model, optimizer, scaler):
        """
        Continue from the --resume-from-step checkpoint of this run: the weights into the freshly built model,
        this rank's optimizer shard into its optimizer, fp16's loss scale into the scaler -> its RunState.
        """
        step = self.args.resume_from_step
        print0(f"Resuming from step {step} of {checkpoint_dir}")
        model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, step, self.device, load_optimizer=True,
                                                           rank=self.rank)
        saved_world_size = optimizer_data.get("world_size", 1)
        if saved_world_size != self.world_size:
            raise UserError(f"Step {step} in {checkpoint_dir} was saved by {saved_world_size} process(es) and this run has "
                            f"{self.world_size}: each holds only its shard of the optimizer, so resume with {saved_world_size}")
        model.load_state_dict(model_data, strict=True)  # (copied into the model's dtypes: fp32 file, bf16 embeddings)
        optimizer.load_state_dict(optimizer_data)
        self.state = RunState.from_meta(meta)
        if self.state.loss_scale is not None:  # (absent in checkpoints of older base runs: fp16 runs were not resumable)
            scaler.scale, scaler.clean_steps = self.state.loss_scale
        self.state.user_config = self.user_config
        return self.state

    def due(self, every, step, last_step, first_step=0):
        """
        Is an evaluation done `every` N steps (-1 never, 0 only at the end) due at `step`? At multiples of N
        from first_step on and at the last step, but never at the step this run resumed from: that step was
        evaluated before the interruption, and its results came back with the checkpoint.
        """
        if every < 0 or step == self.args.resume_from_step:
            return False
        return last_step or (every > 0 and step >= first_step and step % every == 0)

    def save_due(self, step, last_step):
        """Save every --save-every steps and always at the end (not under --dry-run)."""
        if getattr(self.args, "dry_run", False):
            return False
        return last_step or self.due(self.args.save_every, step, False, first_step=1)

    def save(self, checkpoint_dir, state, model, optimizer, scaler):
        """
        Every rank writes its optimizer shard (so every rank calls this), rank 0 the weights and `state` as meta;
        then rank 0 keeps the --keep-last newest checkpoints and the step this run resumed from.
        """
        state.loss_scale = [scaler.scale, scaler.clean_steps]
        if not self.saved and self.args.resume_from_step == -1:
            self.set_aside_earlier_run(checkpoint_dir)
        self.saved = True
        save_checkpoint(checkpoint_dir, state.step, model.state_dict(), optimizer.state_dict(), asdict(state), rank=self.rank)
        print0(f"Saved checkpoint step {state.step} to {checkpoint_dir}")
        if self.rank == 0 and self.args.keep_last:
            resumed = self.args.resume_from_step
            prune_checkpoints(checkpoint_dir, self.args.keep_last, keep_steps=[resumed] if resumed != -1 else [])

    def set_aside_earlier_run(self, checkpoint_dir):
        """
        A fresh run saving where an earlier run left checkpoints would overwrite some of them and leave the rest,
        and the newest step (which loads by default) could then be the earlier run's: rank 0 moves the earlier
        run aside first (kept: base_dir/replaced/), saying so.
        """
        earlier = os.listdir(checkpoint_dir) if self.rank == 0 and os.path.isdir(checkpoint_dir) else []
        if any(name.startswith(("model_", "meta_", "optim_")) for name in earlier):
            steps = complete_steps(checkpoint_dir)
            aside = set_aside(checkpoint_dir)
            print0(f"Note: {checkpoint_dir} held an earlier run's checkpoints (steps {steps or 'none complete'}): "
                   f"moved them to {aside} (delete it when no longer needed; --resume-from-step continues a run)")
        if self.ddp:
            dist.barrier()  # no rank writes its optimizer shard before the folder is clear

    def log(self, text, step, wandb_only=None, **metrics):
        """Print text (rank 0), add {step, **metrics, time} to the curve, and send the metrics (and wandb_only) to wandb."""
        print0(text)
        loop_state = self.state.loop_state
        loop_state["curve"].append({"step": step, **metrics, "time": loop_state["total_training_time"]})
        self.wandb.log({key: value for key, value in {"step": step, **metrics, **(wandb_only or {})}.items() if value is not None})

    def report(self, section, data):
        """The stage's report section: its flags, `data` and the curve (not under --dry-run)."""
        if not getattr(self.args, "dry_run", False):
            get_report().log(section=section, data=[self.user_config, data], curve=self.state.loop_state["curve"])

    def finish(self):
        print0(f"Peak memory: {get_max_memory_mb(self.device.type):.0f} MiB")
        print0(f"Total training time: {format_duration(self.state.loop_state['total_training_time'])}")
        self.wandb.finish()
        compute_cleanup()


class StepMeter:
    """
    The per-step numbers of a training loop: the train loss as a debiased EMA (beta 0.9), the time spent training
    (without the first `warmup_steps` steps: compilation and warmup), throughput, MFU, the ETA, and the log line.
    Its state lives in the run's loop state (smooth_train_loss, total_training_time): a resumed run continues it.
    """

    def __init__(self, loop_state, warmup_steps=10, tokens_per_step=None, flops_per_token=None, peak_flops=None):
        self.state, self.warmup_steps = loop_state, warmup_steps
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops

    def update(self, step, dt, loss=None):
        """Count a step (its number, from 1) of dt seconds -> the debiased EMA of the loss (None without one)."""
        if step > self.warmup_steps:
            self.state["total_training_time"] += dt
        if loss is not None:
            self.state["smooth_train_loss"] = 0.9 * self.state["smooth_train_loss"] + 0.1 * loss
            return self.state["smooth_train_loss"] / (1 - 0.9 ** step)

    def mfu(self, dt):
        """Percent of the peak FLOP/s of all ranks (peak_flops: theirs summed), or None where the peak is unknown (CPUs)."""
        if not self.flops_per_token or self.peak_flops is None or not math.isfinite(self.peak_flops):
            return None
        return 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak_flops

    def eta(self, step, progress):
        """Seconds left when `progress` (a fraction) of the run took `step` steps, at the pace of the timed steps;
        None before the first timed step (the steps before it compile and warm up: their pace says nothing)."""
        timed_steps = step - self.warmup_steps
        if timed_steps <= 0:
            return None
        return self.state["total_training_time"] / timed_steps * step * (1 - progress) / max(progress, 1e-9)

    def line(self, step, total_steps, progress, dt, before=(), after=()):
        """step N/total (progress%) | *before | dt | tok/sec | mfu | *after | eta: what a loop prints after a step."""
        parts = [f"step {step:05d}/{total_steps} ({100 * progress:5.1f}%)", *before, f"dt {dt * 1000:.0f}ms"]
        if self.tokens_per_step:
            parts.append(f"tok/sec {int(self.tokens_per_step / dt):,}")
        if (mfu := self.mfu(dt)) is not None:
            parts.append(f"mfu {mfu:.2f}")
        eta = self.eta(step, progress)
        return " | ".join([*parts, *after, f"eta {format_duration(eta)}" if eta is not None else
                           f"eta after step {self.warmup_steps} (compiling, warming up)"])
