"""
Supervised fine-tuning: teach the mid-trained model to answer, one whole conversation per row.

    python -m scripts.chat_sft --device-batch-size=4 --max-seq-len=512 --total-batch-size=4096   # CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- -i mid

Unlike mid-training, rows are not packed: each row is one conversation from its start (truncated to
--max-seq-len), padded to the batch's longest row, and the loss is only on the tokens the assistant
must produce (mask 1 of render_conversation; user turns, tool outputs and padding get target -1), so
training time goes to exactly the behaviour we want. Gradient accumulation normalises by the number
of target tokens of the whole step, so long and short answers weigh the same per token.
Reports val loss and next-token accuracy on held-out conversations; task accuracies are chat_eval's.
The story: args -> init -> model -> optimizer -> data -> loop -> save.
"""

import os
import time
import argparse
from dataclasses import asdict

import torch
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, print_banner, get_compute_dtype, synchronize,
                             get_base_dir, get_max_memory_mb, init_wandb, format_duration)
from nanochat.checkpoint_manager import load_model, save_checkpoint, find_largest_model, STAGE_DIRS
from nanochat.optim import get_lr_multiplier, get_muon_momentum, apply_schedules, GradScaler
from nanochat.report import get_report
from tasks.common import TaskMixture, first_examples
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.customjson import CustomJSON, default_identity_path
from tasks.spellingbee import SpellingBee, SimpleSpelling

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Supervised fine-tuning on conversations (loss on assistant tokens)")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("-i", "--source", type=str, default="mid", choices=["base", "mid"], help="checkpoint stage to start from")
parser.add_argument("--model-tag", type=str, default=None, help="model tag to start from (default: the largest)")
parser.add_argument("--step", type=int, default=None, help="step to start from (default: the last)")
parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per device")
parser.add_argument("--max-seq-len", type=int, default=2048, help="conversations are truncated to this many tokens")
parser.add_argument("--total-batch-size", type=int, default=32 * 2048,
                    help="tokens per optimizer step, all ranks, counted as rows x max_seq_len (default: 32 conversations)")
parser.add_argument("--num-epochs", type=int, default=1)
parser.add_argument("--num-iterations", type=int, default=-1, help="steps to train (-1 = --num-epochs passes)")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--init-lr-frac", type=float, default=0.02, help="fine-tuning starts at this fraction of the base LRs")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1 = only at the end)")
parser.add_argument("--eval-examples", type=int, default=1024, help="val conversations per evaluation")
parser.add_argument("--max-examples-per-task", type=int, default=-1, help="cap every task at N examples (tiny runs)")
parser.add_argument("--compile", type=int, default=0, help="torch.compile the model: 1/0 (off: rows come in many widths, each a compile)")
parser.add_argument("--dry-run", action="store_true", help="train and evaluate, but write no checkpoint or report")
args = parser.parse_args()
user_config = vars(args).copy()
for name in ("device_batch_size", "max_seq_len", "total_batch_size", "num_epochs", "eval_examples"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

# -----------------------------------------------------------------------------
print_banner()
ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
device_type = device.type
master_process = rank == 0
wandb_run = init_wandb(args.run, "nanochat-sft", user_config, master_process)

model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.step)
model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), STAGE_DIRS[args.source]))
# Not compiled by default: a compiled graph is specialised to its input shape, and padded rows come in up to
# max_seq_len/256 widths when compiling (rounded up to multiples of 256: 8 at 2048, torch's default recompile
# limit). Each width costs a full compile (tens of seconds for d4 on a CPU, dev/LOG.md; more for d20 on a GPU)
# while the whole fine-tuning is a few hundred steps of a few thousand tokens each, where a compiled step saves
# milliseconds. Eager mode pays nothing per shape, so it pads only to the longest row.
use_compile = args.compile == 1
train_model = torch.compile(model, dynamic=False) if use_compile else model
pad_multiple = 256 if use_compile else 1

world_rows_per_fwdbwd = args.device_batch_size * world_size
if args.total_batch_size % (world_rows_per_fwdbwd * args.max_seq_len) != 0:
    parser.error(f"--total-batch-size={args.total_batch_size} must be a multiple of device_batch_size * max_seq_len "
                 f"* world_size = {world_rows_per_fwdbwd * args.max_seq_len}")
grad_accum_steps = args.total_batch_size // (world_rows_per_fwdbwd * args.max_seq_len)
examples_per_step = world_rows_per_fwdbwd * grad_accum_steps
print0(f"Batch: {examples_per_step} conversations/step = {args.device_batch_size} x {world_size} ranks x "
       f"{grad_accum_steps} accumulation steps")

optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scaler = GradScaler(enabled=get_compute_dtype(device_type) == torch.float16)

# -----------------------------------------------------------------------------
# Data
def capped(task):
    return first_examples(task, args.max_examples_per_task)


identity_path = default_identity_path()
if not os.path.exists(identity_path):
    print0(f"Note: no identity conversations at {identity_path}; fine-tuning without them")
