"""
Mid-training: continue the base model on conversations, so it learns the chat format (special tokens,
turns, tool calls), multiple-choice answering, math with a calculator, spelling, and who it is.

    python -m scripts.mid_train --device-batch-size=4 --max-seq-len=512 --total-batch-size=8192  # CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device-batch-size=16

Data: a shuffled TaskMixture. Each conversation is rendered to tokens and packed into rows of T+1
tokens with the same BOS best-fit packer as pretraining (every row starts at a conversation start, no
padding). Loss is on EVERY token of a row, user turns included, not only on what the assistant says:
mid-training is still pretraining-like (language and format knowledge from all text), every packed
position trains, and learning where user turns end is part of learning the format. Only SFT, which
specialises the model to answering, masks the loss to the assistant's tokens.
The horizon is one pass over the mixture (or --num-iterations steps); LR flat, then linear decay.
The story: args -> init -> model -> optimizer -> data -> loop -> save.
"""

import os
import time
import argparse
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, print_banner, compute_choice, synchronize,
                             get_base_dir, get_max_memory_mb, init_wandb, format_duration)
from nanochat.checkpoint_manager import load_model, save_checkpoint, find_largest_model, STAGE_DIRS
from nanochat.dataloader import BestFitPacker, BatchStager
from nanochat.optim import get_lr_multiplier, get_muon_momentum, apply_schedules, GradScaler
from nanochat.tokenizer import get_token_bytes
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from tasks.common import TaskMixture, first_examples
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU, mid_train_mmlu
from tasks.gsm8k import GSM8K
from tasks.customjson import CustomJSON, default_identity_path
from tasks.spellingbee import SpellingBee, SimpleSpelling

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Mid-train a base model on a mixture of conversations")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--model-tag", type=str, default=None, help="base model tag to start from (default: the largest)")
parser.add_argument("--step", type=int, default=None, help="base model step to start from (default: the last)")
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per device")
parser.add_argument("--max-seq-len", type=int, default=2048)
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all ranks")
parser.add_argument("--num-iterations", type=int, default=-1, help="steps to train (-1 = one pass over the mixture)")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--init-lr-frac", type=float, default=1.0, help="start at this fraction of the base LRs")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="LR decays linearly to 0 over this last fraction")
parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (-1 = only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation")
parser.add_argument("--max-examples-per-task", type=int, default=-1, help="cap every task at N examples (tiny runs)")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1/0, -1 = where it pays (GPUs, bf16 CPUs)")
parser.add_argument("--dry-run", action="store_true", help="train and evaluate, but write no checkpoint or report")
args = parser.parse_args()
user_config = vars(args).copy()
for name in ("device_batch_size", "max_seq_len", "total_batch_size", "eval_tokens"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

# -----------------------------------------------------------------------------
print_banner()
ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
device_type = device.type
master_process = rank == 0
compute = compute_choice(device_type)
wandb_run = init_wandb(args.run, "nanochat-mid", user_config, master_process)

model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag, step=args.step)
model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), STAGE_DIRS["base"]))
if args.max_seq_len > model.config.sequence_len:
    print0(f"Note: --max-seq-len {args.max_seq_len} exceeds the base model's {model.config.sequence_len} (rotary "
           f"tables cover {10 * model.config.sequence_len}); training on longer rows than pretraining")
token_bytes = get_token_bytes(device=device)
use_compile = args.compile == 1 or (args.compile == -1 and compute.compile)
train_model = torch.compile(model, dynamic=False) if use_compile else model  # every row is T tokens: static shapes

tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
if args.total_batch_size % world_tokens_per_fwdbwd != 0:
    parser.error(f"--total-batch-size={args.total_batch_size} must be a multiple of device_batch_size * max_seq_len "
                 f"* world_size = {world_tokens_per_fwdbwd}")
grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
print0(f"Batch: {args.total_batch_size:,} tokens/step = {args.device_batch_size} rows x {args.max_seq_len} x "
       f"{world_size} ranks x {grad_accum_steps} accumulation steps")

optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scaler = GradScaler(enabled=compute.dtype == torch.float16)

# -----------------------------------------------------------------------------
# Data
def capped(task):
    return first_examples(task, args.max_examples_per_task)


def identity_tasks():
    path = default_identity_path()
    if not os.path.exists(path):
        print0(f"Note: no identity conversations at {path}; mid-training without them")
        return []
    identity = capped(CustomJSON(filepath=path))
    return [identity, identity]  # listed twice: the model's identity is worth seeing twice per epoch


train_tasks = [
    capped(SmolTalk(split="train")),  # general conversations
    capped(mid_train_mmlu()),  # multiple choice (offline: a small local stand-in, it says so)
    capped(GSM8K(subset="main", split="train")),  # math with calculator tool calls
    *identity_tasks(),
    capped(SimpleSpelling(size=200000, split="train")),  # spelling, so letters inside tokens become visible
    capped(SpellingBee(size=80000, split="train")),  # letter counting with a python tool call
]
train_dataset = TaskMixture(train_tasks)
val_dataset = TaskMixture([capped(SmolTalk(split="test")),
                           capped(MMLU(subset="all", split="test", stop=5200)),
                           capped(GSM8K(subset="main", split="test", stop=420))])
print0(f"Train mixture: {len(train_dataset):,} conversations ({', '.join(str(len(t)) for t in train_tasks)}); "
       f"val mixture: {len(val_dataset):,}")

BUFFER_CONVERSATIONS = 100  # conversations the packer chooses from: enough for tight rows, few enough to stay near the epoch


