"""
Supervised fine-tuning: turn a base model into a chat model, in one stage.

    python -m scripts.chat_sft                                        # from the latest base model
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
    python -m scripts.chat_sft --data my_chats.jsonl:3                # + your conversations, 3 passes per epoch
    python -m scripts.chat_sft -i sft --data my_chats.jsonl --out-tag=mine   # tune the SFT model further

Data: one shuffled mixture of conversations: general chat (SmolTalk), multiple choice (MMLU, 3 passes),
math with calculator calls (GSM8K, 4 passes), who the model is (identity, 2 passes) and spelling, plus
your own conversations (--data FILE.jsonl[:passes], one JSON list of messages per line; --data-only trains on
those alone). They are rendered in the chat format and best-fit packed into rows of max_seq_len + 1 tokens, each row
padded after its last whole conversation, none cropped (nanochat/chat_train.py). The loss is only on
the tokens the assistant must produce, averaged over every such token of the optimizer step.
The run continues the base run: tokens per step, the (batch-scaled) learning rates and, when saved for
this number of ranks, the optimizer's moments come from the source checkpoint. The LR starts at
--init-lr-frac of the base LRs and decays linearly to 0 over the last --warmdown-ratio of training;
the horizon is one pass over the mixture, or --num-iterations optimizer steps.
Evaluation: val bpb on the assistant's tokens of held-out conversations, and ChatCORE (chat_eval's
metric on capped task prefixes) every --chatcore-every steps.
Checkpoints: every --save-every steps and at the end, with the optimizer state of every rank, each
rank's data position and the loop state, so --resume-from-step continues exactly the run it was.
The story: args -> init -> model -> optimizer -> data -> loop -> save.
"""

import os
import re
import math
import time
import argparse
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.common import print0, get_compute_dtype, synchronize, get_base_dir, get_max_memory_mb, format_duration, positive
from nanochat.checkpoint_manager import find_checkpoint, load_model, STAGE_DIRS
from nanochat.chat_train import conversation_batches, loss_normaliser, load_optimizer_state
from nanochat.device_batch import auto_device_batch_size
from nanochat.engine import Engine
from nanochat.optim import get_lr_multiplier, get_muon_momentum, apply_schedules, GradScaler
from nanochat.tokenizer import get_token_bytes
from nanochat.loss_eval import evaluate_bpb
from nanochat.run import (Run, RunState, StepMeter, add_run_flags, add_checkpoint_flags, check_resume_step, gather_from_ranks,
                          restore_process_state)
from tasks.common import TaskMixture, first_examples
from tasks.chatcore import TASKS, evaluate_task, chatcore
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU, mmlu_training_set
from tasks.gsm8k import GSM8K
from tasks.customjson import CustomJSON, default_identity_path, parse_data_spec
from tasks.spellingbee import SpellingBee, SimpleSpelling

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Fine-tune a base model on a mixture of conversations")
add_run_flags(parser)
add_checkpoint_flags(parser, "base", ["base", "sft"])  # sft: tune an SFT model further (with --out-tag)
parser.add_argument("--device-batch-size", type=int, default=-1,
                    help="rows per forward pass per device (-1 = the source run's, else the largest that fits)")
parser.add_argument("--max-seq-len", type=int, default=-1, help="tokens per row (-1 = the model's context)")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step, all ranks (-1 = the source run's)")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one pass over the mixture)")
parser.add_argument("--init-lr-frac", type=positive(float), default=0.8, help="LRs start at this fraction of the source run's")
parser.add_argument("--warmdown-ratio", type=float, default=0.5, help="LR decays linearly to 0 over this last fraction")
# Evaluations every N steps also run at the end; -1 = never, 0 = only at the end. Sizes: see base_train.
parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--eval-tokens", type=positive(int), default=None,
                    help="val tokens per evaluation (default: 20 x 524,288 on a GPU, 2^16 elsewhere)")
parser.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--chatcore-max-cat", type=int, default=None,
                    help="problems per multiple-choice task (-1 = all; default: 1000 on a GPU, 50 elsewhere)")
parser.add_argument("--chatcore-max-gen", type=int, default=None,
                    help="problems per generative task (-1 = all; default: 24 on a GPU, 8 elsewhere)")
parser.add_argument("--max-examples-per-task", type=int, default=-1, help="cap every task at N examples (tiny runs)")
parser.add_argument("--data", action="append", default=[], metavar="FILE.jsonl[:PASSES]",
                    help="add your conversations to the mixture (one JSON list of messages per line), PASSES times per "
                         "epoch (default 1); repeatable; every line is checked before training starts")
