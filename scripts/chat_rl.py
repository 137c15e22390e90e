"""
Reinforcement learning on GSM8K (or your own questions) with a simplified GRPO (DeepSeekMath, Shao et al.
2024): sample several answers per question, reward the correct ones, and push up the log-probability of
answers that beat their siblings.

    python -m scripts.chat_rl --examples-per-step=4 --num-samples=4 --max-new-tokens=128   # CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- -i sft
    python -m scripts.chat_rl --task my_questions.jsonl   # {"question": ..., "answer": ...} per line (tasks/customjson.py)

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

from nanochat.common import print0, get_compute_dtype, synchronize, get_base_dir, format_duration, positive, all_reduce_sum
from nanochat.checkpoint_manager import find_checkpoint, load_model, STAGE_DIRS
from nanochat.chat_train import training_rows, group_advantages, policy_gradient_loss, loss_normaliser
from nanochat.engine import Engine
from nanochat.optim import get_lr_multiplier, get_muon_momentum, apply_schedules, GradScaler
from nanochat.run import Run, RunState, StepMeter, add_run_flags, add_checkpoint_flags, check_resume_step, restore_process_state
from tasks.customjson import CustomQA
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Simplified GRPO on GSM8K or your own questions")
add_run_flags(parser)
add_checkpoint_flags(parser, "sft", ["sft"])
parser.add_argument("--task", type=str, default=None, metavar="FILE.jsonl",
                    help='your questions instead of GSM8K: {"question": ..., "answer": ...} per line; a numeric answer is '
                         'graded by the last number in the reply, any other by exact match')
parser.add_argument("--eval-task", type=str, default=None, metavar="FILE.jsonl",
                    help="held-out questions for pass@k (default: GSM8K test; with --task, the first questions of --task)")
parser.add_argument("--num-epochs", type=positive(int), default=1, help="passes over the train questions")
parser.add_argument("--num-iterations", type=int, default=-1, help="steps to train (-1 = --num-epochs passes)")
parser.add_argument("--examples-per-step", type=positive(int), default=16, help="questions per optimizer step, all ranks")
parser.add_argument("--num-samples", type=positive(int), default=16, help="sampled answers per question")
parser.add_argument("--device-batch-size", type=positive(int), default=8, help="rows per sampling batch and per forward/backward")
parser.add_argument("--max-new-tokens", type=positive(int), default=256, help="longest sampled answer, in tokens")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (training and pass@k)")
parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
parser.add_argument("--embedding-lr", type=positive(float), default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=positive(float), default=0.004, help="AdamW LR of the lm_head")
parser.add_argument("--matrix-lr", type=positive(float), default=0.02, help="Muon LR of the blocks' matrices")
parser.add_argument("--init-lr-frac", type=positive(float), default=0.05, help="LRs start at this fraction of the flags above")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
parser.add_argument("--eval-every", type=int, default=60, help="pass@k on the eval questions every N steps and at the end (-1 = never, 0 = only at the end)")
parser.add_argument("--eval-examples", type=positive(int), default=None,
                    help="eval questions per evaluation (default: 400 on a GPU, 20 elsewhere: sampling is slow on a CPU)")
parser.add_argument("--eval-samples", type=positive(int), default=4, help="k of pass@k: answers sampled per eval question")
DEVICE_DEFAULTS = {"eval_examples": (400, 20)}


@restore_process_state
def main(argv=None):
    args = parser.parse_args(argv)
    try:  # your questions are checked line by line before anything starts (a bad line: one error naming it)
        for path in filter(None, (args.task, args.eval_task)):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file")
        train_task = CustomQA(filepath=args.task) if args.task else GSM8K(subset="main", split="train")
        val_task = CustomQA(filepath=args.eval_task) if args.eval_task else train_task if args.task else \
            GSM8K(subset="main", split="test")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    task_name = "GSM8K test" if not (args.task or args.eval_task) else os.path.basename(args.eval_task or args.task)
    run = Run(args, "nanochat-rl", DEVICE_DEFAULTS)
    device, rank, world_size = run.device, run.rank, run.world_size
    device_type = device.type

    # No torch.compile: every step's samples have a different length, and the Engine runs the model eagerly.
    _, model_tag, source_step = find_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = load_model(args.source, device, "train", model_tag, source_step)
    checkpoint_dir = os.path.join(get_base_dir(), STAGE_DIRS["rl"], model_tag)
    engine = Engine(model, tokenizer)
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    scaler = GradScaler(enabled=get_compute_dtype(device_type) == torch.float16)

    if args.task and not args.eval_task:
        print0(f"Note: pass@k is measured on the first questions of {args.task}, which it also trains on (--eval-task FILE: held-out ones)")
    if args.examples_per_step % world_size != 0:
        parser.error(f"--examples-per-step={args.examples_per_step} must be a multiple of the number of processes ({world_size})")
    examples_per_rank = args.examples_per_step // world_size
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, args.num_epochs * len(train_task) // args.examples_per_step)
    print0(f"{num_iterations} steps x {args.examples_per_step} questions x {args.num_samples} samples "
           f"({examples_per_rank} questions per rank)")
    if args.resume_from_step != -1:
        check_resume_step(args.resume_from_step, num_iterations)
        state = run.resume(checkpoint_dir, model, optimizer, scaler)
    else:
        state = run.state = RunState(model_config=asdict(model.config), user_config=run.user_config, val_pass_at_k={},
                                     source={"stage": args.source, "model_tag": model_tag, "step": source_step})

    # -------------------------------------------------------------------------
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

    # -------------------------------------------------------------------------
    # Training loop. The data position is the step: step s trains on questions s * examples_per_step onwards.
    step = state.step
    loop_state = state.loop_state
    meter = StepMeter(loop_state, warmup_steps=0)  # every step samples afresh: no warmup to leave out of the timing
    model.train()
    while True:
        last_step = step == num_iterations

        if run.due(args.eval_every, step, last_step):
            pass1, passk = evaluate_pass_at_k()
            state.val_pass_at_k = {"pass@1": pass1, f"pass@{args.eval_samples}": passk}
            run.log(f"Step {step:05d} | {task_name} pass@1 {100 * pass1:.2f}% | pass@{args.eval_samples} {100 * passk:.2f}%",
                    step, **state.val_pass_at_k)

        if run.save_due(step, last_step):
            state.step, state.finished = step, last_step
            run.save(checkpoint_dir, state, model, optimizer, scaler)

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
        run.log(meter.line(step, f"{num_iterations:05d}", step / num_iterations, dt,
                           before=[f"reward {mean_reward:.4f}", f"answer length {mean_length:.1f}", f"lrm {lrm:.2f}"]),
                step, {"train/lrm": lrm, "train/dt": dt}, reward=mean_reward, answer_length=mean_length)

    # -------------------------------------------------------------------------
    run.report("Chat RL" + (f" ({os.path.basename(args.task)})" if args.task else ""), {  # (your task: its own section)
        "Number of iterations": step,
        "DDP world size": world_size,
        **({"Task": args.task} if args.task else {}),
        **{f"{task_name} {k}": v for k, v in state.val_pass_at_k.items()},
        "Total training time": format_duration(loop_state["total_training_time"]),
    })
    run.finish()


if __name__ == "__main__":
    main()