def conversation_batches(dataset):
    """
    Yield (inputs, targets, epoch_progress) forever. Rank r renders conversations r, r+W, ... of the
    mixture, cycling; epoch_progress counts the conversations that went into rows (all ranks), as a
    fraction of the mixture.
    """
    packer = BestFitPacker(args.max_seq_len + 1)
    stager = BatchStager(args.device_batch_size, args.max_seq_len, device)
    cursor, num_added = rank, 0
    while True:
        rows = []
        for _ in range(args.device_batch_size):
            while len(packer) < BUFFER_CONVERSATIONS or packer.buffered_tokens < packer.row_len:
                ids, _ = tokenizer.render_conversation(dataset[cursor % len(dataset)], max_tokens=packer.row_len)
                packer.add(ids)
                cursor, num_added = cursor + world_size, num_added + 1
            rows.append(packer.take_row())
        inputs, targets = stager.stage(rows)
        yield inputs, targets, (num_added - len(packer)) * world_size / len(dataset)


eval_steps = max(1, args.eval_tokens // world_tokens_per_fwdbwd)


def evaluate_val_bpb():
    model.eval()
    bpb = evaluate_bpb(train_model, conversation_batches(val_dataset), eval_steps, token_bytes)  # (training shapes)
    model.train()
    return bpb


def epoch_finished(progress):
    """Every rank packs at its own pace, so all ranks stop when any of them has seen the whole epoch."""
    done = torch.tensor(int(progress >= 1.0), device=device)
    if ddp:
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
    return bool(done.item())


# -----------------------------------------------------------------------------
# Training loop. The horizon is known as a fraction of the epoch, not in steps, so the shared LR schedule
# runs on progress (the fraction of training done before the step) expressed in thousandths.
PROGRESS_RESOLUTION = 1000
train_batches = conversation_batches(train_dataset)
x, y, batch_progress = next(train_batches)  # batch_progress: the epoch fraction done once this batch is trained
step, progress, val_bpb = 0, 0.0, None
smooth_train_loss, ema_beta, total_training_time = 0.0, 0.9, 0.0
curve = []
model.train()
while True:
    last_step = step == args.num_iterations if args.num_iterations > 0 else (step > 0 and epoch_finished(progress))

    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        val_bpb = evaluate_val_bpb()
        print0(f"Step {step:05d} | val bpb {val_bpb:.4f}")
        curve.append({"step": step, "val_bpb": val_bpb, "time": total_training_time})
        wandb_run.log({"step": step, "val/bpb": val_bpb})

    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    for micro_step in range(grad_accum_steps):
        loss = train_model(x, y)
        train_loss = loss.detach()
        scaler.scale_loss(loss / grad_accum_steps).backward()
        trained_progress = batch_progress
        x, y, batch_progress = next(train_batches)  # fetch the next batch while the device works
    lrm = get_lr_multiplier(round(progress * PROGRESS_RESOLUTION), PROGRESS_RESOLUTION, warmup_ratio=0.0,
                            warmdown_ratio=args.warmdown_ratio, final_lr_frac=0.0)
    apply_schedules(optimizer, args.init_lr_frac * lrm, muon_momentum=get_muon_momentum(step))
    scaler.step(optimizer)
    model.zero_grad(set_to_none=True)
    train_loss = train_loss.item()
    synchronize(device_type)
    dt = time.time() - t0
    step += 1
    progress = step / args.num_iterations if args.num_iterations > 0 else min(trained_progress, 1.0)

    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_loss = smooth_train_loss / (1 - ema_beta ** step)
    if step > 10:  # the first steps include compilation and warmup; keep them out of the timing
        total_training_time += dt
    tok_per_sec = int(args.total_batch_size / dt)
    seconds_per_step = total_training_time / (step - 10) if step > 10 else dt
    eta = seconds_per_step * step * (1 - progress) / max(progress, 1e-9)
    total_steps = f"{args.num_iterations:05d}" if args.num_iterations > 0 else f"~{round(step / max(progress, 1e-9)):05d}"
    print0(f"step {step:05d}/{total_steps} ({100 * progress:5.1f}%) | loss {debiased_loss:.6f} | lrm {lrm:.2f} | "
           f"dt {dt * 1000:.0f}ms | tok/sec {tok_per_sec:,} | eta {format_duration(eta)}")
    curve.append({"step": step, "train_loss": debiased_loss, "time": total_training_time})
    wandb_run.log({"step": step, "train/loss": debiased_loss, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, "train/progress": progress})

# -----------------------------------------------------------------------------
print0(f"Peak memory: {get_max_memory_mb(device_type):.0f} MiB")
print0(f"Total training time: {format_duration(total_training_time)}")
if not args.dry_run:
    checkpoint_dir = os.path.join(get_base_dir(), STAGE_DIRS["mid"], model_tag)
    meta = {"step": step, "val_bpb": val_bpb, "model_config": asdict(model.config), "user_config": user_config,
            "source": {"stage": "base", "model_tag": model_tag, "step": base_meta["step"]},
            "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len}
    # no optimizer state: the next stage starts a fresh optimizer, and mid-training is not resumed
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta, rank=rank)
    get_report().log(section="Midtraining", data=[user_config, {
        "Number of iterations": step,
        "Training conversations": len(train_dataset),
        "DDP world size": world_size,
        "Final validation bpb": val_bpb,
        "Total training time": format_duration(total_training_time),
        "Peak memory (MiB)": round(get_max_memory_mb(device_type)),
    }], curve=curve)
wandb_run.finish()
compute_cleanup()