parser.add_argument("--data-only", action="store_true", help="train on the --data conversations alone, without the mixture")
parser.add_argument("--out-tag", type=str, default=None, help="checkpoint dir name of this run (default: the source's tag); "
                    "e.g. a model tuned on your --data beside the pipeline's own")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1/0, -1 = on CUDA only")
DEVICE_DEFAULTS = {"eval_tokens": (20 * 524288, 2**16), "chatcore_max_cat": (1000, 50), "chatcore_max_gen": (24, 8)}
CHATCORE_MAX_NEW_TOKENS = 256  # room for a worked GSM8K answer; longer ones are cut and count as wrong
PROGRESS_RESOLUTION = 1000  # the LR schedule runs on progress, in thousandths (see the loop)


def training_mixture(max_examples_per_task, user_data=(), data_only=False):
    """-> (train, val) mixtures of conversations, each task capped at max_examples_per_task (-1 = all).
    user_data: [(path, task, passes)] of the --data files, added to the mixture (or, data_only, the whole of it)."""
    def capped(task):
        return first_examples(task, max_examples_per_task)

    identity_path = default_identity_path()
    if not data_only and not os.path.exists(identity_path):
        print0(f"Note: no identity conversations at {identity_path}; fine-tuning without them")
    # One stage for what were mid-training and SFT: no worse at d4, and simpler (dev/LOG.md, "One SFT stage
    # replaces mid-training + SFT").
    parts = [] if data_only else [  # (name, task, passes over it per epoch)
        ("SmolTalk", SmolTalk(split="train"), 1),  # general conversations
        ("MMLU", mmlu_training_set(), 3),  # multiple choice (offline: a small local stand-in, it says so)
        ("GSM8K", GSM8K(subset="main", split="train"), 4),  # math with calculator tool calls
        *([("identity", CustomJSON(filepath=identity_path), 2)] if os.path.exists(identity_path) else []),  # who it is
        ("SimpleSpelling", SimpleSpelling(size=200000, split="train"), 1),  # so letters inside tokens become visible
        ("SpellingBee", SpellingBee(size=80000, split="train"), 1),  # letter counting with a python tool call
    ]
    parts += [(os.path.basename(path), task, passes) for path, task, passes in user_data]
    parts = [(name, capped(task), passes) for name, task, passes in parts]
    train_tasks = [task for _, task, passes in parts for _ in range(passes)]
    train_dataset = TaskMixture(train_tasks)
    val_dataset = TaskMixture([capped(SmolTalk(split="test")), capped(MMLU(subset="all", split="test", stop=5200)),
                               capped(GSM8K(subset="main", split="test", stop=420))])
    listing = ", ".join(f"{name} {len(task):,}" + (f" x{passes}" if passes > 1 else "") for name, task, passes in parts)
    print0(f"Train mixture: {len(train_dataset):,} conversations ({listing}); val mixture: {len(val_dataset):,}")
    return train_dataset, val_dataset


