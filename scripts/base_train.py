"""
Pretrain a base model. One dial, --depth, sizes everything else.

    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=8   # a small CPU run
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 --fp8

The story: args -> compute init -> tokenizer -> model -> horizon -> optimizer -> data -> loop -> save.
"""

import gc
import os
import math
import time
import argparse
from dataclasses import asdict

import torch

from nanochat.common import (print0, compute_choice, synchronize, get_base_dir, get_peak_flops, get_device_name,
                             get_max_memory_mb, format_duration, positive)
from nanochat.gpt import GPT, build_gpt, config_for_depth, check_config
from nanochat.fp8 import check_fp8_supported, convert_to_fp8
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit
from nanochat.device_batch import auto_device_batch_size
from nanochat.optim import (get_lr_multiplier, get_muon_momentum, get_weight_decay, apply_schedules, GradScaler,
                            auto_batch_size, batch_lr_scale, transfer_weight_decay, REFERENCE_BATCH_SIZE)
from nanochat.loss_eval import evaluate_bpb
from nanochat.core_eval import evaluate_core
from nanochat.run import Run, RunState, StepMeter, add_run_flags, check_resume_step, restore_process_state

# -----------------------------------------------------------------------------
# Flags. Defaults: upstream nanochat's 2026 recipe, tuned at d12 and transferred to any depth by the batch-size
# rule below (ablated at d4: dev/LOG.md, "the 2026 training recipe"). Chinchilla's compute-optimal ratio is
# ~20 tokens per parameter (Hoffmann et al. 2022); runs/scaling_laws.sh measures this recipe's.
parser = argparse.ArgumentParser(description="Pretrain a base model")
add_run_flags(parser, dry_run=False)
# model size
parser.add_argument("--depth", type=positive(int), default=20, help="number of Transformer layers: the one complexity dial")
parser.add_argument("--aspect-ratio", type=positive(int), default=64, help="model_dim = depth * aspect_ratio (rounded up to head_dim)")
parser.add_argument("--head-dim", type=positive(int), default=128, help="channels per attention head")
parser.add_argument("--max-seq-len", type=positive(int), default=2048, help="tokens per row: the model's context")
parser.add_argument("--window-pattern", type=str, default="SSSL", help="tiled over the layers: L=full context, S=a quarter")
# training horizon, in order of precedence
parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1 = derive)")
parser.add_argument("--target-flops", type=float, default=-1.0, help="compute budget in FLOPs (-1 = use the data ratio)")
parser.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens per scaling parameter (Chinchilla ~20)")
# batch
parser.add_argument("--device-batch-size", type=int, default=-1, help="rows per forward pass per device (-1 = the largest "
                    "that fits: found by trying on a GPU, 32 elsewhere; gradient accumulation keeps --total-batch-size)")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step, all ranks (-1 = automatic)")
# optimizer
parser.add_argument("--embedding-lr", type=positive(float), default=0.3, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=positive(float), default=0.008, help="AdamW LR of the lm_head")
parser.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at d12 and 2^19 tokens/step; transferred to this run")
parser.add_argument("--matrix-lr", type=positive(float), default=0.02, help="Muon LR of the blocks' matrices")
parser.add_argument("--scalar-lr", type=positive(float), default=0.5, help="AdamW LR of the x0 scalars (resid: x0.01)")
parser.add_argument("--warmup-steps", type=int, default=40, help="the LR rises linearly over the first N steps")
parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of the run over which the LR decays")
parser.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end, a fraction of the peak")
# evaluation and checkpoints. Evaluations every N steps also run at the end; -1 = never, 0 = only at the end.
parser.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--eval-tokens", type=positive(int), default=None,
                    help="tokens of the val split per bpb evaluation (default: 80 x 524,288 on a GPU; 2^16 elsewhere, ~10 s at d4 on 2 CPU cores)")
parser.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--core-metric-max-per-task", type=int, default=None, help="examples per CORE task (-1 = all; default: 500 on a GPU, 50 elsewhere)")
parser.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--model-tag", type=str, default="", help="checkpoint dir name (default d{depth})")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1/0, -1 = where it pays (GPUs, bf16 CPUs)")
parser.add_argument("--fp8", action="store_true", help="train the large matmuls in fp8 (Hopper/Ada GPUs; eval stays in the compute dtype)")
# Evaluation sizes for an H100 take hours on a CPU: the defaults there keep one val bpb evaluation of d4 well
# under a minute (2^16 tokens: 18 s of one AVX2 core; dev/LOG.md, "The training stages as functions").
DEVICE_DEFAULTS = {"eval_tokens": (80 * 524288, 2**16), "core_metric_max_per_task": (500, 50)}


