"""What the stage scripts share: run and checkpoint flags, the run's start, saving, the step meter."""

from nanochat.checkpoint_manager import prune_checkpoints, save_checkpoint
from nanochat.common import compute_init, format_duration, init_wandb, positive, print0, print_banner


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


def start_run(args, wandb_project, user_config):
    """The banner, the device and ranks (compute_init), wandb -> (ddp, rank, world_size, device, wandb_run)."""
    print_banner()
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    return ddp, rank, world_size, device, init_wandb(args.run, wandb_project, user_config, rank == 0)


def save_run_checkpoint(checkpoint_dir, step, model, optimizer, meta, rank, args):
    """Every rank saves (its optimizer shard); then rank 0 keeps the --keep-last newest, and the step it resumed from."""
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank=rank)
    print0(f"Saved checkpoint step {step} to {checkpoint_dir}")
    if rank == 0 and args.keep_last:
        prune_checkpoints(checkpoint_dir, args.keep_last, keep_steps=[args.resume_from_step] if args.resume_from_step != -1 else [])


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
        """Percent of the peak FLOP/s of all ranks (peak_flops: theirs summed)."""
        return 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak_flops

    def eta(self, step, progress, dt):
        """Seconds left when `progress` (a fraction) of the run took `step` steps, at the timed pace (dt before it)."""
        timed_steps = step - self.warmup_steps
        seconds_per_step = self.state["total_training_time"] / timed_steps if timed_steps > 0 else dt
        return seconds_per_step * step * (1 - progress) / max(progress, 1e-9)

    def line(self, step, total_steps, progress, dt, before=(), after=()):
        """step N/total (progress%) | *before | dt | tok/sec | mfu | *after | eta: what a loop prints after a step."""
        parts = [f"step {step:05d}/{total_steps} ({100 * progress:5.1f}%)", *before, f"dt {dt * 1000:.0f}ms"]
        if self.tokens_per_step:
            parts.append(f"tok/sec {int(self.tokens_per_step / dt):,}")
        if self.flops_per_token:
            parts.append(f"mfu {self.mfu(dt):.2f}")
        return " | ".join([*parts, *after, f"eta {format_duration(self.eta(step, progress, dt))}"])
