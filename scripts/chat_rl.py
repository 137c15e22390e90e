"""
Reinforcement learning on GSM8K with a simplified GRPO: sample several answers per question, reward
the correct ones, and push up the log-probability of answers that beat their siblings.

    python -m scripts.chat_rl --examples-per-step=4 --num-samples=4 --max-new-tokens=128   # CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- -i sft

Simplifications of GRPO, each because it is not needed when every update is on fresh samples:
on-policy (one update per batch of samples, so no importance ratio and no ratio clipping), no KL
penalty to a reference model, advantage = reward - mean reward of the question's samples (no division
by the std), and token-level normalisation (the objective is summed over every sampled token of the
step, on all ranks, and divided by their number, so long answers are not down-weighted per token).
Only tokens the model sampled get a gradient: the prompt and the calculator outputs the Engine forced
in have mask 0. Rank r takes its own questions; rewards are all-reduced for logging. The advantage,
the loss and its normalisation are nanochat/chat_train.py's. Sampling is seeded by step and question,
so a run resumed with --resume-from-step from a --save-every checkpoint samples what it would have.
The story: args -> init -> model -> optimizer -> data -> loop -> save.
"""

import os
import time
import argparse
from dataclasses import asdict

import torch

from nanochat.common import (compute_cleanup, print0, get_compute_dtype, synchronize, get_base_dir, get_max_memory_mb,
                             format_duration, positive, all_reduce_sum)
from nanochat.checkpoint_manager import find_checkpoint, load_model, resume_training, check_resume_step, STAGE_DIRS
from nanochat.chat_train import training_rows, group_advantages, policy_gradient_loss, loss_normaliser
from nanochat.engine import Engine
from nanochat.optim import get_lr_multiplier, get_muon_momentum, apply_schedules, GradScaler
from nanochat.report import get_report
from nanochat.stage import add_run_flags, add_checkpoint_flags, start_run, save_run_checkpoint, StepMeter
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Simplified GRPO on GSM8K")
add_run_flags(parser)
add_checkpoint_flags(parser, "sft", ["sft"])
parser.add_argument("--num-epochs", type=positive(int), default=1, help="passes over the GSM8K train questions")
parser.add_argument("--num-iterations", type=int, default=-1, help="steps to train (-1 = --num-epochs passes)")
parser.add_argument("--examples-per-step", type=positive(int), default=16, help="questions per optimizer step, all ranks")
parser.add_argument("--num-samples", type=positive(int), default=16, help="sampled answers per question")
parser.add_argument("--device-batch-size", type=positive(int), default=8, help="rows per sampling batch and per forward/backward")
parser.add_argument("--max-new-tokens", type=positive(int), default=256)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--embedding-lr", type=positive(float), default=0.2)
parser.add_argument("--unembedding-lr", type=positive(float), default=0.004)
parser.add_argument("--matrix-lr", type=positive(float), default=0.02)
parser.add_argument("--init-lr-frac", type=positive(float), default=0.05, help="RL starts at this fraction of the base LRs")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--eval-every", type=int, default=60, help="pass@k on GSM8K test every N steps (-1 = only at the end)")
parser.add_argument("--eval-examples", type=positive(int), default=400, help="GSM8K test questions per evaluation")
parser.add_argument("--eval-samples", type=positive(int), default=4, help="k of pass@k: answers sampled per eval question")
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
ddp, rank, world_size, device, wandb_run = start_run(args, "nanochat-rl", user_config)
device_type = device.type

# No torch.compile: every step's samples have a different length, and the Engine runs the model eagerly.
_, model_tag, source_step = find_checkpoint(args.source, args.model_tag, args.step)
model, tokenizer, _ = load_model(args.source, device, "train", model_tag, source_step)
checkpoint_dir = os.path.join(get_base_dir(), STAGE_DIRS["rl"], model_tag)
engine = Engine(model, tokenizer)
optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scaler = GradScaler(enabled=get_compute_dtype(device_type) == torch.float16)

train_task = GSM8K(subset="main", split="train")
val_task = GSM8K(subset="main", split="test")
if args.examples_per_step % world_size != 0:
    parser.error(f"--examples-per-step={args.examples_per_step} must be a multiple of the number of processes ({world_size})")