def scaling_params(config):
    """Transformer matrices + lm_head: the parameters the batch-size and horizon rules count (counted on meta)."""
    with torch.device("meta"):
        counts = GPT(config).num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


@restore_process_state
def main(argv=None):
    args = parser.parse_args(argv)
    if not args.window_pattern or set(args.window_pattern.upper()) - {"S", "L"}:
        parser.error(f"--window-pattern must be a string of S and L, got {args.window_pattern!r}")
    if args.device_batch_size == 0 or args.device_batch_size < -1:
        parser.error(f"--device-batch-size must be a number of rows or -1 (the largest that fits), got {args.device_batch_size}")
    if args.total_batch_size == 0 or args.total_batch_size < -1:
        parser.error(f"--total-batch-size must be a number of tokens or -1 (automatic), got {args.total_batch_size}")
    if args.warmup_steps < 0 or not 0 <= args.warmdown_ratio <= 1:
        parser.error("--warmup-steps must be >= 0 and --warmdown-ratio within [0, 1]")
    if args.final_lr_frac < 0:
        parser.error(f"--final-lr-frac must be >= 0 (a negative LR would be gradient ascent), got {args.final_lr_frac}")

    # -------------------------------------------------------------------------
    # Compute init
    run = Run(args, "nanochat", DEVICE_DEFAULTS)
    device, world_size = run.device, run.world_size
    device_type = device.type
    compute = compute_choice(device_type)
    if args.fp8:
        check_fp8_supported(device)
    peak_flops = get_peak_flops(get_device_name(device_type)) if device_type == "cuda" else None  # (MFU on GPUs only)

    # -------------------------------------------------------------------------
    # Tokenizer and model, sized from the depth
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()

    config = config_for_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim, args.window_pattern)
    try:
        check_config(config)
    except ValueError as e:
        parser.error(f"--depth={args.depth} --aspect-ratio={args.aspect_ratio} --head-dim={args.head_dim} make no valid model: {e}")
    model = build_gpt(config, device)
    if args.fp8:
        convert_to_fp8(model)  # the same Parameters: checkpoints, optimizer and FLOP count are unchanged

    param_counts = model.num_scaling_params()
    num_flops_per_token = model.estimate_flops()
    print0(f"Model: depth {args.depth}, width {config.n_embd}, {config.n_head} heads, vocab {vocab_size}, "
           f"windows {config.window_pattern}")
    for key, value in param_counts.items():
        print0(f"  params {key:24s}: {value:,}")
    print0(f"  FLOPs per token (fwd+bwd): {num_flops_per_token:e}")

    use_compile = args.compile == 1 or (args.compile == -1 and compute.compile)
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    # -------------------------------------------------------------------------
    # Batch size, horizon and hyperparameters. They were tuned at d12 on 2^19 tokens per step; a run on D tokens
    # (ratio x scaling params) transfers them from that reference run on D_ref tokens (same ratio and vocab):
    # the best batch grows as a power of D (Power Lines, Bergsma et al. 2025; exponent 0.383, upstream nanochat's
    # 2026 fit) and every LR as sqrt(batch) (optim.py).
    model_scaling_params = scaling_params(config)
    target_tokens = args.target_param_data_ratio * model_scaling_params
    reference_config = config_for_depth(12, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim, args.window_pattern)
    reference_tokens = args.target_param_data_ratio * scaling_params(reference_config)
    if args.total_batch_size == -1:
        total_batch_size = auto_batch_size(target_tokens, reference_tokens)
        print0(f"Batch size: automatic. D = {args.target_param_data_ratio:g} x {model_scaling_params:,} = {target_tokens:,.0f} "
               f"tokens, d12 reference D_ref = {reference_tokens:,.0f} tokens at 2^19; 2^19 x (D / D_ref)^0.383 = "
               f"{REFERENCE_BATCH_SIZE * (target_tokens / reference_tokens) ** 0.383:,.0f} -> 2^{round(math.log2(total_batch_size))}")
    else:
        total_batch_size = args.total_batch_size
    if args.device_batch_size == -1:  # the rows of a step must split into whole forward passes
        if total_batch_size % (args.max_seq_len * world_size):
            parser.error(f"total batch size {total_batch_size} must be a multiple of max_seq_len * world_size = "
                         f"{args.max_seq_len * world_size}: set --total-batch-size or --max-seq-len")
        device_batch_size = auto_device_batch_size(model, args.max_seq_len, total_batch_size // (args.max_seq_len * world_size))
    else:
        device_batch_size = args.device_batch_size
    tokens_per_fwdbwd = device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if total_batch_size % world_tokens_per_fwdbwd != 0:
        parser.error(f"total batch size {total_batch_size} must be a multiple of device_batch_size * max_seq_len * "
                     f"world_size = {world_tokens_per_fwdbwd}: set --total-batch-size, --device-batch-size or --max-seq-len")
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    # Horizon: explicit steps, else a FLOPs budget, else the tokens-per-parameter ratio
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (num_flops_per_token * total_batch_size))
    else:
        num_iterations = round(target_tokens / total_batch_size)
    num_iterations = max(num_iterations, 1)
    total_tokens = total_batch_size * num_iterations
    print0(f"Batch: {total_batch_size:,} tokens/step = {device_batch_size} rows x {args.max_seq_len} x "
           f"{world_size} ranks x {grad_accum_steps} accumulation steps")
    print0(f"Horizon: {num_iterations:,} steps, {total_tokens:,} tokens, {num_flops_per_token * total_tokens:e} FLOPs")
    resuming = args.resume_from_step != -1
    if resuming:
        check_resume_step(args.resume_from_step, num_iterations)

    # -------------------------------------------------------------------------
    # Optimizer: every LR scales by sqrt(batch / 2^19); Muon's weight decay transfers by batch and tokens
    lr_scale = batch_lr_scale(total_batch_size)
    weight_decay = transfer_weight_decay(args.weight_decay, total_batch_size, target_tokens, reference_tokens)
    lrs = {f"{name}_lr": getattr(args, f"{name}_lr") * lr_scale for name in ("embedding", "unembedding", "matrix", "scalar")}
    print0(f"LRs x {lr_scale:.4f} (batch scale): " + ", ".join(f"{name} {lr:.6g}" for name, lr in lrs.items()) +
           f"; Muon weight decay {weight_decay:.6g} (--weight-decay={args.weight_decay} x batch scale x D_ref / D = "
           f"{reference_tokens / target_tokens:.4g})")
    optimizer = model.setup_optimizer(**lrs, weight_decay=weight_decay)
    scaler = GradScaler(enabled=compute.dtype == torch.float16)

    # The run's state: what a checkpoint's meta holds, restored with the weights and optimizer when resuming
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")
    if resuming:
        state = run.resume(checkpoint_dir, model, optimizer, scaler)
        state.device_batch_size = device_batch_size
    else:
        state = run.state = RunState(model_config=asdict(config), user_config=run.user_config,
                                     device_batch_size=device_batch_size, max_seq_len=args.max_seq_len,
                                     # the batch size and LRs (batch-scaled) this run trains with: chat_sft continues with them
                                     resolved={"total_batch_size": total_batch_size, **lrs, "weight_decay": weight_decay})

    # -------------------------------------------------------------------------
    # Data. The train loader is restarted from its saved position after every checkpoint save, exactly as a
    # resumed run restarts it, so an interrupted-and-resumed run trains on the same data as an uninterrupted one.
    def make_train_loader(resume_state_dict=None):
        return tokenizing_distributed_data_loader_with_state_bos_bestfit(
            tokenizer, device_batch_size, args.max_seq_len, split="train", device=device,
            resume_state_dict=resume_state_dict)

    def make_val_batches():  # (x, y, loader state): evaluate_bpb reads (x, y)
        return tokenizing_distributed_data_loader_with_state_bos_bestfit(
            tokenizer, device_batch_size, args.max_seq_len, split="val", device=device)

    eval_steps = max(1, args.eval_tokens // world_tokens_per_fwdbwd)
    train_loader = make_train_loader(state.dataloader_state_dict)
    x, y, dataloader_state = next(train_loader)  # prefetch the first batch

    def print_samples():
        prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                   "The opposite of hot is", "The planets of the solar system are:", "My favorite color is"]
        model.eval()
        for prompt in prompts:
            tokens = tokenizer(prompt, prepend="<|bos|>")
            out = list(model.generate(tokens, max_tokens=16, temperature=0))
            print0(f"  {tokenizer.decode(tokens + out)!r}")
        model.train()

    # -------------------------------------------------------------------------
    # Training loop
    step = state.step
    loop_state = state.loop_state
    core_results = None
    meter = StepMeter(loop_state, tokens_per_step=total_batch_size, flops_per_token=num_flops_per_token,
                      peak_flops=peak_flops * world_size if peak_flops else None)
    model.train()
    while True:
        last_step = step == num_iterations
        flops_so_far = num_flops_per_token * total_batch_size * step

        if run.due(args.eval_every, step, last_step):
            state.val_bpb = evaluate_bpb(train_model, make_val_batches(), eval_steps, token_bytes)  # training shapes: compiled
            run.log(f"Step {step:05d} | val bpb {state.val_bpb:.4f}", step, {"total_training_flops": flops_so_far},
                    val_bpb=state.val_bpb)

        # The final checkpoint comes before the final CORE and samples: a failure there (out of memory) must not lose the run
        if run.save_due(step, last_step):
            state.step, state.finished, state.dataloader_state_dict = step, last_step, dataloader_state
            run.save(checkpoint_dir, state, model, optimizer, scaler)
            if not last_step:  # restart the loader from the saved position (see make_train_loader)
                train_loader = make_train_loader(dataloader_state)
                x, y, dataloader_state = next(train_loader)

        if run.due(args.core_metric_every, step, last_step, first_step=1):
            model.eval()
            core_results = evaluate_core(model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
            model.train()
            run.log(f"Step {step:05d} | {core_results['label']}: {core_results['core_metric']:.4f}", step,
                    {"total_training_flops": flops_so_far}, core_metric=core_results["core_metric"])

        if run.rank == 0 and run.due(args.sample_every, step, last_step, first_step=1):
            print_samples()

        if last_step:
            break

        # one optimizer step = grad_accum_steps forward/backward passes
        synchronize(device_type)
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            loss = train_model(x, y)  # mean over the trained targets; 0 (not NaN) for a micro-batch without any
            train_loss = loss.detach()
            scaler.scale_loss(loss / grad_accum_steps).backward()
            x, y, dataloader_state = next(train_loader)  # fetch the next batch while the device works
        lrm = get_lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        apply_schedules(optimizer, lrm, muon_momentum=get_muon_momentum(step, num_iterations, args.warmdown_ratio),
                        muon_weight_decay=get_weight_decay(step, num_iterations, weight_decay))
        scaler.step(optimizer)
        model.zero_grad(set_to_none=True)
        train_loss = train_loss.item()  # a sync point, after the step was queued
        synchronize(device_type)
        dt = time.time() - t0
        step += 1
        # Python's cycle collector would otherwise pause training now and then to scan every object alive
        # (the model, compiled code, the loader): after this process's first step, freeze those out of its
        # view and collect by hand, rarely, for the little cyclic garbage a step leaves. (main() undoes it on return.)
        if gc.isenabled():
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

        # logging
        debiased_loss = meter.update(step, dt, train_loss)
        epoch = dataloader_state["epoch"]
        run.log(meter.line(step, f"{num_iterations:05d}", step / num_iterations, dt,
                           before=[f"loss {debiased_loss:.6f}", f"lrm {lrm:.2f}"], after=[f"epoch {epoch}"]), step,
                {"total_training_flops": num_flops_per_token * total_batch_size * step, "train/lrm": lrm, "train/dt": dt,
                 "train/tok_per_sec": int(total_batch_size / dt), "train/mfu": meter.mfu(dt), "train/epoch": epoch},
                train_loss=debiased_loss)

    # -------------------------------------------------------------------------
    min_val_bpb = min((point["val_bpb"] for point in loop_state["curve"] if "val_bpb" in point), default=None)
    run.report("Base model training", {
        "Number of parameters": param_counts["total"],
        "FLOPs per token": f"{num_flops_per_token:e}",
        "Iterations": num_iterations,
        "Training tokens": total_tokens,
        "Tokens : scaling params ratio": total_tokens / model_scaling_params,
        "DDP world size": world_size,
        "Minimum validation bpb": min_val_bpb,
        "Final validation bpb": state.val_bpb,
        "Total training time": format_duration(loop_state["total_training_time"]),
        "Peak memory (MiB)": round(get_max_memory_mb(device_type)),
        **({core_results["label"]: core_results["core_metric"]} if core_results else {}),
    })
    print0(f"Minimum val bpb: {min_val_bpb:.4f}" if min_val_bpb is not None else "No val bpb evaluated (--eval-every=-1)")
    run.finish()


if __name__ == "__main__":
    main()