train_tasks = [
    capped(ARC(subset="ARC-Easy", split="train")),
    capped(ARC(subset="ARC-Challenge", split="train")),
    capped(GSM8K(subset="main", split="train")),
    capped(SmolTalk(split="train", stop=10_000)),  # a general-chat subset keeps answers conversational
    *([capped(CustomJSON(filepath=identity_path))] if os.path.exists(identity_path) else []),
    capped(SimpleSpelling(size=300, split="train")),  # a little spelling, to keep what mid-training taught
    capped(SpellingBee(size=300, split="train")),
]
train_dataset = TaskMixture(train_tasks)
val_dataset = capped(SmolTalk(split="test"))
num_iterations = args.num_iterations if args.num_iterations > 0 else \
    max(1, args.num_epochs * len(train_dataset) // examples_per_step)
print0(f"Train mixture: {len(train_dataset):,} conversations; val: {len(val_dataset):,}; {num_iterations} steps")


def collate(rendered):
    """(ids, mask) pairs -> inputs, targets (B, L): target -1 where nothing is to be learned, or padding."""
    width = max(len(ids) for ids, _ in rendered) - 1
    width = min(-(-width // pad_multiple) * pad_multiple, args.max_seq_len)
    pad_id = tokenizer.get_bos_token_id()  # any valid id: its targets are -1
    inputs = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rendered), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return inputs.to(device), targets.to(device)


def sft_batches(dataset):
    """Yield (inputs, targets) forever: rank r takes conversations r, r+W, ... of dataset, cycling."""
    cursor = rank
    while True:
        rendered = []
        for _ in range(args.device_batch_size):
            rendered.append(tokenizer.render_conversation(dataset[cursor % len(dataset)], max_tokens=args.max_seq_len + 1))
            cursor += world_size
        yield collate(rendered)


@torch.no_grad()
def evaluate_val():
    """-> (mean loss per target token, next-token accuracy on targets) over --eval-examples conversations."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, correct predictions, target tokens
    batches = sft_batches(val_dataset)
    for _ in range(max(1, args.eval_examples // world_rows_per_fwdbwd)):
        inputs, targets = next(batches)
        logits = model(inputs)
        sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="sum")
        sums[1] += ((logits.argmax(dim=-1) == targets) & (targets >= 0)).sum()
        sums[2] += (targets >= 0).sum()
    if ddp:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train()
    num_targets = max(sums[2].item(), 1)
    return sums[0].item() / num_targets, sums[1].item() / num_targets


# -----------------------------------------------------------------------------
# Training loop
train_batches = sft_batches(train_dataset)
step, val_loss, val_accuracy = 0, None, None
smooth_train_loss, ema_beta, total_training_time = 0.0, 0.9, 0.0
curve = []
model.train()
while True:
    last_step = step == num_iterations

    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        val_loss, val_accuracy = evaluate_val()
        print0(f"Step {step:05d} | val loss {val_loss:.4f} | val token accuracy {100 * val_accuracy:.2f}%")
        curve.append({"step": step, "val_loss": val_loss, "val_token_accuracy": val_accuracy, "time": total_training_time})
        wandb_run.log({"step": step, "val/loss": val_loss, "val/token_accuracy": val_accuracy})

    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    micro_batches = [next(train_batches) for _ in range(grad_accum_steps)]
    num_targets = sum((targets >= 0).sum() for _, targets in micro_batches).clamp(min=1)
    train_loss = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        loss = train_model(inputs, targets, loss_reduction="none").sum() / num_targets
        train_loss += loss.detach()
        scaler.scale_loss(loss).backward()
    lrm = get_lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
    apply_schedules(optimizer, args.init_lr_frac * lrm, muon_momentum=get_muon_momentum(step))
    scaler.step(optimizer)
    model.zero_grad(set_to_none=True)
    train_loss = train_loss.item()
    synchronize(device_type)
    dt = time.time() - t0
    step += 1

    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_loss = smooth_train_loss / (1 - ema_beta ** step)
    if step > 10:  # the first steps include compilation and warmup; keep them out of the timing
        total_training_time += dt
    num_tokens = sum(inputs.numel() for inputs, _ in micro_batches) * world_size
    seconds_per_step = total_training_time / (step - 10) if step > 10 else dt
    eta = seconds_per_step * (num_iterations - step)
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:5.1f}%) | loss {debiased_loss:.6f} | "
           f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/sec {int(num_tokens / dt):,} | eta {format_duration(eta)}")
    curve.append({"step": step, "train_loss": debiased_loss, "time": total_training_time})
    wandb_run.log({"step": step, "train/loss": debiased_loss, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": num_tokens / dt})

# -----------------------------------------------------------------------------
print0(f"Peak memory: {get_max_memory_mb(device_type):.0f} MiB")
print0(f"Total training time: {format_duration(total_training_time)}")
if not args.dry_run:
    checkpoint_dir = os.path.join(get_base_dir(), STAGE_DIRS["sft"], model_tag)
    meta = {"step": step, "val_loss": val_loss, "val_token_accuracy": val_accuracy, "model_config": asdict(model.config),
            "user_config": user_config, "source": {"stage": args.source, "model_tag": model_tag, "step": source_meta["step"]}}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta, rank=rank)  # fresh optimizer in RL
    get_report().log(section="Chat SFT", data=[user_config, {
        "Training conversations": len(train_dataset),
        "Number of iterations": step,
        "DDP world size": world_size,
        "Final validation loss": val_loss,
        "Final validation token accuracy": val_accuracy,
        "Total training time": format_duration(total_training_time),
    }], curve=curve)
wandb_run.finish()
compute_cleanup()