examples_per_rank = args.examples_per_step // world_size
num_iterations = args.num_iterations if args.num_iterations > 0 else \
    max(1, args.num_epochs * len(train_task) // args.examples_per_step)
print0(f"{num_iterations} steps x {args.examples_per_step} questions x {args.num_samples} samples "
       f"({examples_per_rank} questions per rank)")
resuming = args.resume_from_step != -1
if resuming:
    check_resume_step(args.resume_from_step, num_iterations)
    resume_meta = resume_training(checkpoint_dir, args.resume_from_step, model, optimizer, device, rank, scaler)


# -----------------------------------------------------------------------------
def sample_answers(conversation, num_samples, seed):
    """-> (prompt, sequences, masks): num_samples completions of the conversation's last assistant turn,
    sampled device_batch_size at a time (bounds the KV cache memory)."""
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for first in range(0, num_samples, args.device_batch_size):
        batch_size = min(args.device_batch_size, num_samples - first)
        rows, row_masks = engine.generate_batch(prompt, num_samples=batch_size, max_tokens=args.max_new_tokens,
                                                temperature=args.temperature, top_k=args.top_k, seed=seed + first)
        sequences += rows
        masks += row_masks
    return prompt, sequences, masks


def completions(prompt, sequences):
    return [tokenizer.decode(sequence[len(prompt):]) for sequence in sequences]


@torch.no_grad()
def evaluate_pass_at_k():
    """-> (pass@1, pass@k) on the first --eval-examples test questions, k = --eval-samples.
    pass@1 is the mean fraction of correct samples (an unbiased estimate, less noisy than one sample)."""
    model.eval()
    sum_pass1, sum_passk, count = 0.0, 0.0, 0
    for index in range(rank, min(args.eval_examples, len(val_task)), world_size):
        conversation = val_task[index]
        prompt, sequences, _ = sample_answers(conversation, args.eval_samples, seed=index)
        correct = [val_task.evaluate(conversation, c) for c in completions(prompt, sequences)]
        sum_pass1 += sum(correct) / len(correct)
        sum_passk += any(correct)
        count += 1
    sum_pass1, sum_passk, count = all_reduce_sum([sum_pass1, sum_passk, count], device)
    model.train()
    return sum_pass1 / max(count, 1), sum_passk / max(count, 1)


def save(step, finished):
    meta = {"step": step, "finished": finished, "model_config": asdict(model.config), "user_config": user_config,
            "val_pass_at_k": eval_results, "source": {"stage": args.source, "model_tag": model_tag, "step": source_step},
            "loop_state": loop_state, "loss_scale": [scaler.scale, scaler.clean_steps]}
    save_run_checkpoint(checkpoint_dir, step, model, optimizer, meta, rank, args)


# -----------------------------------------------------------------------------
# Training loop. The data position is the step: step s trains on questions s * examples_per_step onwards.
step = args.resume_from_step if resuming else 0
eval_results = resume_meta["val_pass_at_k"] if resuming else {}
loop_state = resume_meta["loop_state"] if resuming else {"total_training_time": 0.0, "curve": []}
meter = StepMeter(loop_state, warmup_steps=0)  # every step samples afresh: no warmup to leave out of the timing
model.train()
while True:
    last_step = step == num_iterations
    resumed_here = step == args.resume_from_step  # evaluated and saved before the interruption: just train on

    if not resumed_here and (last_step or (args.eval_every > 0 and step % args.eval_every == 0)):
        pass1, passk = evaluate_pass_at_k()
        eval_results = {"pass@1": pass1, f"pass@{args.eval_samples}": passk}
        print0(f"Step {step:05d} | GSM8K test pass@1 {100 * pass1:.2f}% | pass@{args.eval_samples} {100 * passk:.2f}%")
        loop_state["curve"].append({"step": step, **eval_results, "time": loop_state["total_training_time"]})
        wandb_run.log({"step": step, **{f"val/{k}": v for k, v in eval_results.items()}})

    if not args.dry_run and (last_step or (step > 0 and not resumed_here and args.save_every > 0
                                           and step % args.save_every == 0)):
        save(step, finished=last_step)

    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    # 1) sample: this rank's questions of the step, num_samples answers each, with their rewards
    sequences, masks, rewards, completion_lengths = [], [], [], []
    for j in range(rank, args.examples_per_step, world_size):
        index = (step * args.examples_per_step + j) % len(train_task)
        conversation = train_task[index]
        prompt, question_sequences, question_masks = sample_answers(conversation, args.num_samples, seed=step * 10**6 + index)
        rewards.append([train_task.reward(conversation, c) for c in completions(prompt, question_sequences)])
        sequences += question_sequences
        masks += question_masks
        completion_lengths += [len(s) - len(prompt) for s in question_sequences]

    # 2) policy gradient: minimise -sum(advantage * log p(sampled token)) / number of sampled tokens
    inputs, targets = training_rows(list(zip(sequences, masks)), max(len(s) for s in sequences) - 1,
                                    tokenizer.get_bos_token_id())
    inputs, targets = inputs.to(device), targets.to(device)
    rewards = torch.tensor(rewards, dtype=torch.float32)  # (questions of this rank, num_samples)
    advantages = group_advantages(rewards).flatten().to(device)
    normaliser = loss_normaliser([targets])
    for first in range(0, len(sequences), args.device_batch_size):
        rows = slice(first, first + args.device_batch_size)
        token_nll = model(inputs[rows], targets[rows], loss_reduction="none")
        scaler.scale_loss(policy_gradient_loss(token_nll, targets[rows], advantages[rows], normaliser)).backward()
    lrm = get_lr_multiplier(step, num_iterations, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0)
    apply_schedules(optimizer, args.init_lr_frac * lrm, muon_momentum=get_muon_momentum(step))
    scaler.step(optimizer)
    model.zero_grad(set_to_none=True)
    synchronize(device_type)
    dt = time.time() - t0
    step += 1

    reward_sum, num_answers, completion_tokens = all_reduce_sum(
        [rewards.sum().item(), rewards.numel(), sum(completion_lengths)], device)
    mean_reward, mean_length = reward_sum / num_answers, completion_tokens / num_answers
    meter.update(step, dt)
    print0(meter.line(step, f"{num_iterations:05d}", step / num_iterations, dt,
                      before=[f"reward {mean_reward:.4f}", f"answer length {mean_length:.1f}", f"lrm {lrm:.2f}"]))
    loop_state["curve"].append({"step": step, "reward": mean_reward, "answer_length": mean_length,
                                "time": loop_state["total_training_time"]})
    wandb_run.log({"step": step, "train/reward": mean_reward, "train/answer_length": mean_length, "train/lrm": lrm,
                   "train/dt": dt})

# -----------------------------------------------------------------------------
print0(f"Peak memory: {get_max_memory_mb(device_type):.0f} MiB")
print0(f"Total training time: {format_duration(loop_state['total_training_time'])}")
if not args.dry_run:
    get_report().log(section="Chat RL", data=[user_config, {
        "Number of iterations": step,
        "DDP world size": world_size,
        **{f"GSM8K test {k}": v for k, v in eval_results.items()},
        "Total training time": format_duration(loop_state["total_training_time"]),
    }], curve=loop_state["curve"])
wandb_run.finish()
compute_cleanup()