@restore_process_state
def main(argv=None):
    args = parser.parse_args(argv)
    if not 0 <= args.warmdown_ratio <= 1:
        parser.error(f"--warmdown-ratio must be in [0, 1], got {args.warmdown_ratio}")
    if args.out_tag is not None and (not re.fullmatch(r"[\w.-]+", args.out_tag) or args.out_tag in (".", "..")):
        parser.error(f"--out-tag must be a folder name (letters, digits, '_', '-', '.'), got {args.out_tag!r}")
    if args.source == "sft" and args.out_tag is None:
        parser.error("-i sft tunes an SFT model further: name the result with --out-tag NAME (the source stays as it is)")
    if args.data_only and not args.data:
        parser.error("--data-only needs at least one --data FILE.jsonl")
    try:  # your conversations are checked line by line before anything starts (a bad line: one error naming it)
        data_specs = [parse_data_spec(spec) for spec in args.data]
        for path, _ in data_specs:
            if not os.path.isfile(path):
                raise ValueError(f"--data {path}: no such file")
        user_data = [(path, CustomJSON(filepath=path), passes) for path, passes in data_specs]
    except ValueError as e:
        parser.error(str(e))

    # -------------------------------------------------------------------------
    run = Run(args, "nanochat-sft", DEVICE_DEFAULTS)
    device, rank, world_size = run.device, run.rank, run.world_size
    device_type = device.type

    _, model_tag, source_step = find_checkpoint(args.source, args.model_tag, args.step)
    if args.source == "sft" and args.out_tag == model_tag:
        parser.error(f"--out-tag {model_tag} is the source's own folder: name the tuned model differently")
    model, tokenizer, source_meta = load_model(args.source, device, "train", model_tag, source_step)
    source_dir = os.path.join(get_base_dir(), STAGE_DIRS[args.source], model_tag)
    checkpoint_dir = os.path.join(get_base_dir(), STAGE_DIRS["sft"], args.out_tag or model_tag)
    token_bytes = get_token_bytes(device=device)
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model  # every row is T tokens: static shapes

    # Batch and LRs: the values the source run resolved and trained with (its batch-size rule may be automatic),
    # not its flags. The batch can be overridden, e.g. to fit memory.
    resolved = source_meta.get("resolved")
    if resolved is None:
        raise SystemExit(f"The {args.source} checkpoint in {source_dir} predates recording its batch size and LRs: add to its "
                         f"meta_{source_step:06d}.json a \"resolved\" entry (keys: docs/formats.md, Checkpoints)")
    max_seq_len = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    total_batch_size = args.total_batch_size if args.total_batch_size > 0 else resolved["total_batch_size"]
    rows_per_step = total_batch_size // (max_seq_len * world_size)
    device_batch_size = args.device_batch_size
    if device_batch_size <= 0:  # what fitted the base run at its length, else the largest that fits (found by trying)
        device_batch_size = source_meta.get("device_batch_size")
        if not device_batch_size or source_meta.get("max_seq_len", max_seq_len) != max_seq_len or rows_per_step % device_batch_size:
            device_batch_size = auto_device_batch_size(model, max_seq_len, max(rows_per_step, 1))
    world_tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size
    if total_batch_size % world_tokens_per_fwdbwd != 0:
        parser.error(f"total batch size {total_batch_size} must be a multiple of device_batch_size * max_seq_len * "
                     f"world_size = {world_tokens_per_fwdbwd}: set --total-batch-size or --device-batch-size")
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    lrs = {name: resolved[name] for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
    print0(f"Batch: {total_batch_size:,} tokens/step = {device_batch_size} rows x {max_seq_len} x {world_size} ranks x "
           f"{grad_accum_steps} accumulation steps")
    print0("LRs of the source run: " + ", ".join(f"{name} {lr:.6g}" for name, lr in lrs.items()) +
           f"; fine-tuning starts at {args.init_lr_frac}x")

    optimizer = model.setup_optimizer(**lrs, weight_decay=0.0)
    scaler = GradScaler(enabled=get_compute_dtype(device_type) == torch.float16)  # fp16 runs only
    if args.resume_from_step != -1:  # this run's own weights, optimizer and state, saved at that step
        state = run.resume(checkpoint_dir, model, optimizer, scaler)
        # an epoch ends where the epoch was finished; an explicit horizon where --num-iterations says
        check_resume_step(state.step, args.num_iterations if args.num_iterations > 0 else
                          state.step if state.finished else math.inf)
    else:  # the optimizer continues the source run's: its moments already fit this model's gradients
        optimizer_state, note = load_optimizer_state(source_dir, source_step, rank, world_size, device)
        if optimizer_state is not None:
            try:
                optimizer.load_state_dict(optimizer_state)
                note = f"optimizer warm-started from {source_dir} step {source_step}"
            except ValueError as e:
                note = f"the saved optimizer state does not fit this model ({e}); starting a fresh optimizer"
            del optimizer_state
        print0(f"Note: {note}")
        state = run.state = RunState(model_config=asdict(model.config), user_config=run.user_config,
                                     device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                     resolved={"total_batch_size": total_batch_size, **lrs},
                                     source={"stage": args.source, "model_tag": model_tag, "step": source_step})
        state.loop_state["progress"] = 0.0

    # -------------------------------------------------------------------------
    # Data
    train_dataset, val_dataset = training_mixture(args.max_examples_per_task, user_data, args.data_only)

    def batches(dataset, resume_state=None):
        return conversation_batches(dataset, tokenizer, device_batch_size, max_seq_len, device, rank, world_size,
                                    resume_state=resume_state)

    eval_steps = max(1, args.eval_tokens // world_tokens_per_fwdbwd)
    chatcore_tasks = {name: make() for name, (make, _) in TASKS.items()} if args.chatcore_every >= 0 else {}
    engine = Engine(model, tokenizer)

    def evaluate_chatcore():
        """-> {task: accuracy} on the first --chatcore-max-cat / --chatcore-max-gen problems of each task."""
        model.eval()
        accuracies = {}
        for name, task in chatcore_tasks.items():
            max_problems = args.chatcore_max_cat if task.eval_type == "categorical" else args.chatcore_max_gen
            num_correct, num_evaluated = evaluate_task(task, tokenizer, model, engine, None if max_problems < 0 else max_problems,
                                                       max_new_tokens=CHATCORE_MAX_NEW_TOKENS)
            accuracies[name] = num_correct / max(num_evaluated, 1)
        model.train()
        return accuracies

    def epoch_progress(data_state):
        """The fraction of the epoch packed into rows. Every rank packs at its own pace: the furthest rank's
        counts, so all ranks agree on the LR and stop together when any of them has seen the whole epoch."""
        progress = torch.tensor(min(data_state["epoch_progress"], 1.0), dtype=torch.float64, device=device)
        if run.ddp:
            dist.all_reduce(progress, op=dist.ReduceOp.MAX)
        return progress.item()

    # -------------------------------------------------------------------------
    # Training loop. The horizon may be an epoch (its length in steps is unknown until the rows are packed),
    # so the LR schedule runs on progress: the fraction of training done before the step, in thousandths.
    step = state.step
    loop_state = state.loop_state
    data_state = state.data_states[rank] if state.data_states else None  # this rank's position in the mixture
    train_batches = batches(train_dataset, data_state)
    meter = StepMeter(loop_state, tokens_per_step=total_batch_size)
    model.train()
    while True:
        progress = loop_state["progress"]
        last_step = step == args.num_iterations if args.num_iterations > 0 else (step > 0 and progress >= 1.0)

        if run.due(args.eval_every, step, last_step):
            state.val_bpb = evaluate_bpb(model, batches(val_dataset), eval_steps, token_bytes)  # the assistant's tokens only
            run.log(f"Step {step:05d} | val bpb {state.val_bpb:.4f}", step, val_bpb=state.val_bpb)

        if run.due(args.chatcore_every, step, last_step, first_step=1):
            accuracies = evaluate_chatcore()
            label, value = chatcore(accuracies)
            state.chatcore = {**accuracies, label: value}
            run.log(f"Step {step:05d} | {label} {value:.4f} (first {args.chatcore_max_cat}/{args.chatcore_max_gen} problems "
                    f"per multiple-choice/generative task) | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracies.items()),
                    step, {f"chatcore/{k}": v for k, v in accuracies.items()}, chatcore=value)

        if run.save_due(step, last_step):
            # every rank's data position (each packs its own conversations), gathered here: all ranks save
            state.step, state.finished, state.data_states = step, last_step, gather_from_ranks(data_state)
            run.save(checkpoint_dir, state, model, optimizer, scaler)

        if last_step:
            break

        # one optimizer step = grad_accum_steps micro-batches, all fetched first: the loss is normalised by
        # the number of trained tokens of the whole step
        synchronize(device_type)
        t0 = time.time()
        micro_batches = [next(train_batches) for _ in range(grad_accum_steps)]
        normaliser = loss_normaliser([targets for _, targets, _ in micro_batches])
        train_loss = torch.zeros((), device=device)
        for inputs, targets, data_state in micro_batches:
            loss = train_model(inputs, targets, loss_reduction="sum") / normaliser
            train_loss += loss.detach()
            scaler.scale_loss(loss).backward()
        lrm = get_lr_multiplier(round(progress * PROGRESS_RESOLUTION), PROGRESS_RESOLUTION, warmup_steps=0,
                                warmdown_ratio=args.warmdown_ratio, final_lr_frac=0.0)
        apply_schedules(optimizer, args.init_lr_frac * lrm, muon_momentum=get_muon_momentum(step))
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        train_loss = train_loss.item()
        synchronize(device_type)
        dt = time.time() - t0
        step += 1
        progress = step / args.num_iterations if args.num_iterations > 0 else epoch_progress(data_state)
        loop_state["progress"] = progress

        debiased_loss = meter.update(step, dt, train_loss)
        total_steps = f"{args.num_iterations:05d}" if args.num_iterations > 0 else f"~{round(step / max(progress, 1e-9)):05d}"
        run.log(meter.line(step, total_steps, progress, dt, before=[f"loss {debiased_loss:.6f}", f"lrm {lrm:.2f}"]), step,
                {"train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": total_batch_size / dt, "train/progress": progress},
                train_loss=debiased_loss)

    # -------------------------------------------------------------------------
    print0(f"Conversations longer than a row, truncated to it: {data_state['truncated']:,} (rank 0)")
    run.report("Chat SFT" + (f" ({args.out_tag})" if args.out_tag else ""), {  # (a side model: its own section)
        "Training conversations": len(train_dataset),
        "Number of iterations": step,
        "Tokens per step": total_batch_size,
        "DDP world size": world_size,
        "Final validation bpb": state.val_bpb,
        **(state.chatcore or {}),
        "Total training time": format_duration(loop_state["total_training_time"]),
        "Peak memory (MiB)": round(get_max_memory_mb(device_type)),
    })
    run.finish()


if __name__ == "__main__":
    main()
