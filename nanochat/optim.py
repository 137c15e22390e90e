"""
The one optimizer of the model: Muon for the 2-D block matrices, AdamW for everything else
(embeddings, lm_head, the per-layer scalars). Sources: Muon (Jordan et al. 2024, "Muon: An optimizer for
hidden layers in neural networks"), AdamW (Loshchilov & Hutter 2019), ZeRO (Rajbhandari et al. 2020); the
2026 additions to Muon and the schedules are upstream nanochat's recipe, ablated at d4 in dev/LOG.md
("the 2026 training recipe": turning back the Muon group cost 0.014 bpb, the schedules 0.030).

MuonAdamW runs in one process. DistMuonAdamW runs in many (ZeRO-2 style, no DDP wrapper): it averages
the gradients across ranks itself, each rank updates only the shard it owns and keeps only that
shard's optimizer state, then the shards are gathered back into every rank's parameters.
Both call the same update functions below (adamw_step, muon_step), so the math cannot drift apart.

Param groups are dicts with kind='adamw' (params, lr, betas, eps, weight_decay) or kind='muon'
(params all of one 2-D shape, lr, momentum, ns_steps, beta2, weight_decay); every group has initial_lr,
which the schedules at the bottom scale.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import UserError, compute_choice, is_distributed

# Polar Express (Amsel et al. 2025, "The Polar Express: Optimal Matrix Sign Methods and Their Application to
# the Muon Algorithm"), (a, b, c) per iteration: X <- a X + (b A + c A^2) X with A = X X^T. Each step's odd
# polynomial is fit (minimax) to the singular-value range left by the previous one: the first ones
# lift tiny singular values fast (a ~ 8), the last ones tighten the band around 1 (~[0.86, 1.14], measured:
# dev/LOG.md, "First measurements"). These coefficients are the ones upstream nanochat uses.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# Below this many elements a reduce_scatter + all_gather costs more in latency than it saves, so
# small tensors (the per-layer scalars) are all-reduced and updated whole on every rank.
ALL_REDUCE_MAX_NUMEL = 1024
# Polar Express divides by ||X||_F times this margin: the Frobenius norm bounds the spectral norm, the
# margin covers its bf16 rounding. 1.01 instead of 1.02 starts the iteration 1% closer to the target
# (upstream nanochat's 2026 value).
POLAR_EXPRESS_MARGIN = 1.01
# torch 2.13 renamed the tensor collectives (the old names warn); pyproject allows torch >= 2.9,
# which has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
ADAMW_KEYS = ("params", "lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("params", "lr", "momentum", "ns_steps", "beta2", "weight_decay")

# -----------------------------------------------------------------------------
# The update math, shared by both optimizers. Hyperparameters arrive as 0-D CPU tensors so that a
# compiled step sees a changing lr/momentum/step as data rather than a new constant (no recompiles).


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW on one tensor, in place. Math and moments in fp32 even for a bf16 param."""
    p = param.float()  # for an fp32 param this is param itself, so the updates below land in place
    g = grad.float()
    p.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
    p.sub_(exp_avg.div(denom).mul_(lr / bias_correction1))
    if param.dtype != torch.float32:
        param.copy_(p)


def equalize_rows(G):
    """
    MuonEq (upstream nanochat's 2026 recipe), before orthogonalising: scale every row of each matrix in
    the stack (K, rows, cols) to the matrix's RMS row norm. A few rows with large gradients otherwise
    dominate the polar factor's direction; equal rows let every output feature take part. Zero rows
    (padding) stay zero.
    """
    row_norms = G.norm(dim=-1, keepdim=True)
    rms_row_norm = row_norms.square().mean(dim=-2, keepdim=True).sqrt()
    return G * (rms_row_norm / row_norms.clamp_min(1e-10))


def polar_express(G, ns_steps):
    """Approximate the orthogonal polar factor U V^T of each matrix in the stack G (K, rows, cols)."""
    X = G.mT if G.size(-2) > G.size(-1) else G  # work on the wide side: X X^T is then the smaller product
    # Bring every singular value into (0, 1], the range the coefficients were fit for (the margin covers
    # the norm's rounding in bf16).
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_MARGIN + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, one GEMM
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X, one GEMM
    return X.mT if G.size(-2) > G.size(-1) else X


def restore_norm(X):
    """
    Muon+, after orthogonalising: rescale each matrix to the Frobenius norm sqrt(min(rows, cols)) of
    an exact orthogonal factor. Polar Express leaves singular values in a band around 1 whose average
    drifts with the input's conditioning; this pins the step size. Zero matrices (padding) stay zero.
    """
    target = min(X.shape[-2:]) ** 0.5
    return X * (target / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def normuon(update, second_moment, beta2):
    """
    NorMuon variance reduction ("NorMuon: Making Muon more efficient and scalable", 2025): equalize the
    RMS of the update's rows (or columns, whichever is the longer side) with a factored second moment kept
    as an EMA, then rescale so the update keeps its total norm. second_moment is (K, rows, 1) or
    (K, 1, cols), fp32, updated in place.
    """
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    second_moment.lerp_(update.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    scaled = update * second_moment.clamp_min(1e-10).rsqrt()
    norm_ratio = update.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return scaled * norm_ratio


def muon_step(params, grads, momentum_buffer, second_moment, momentum, lr, weight_decay, beta2, ns_steps, orth_dtype):
    """
    Muon on a stack of same-shape matrices (K, rows, cols), in place on params and the state.
    grads is consumed (used as scratch). lr already carries the max(1, rows/cols)**0.5 shape scale.
    """
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp_(momentum_buffer, momentum)  # Nesterov: look ahead along the momentum
    update = equalize_rows(update)
    update = restore_norm(polar_express(update.to(orth_dtype), ns_steps).float())
    update = normuon(update, second_moment, beta2)
    # Cautious weight decay ("Cautious Weight Decay", 2025, after the cautious mask of Liang et al. 2024,
    # "Cautious Optimizers"): only shrink the coordinates the update is already moving towards zero.
    mask = (update * params) >= 0
    params.sub_(lr * update + lr * weight_decay * params * mask)


# -----------------------------------------------------------------------------
# Optimizers


def _grad_of(p):
    if p.grad is None:
        raise RuntimeError(
            f"A parameter of shape {tuple(p.shape)} has no gradient at optimizer.step(). Every parameter in the "
            "optimizer must take part in the loss; leave frozen parameters out of the param groups."
        )
    return p.grad


def _check_group(group):
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"Param group kind must be 'adamw' or 'muon', got {kind!r}")
    missing = [k for k in (ADAMW_KEYS if kind == "adamw" else MUON_KEYS) if k not in group]
    if missing:
        raise ValueError(f"{kind} param group is missing {missing}")
    if kind == "muon":
        shapes = {tuple(p.shape) for p in group["params"]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"A muon group needs 2-D params all of one shape (one group per shape), got {sorted(shapes)}")
        if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"ns_steps must be 1..{len(POLAR_EXPRESS_COEFFS)}, got {group['ns_steps']}")


class MuonAdamW(torch.optim.Optimizer):
    """
    Muon + AdamW in one process. orth_dtype: dtype of the orthogonalization matmuls; compile: torch.compile
    the per-tensor steps. Both default to what the device does fast (common.compute_choice): bf16 and compiled
    on GPUs and on CPUs with native bf16, fp32 and eager elsewhere (bf16 matmuls are ~100x slower there).
    """

    def __init__(self, param_groups, orth_dtype=None, compile=None):
        param_groups = [dict(group) for group in param_groups]
        for group in param_groups:
            _check_group(group)
            group.setdefault("initial_lr", group["lr"])
        super().__init__(param_groups, defaults={})
        choice = compute_choice(next(p for group in self.param_groups for p in group["params"]).device.type)
        self.orth_dtype = orth_dtype or choice.orth_dtype
        if compile is None:
            compile = choice.compile
        # dynamic=False: one kernel per tensor shape; the few distinct shapes of a GPT stay under dynamo's
        # recompile limit.
        wrap = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if compile else (lambda fn: fn)
        self._adamw_step = wrap(adamw_step)
        self._muon_step = wrap(muon_step)
        # Filled before each call and read as data by the (compiled) steps; see the note above adamw_step.
        self._hyper = {name: torch.tensor(0.0) for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _set_hyper(self, **values):
        for name, value in values.items():
            self._hyper[name].fill_(value)

    def _adamw_update(self, state, param, grad, group):
        """One AdamW step of param (a whole tensor or this rank's shard) with the state kept for it."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        self._set_hyper(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
        h = self._hyper
        self._adamw_step(param, grad, state["exp_avg"], state["exp_avg_sq"], h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["wd"])

    def _muon_update(self, state, params, grads, group):
        """One Muon step of a stack of matrices (the whole group or this rank's shard of it)."""
        rows, cols = params.shape[-2:]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(params, dtype=torch.float32)
            factored_shape = (params.size(0), rows, 1) if rows >= cols else (params.size(0), 1, cols)
            state["second_moment"] = torch.zeros(factored_shape, dtype=torch.float32, device=params.device)
        # The orthogonalized update has spectral norm ~1; sqrt(fan_out/fan_in) for tall weights (rows = out
        # features > cols = in) makes it change output RMS as much as a square weight's update does.
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        self._set_hyper(momentum=group["momentum"], lr=lr, wd=group["weight_decay"], beta2=group["beta2"])
        h = self._hyper
        self._muon_step(params, grads, state["momentum_buffer"], state["second_moment"],
                        h["momentum"], h["lr"], h["wd"], h["beta2"], group["ns_steps"], self.orth_dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    self._adamw_update(self.state[p], p, _grad_of(p), group)
            else:
                stacked = torch.stack(params)
                # The group's stacked state is kept under its first param.
                self._muon_update(self.state[params[0]], stacked, torch.stack([_grad_of(p) for p in params]), group)
                torch._foreach_copy_(params, list(stacked.unbind(0)))

    def load_state_dict(self, state_dict):
        # torch casts loaded state to each param's dtype; ours stays fp32 whatever the param (bf16
        # embeddings on CUDA), so put the saved dtypes back.
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            state = self.state[params[index]]
            for key, value in saved.items():
                if torch.is_tensor(value) and value.dtype != state[key].dtype:
                    state[key] = value.to(state[key].device)


def _pad_dim0(t, multiple):
    """t itself when dim 0 splits evenly into `multiple` chunks, else a copy with zero rows appended."""
    remainder = t.size(0) % multiple
    if remainder == 0:
        return t
    return torch.cat([t, t.new_zeros((multiple - remainder, *t.shape[1:]))])


class DistMuonAdamW(MuonAdamW):
    """
    MuonAdamW across the ranks of the default process group (ZeRO-2): call step() after backward on
    every rank, with each rank's local gradients; no DDP wrapper. Rank r owns chunk r of dim 0 of each
    AdamW tensor (zero-padded to divide evenly) and matrices r*c..(r+1)*c-1 of each Muon group
    (c = ceil(K / world_size)), and holds optimizer state only for what it owns. Tensors under
    ALL_REDUCE_MAX_NUMEL elements are all-reduced and updated whole on every rank.
    state_dict() is this rank's shard: save one file per rank, resume with the same world size.

    Memory: a step allocates one stacked buffer per Muon group (its gradients, then its updated matrices)
    and one reduced-gradient shard per tensor or group; every all_gather writes in place (into that buffer,
    or into the AdamW parameter itself), so nothing else is copied (dev/bench_dist_optim.py, dev/LOG.md).
    """

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        # Phase 1: launch every gradient reduction at once, so communication overlaps the updates below.
        reductions = [self._launch_reduce(group, world_size) for group in self.param_groups]
        # Phase 2: group by group, wait for its gradients, update the owned shard, launch its all_gather.
        gathers = []
        for i, group in enumerate(self.param_groups):
            reduction, reductions[i] = reductions[i], None  # (its reduced gradients are freed after the update)
            update = self._update_adamw_shards if group["kind"] == "adamw" else self._update_muon_shard
            gathers += update(group, reduction, rank, world_size)
        # Phase 3: wait for every all_gather and copy the gathered values into the parameters that are not
        # themselves the gather's output.
        for work, sources, targets in gathers:
            work.wait()
            if targets:
                torch._foreach_copy_(targets, sources)

    def _launch_reduce(self, group, world_size):
        """Start averaging the group's gradients; returns (work, input, reduced shard) per tensor or group."""
        if group["kind"] == "muon":
            params = group["params"]
            # One stacked buffer for the group, zero-padded to a multiple of world_size matrices: the
            # reduce_scatter reads the gradients from it, and later the all_gather writes the matrices into it.
            stacked = params[0].new_empty((-(-len(params) // world_size) * world_size, *params[0].shape))
            torch._foreach_copy_(list(stacked[: len(params)].unbind(0)), [_grad_of(p) for p in params])
            stacked[len(params) :].zero_()
            return [self._launch_reduce_scatter(stacked, world_size)]
        reductions = []
        for p in group["params"]:
            grad = _grad_of(p)
            if p.numel() < ALL_REDUCE_MAX_NUMEL:
                reductions.append((dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True), grad, grad))
            else:
                reductions.append(self._launch_reduce_scatter(_pad_dim0(grad, world_size), world_size))
        return reductions

    @staticmethod
    def _launch_reduce_scatter(padded, world_size):
        shard = padded.new_empty((padded.size(0) // world_size, *padded.shape[1:]))
        return _reduce_scatter(shard, padded, op=dist.ReduceOp.AVG, async_op=True), padded, shard

    @staticmethod
    def _owned(padded, rank, world_size):
        """This rank's chunk of dim 0: a view, so an update of it lands in padded."""
        chunk = padded.size(0) // world_size
        return padded[rank * chunk : (rank + 1) * chunk]

    def _update_adamw_shards(self, group, reductions, rank, world_size):
        gathers = []
        for p, (work, _, grad) in zip(group["params"], reductions):
            work.wait()
            if p.numel() < ALL_REDUCE_MAX_NUMEL:
                self._adamw_update(self.state[p], p, grad, group)
                continue
            # p itself when dim 0 divides evenly; otherwise a copy whose padding rows have zero grad and zero
            # value, so the update keeps them at zero.
            padded = _pad_dim0(p, world_size)
            owned = self._owned(padded, rank, world_size)
            self._adamw_update(self.state[p], owned, grad, group)
            # In place (the input is this rank's chunk of the output, as FSDP2 gathers too): nothing to copy back
            # unless padded is a copy.
            gather_work = _all_gather(padded, owned, async_op=True)
            gathers.append((gather_work, [padded[: p.size(0)]], [] if padded is p else [p]))
        return gathers

    def _update_muon_shard(self, group, reductions, rank, world_size):
        [(work, stacked, grads)] = reductions
        work.wait()  # stacked's gradients are reduced into grads: the buffer is free again
        params = group["params"]
        owned = self._owned(stacked, rank, world_size)
        first = rank * owned.size(0)
        mine = params[first : first + owned.size(0)]  # (none or fewer at the end: padding)
        if mine:
            torch._foreach_copy_(list(owned[: len(mine)].unbind(0)), mine)
        owned[len(mine) :].zero_()  # zero-padding matrices stay exactly zero (zero momentum, zero polar factor)
        self._muon_update(self.state[params[0]], owned, grads, group)
        gather_work = _all_gather(stacked, owned, async_op=True)  # in place, as for AdamW
        return [(gather_work, list(stacked[: len(params)].unbind(0)), params)]

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["world_size"] = dist.get_world_size()
        return state_dict

    def load_state_dict(self, state_dict):
        saved_world_size, world_size = state_dict.get("world_size", 1), dist.get_world_size()
        if saved_world_size != world_size:
            raise UserError(
                f"This optimizer state was saved by {saved_world_size} ranks but {world_size} are running: "
                f"each rank holds only its shard, so resume with --nproc_per_node={saved_world_size}."
            )
        super().load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# Loss scaling for fp16


class GradScaler:
    """
    Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training"), for an fp16 compute dtype
    (its range loses small gradients to zero); with enabled=False (bf16, fp32) every method passes straight
    through. Scale the loss before backward(), then step(optimizer) unscales the gradients and steps, unless
    a gradient is inf/nan on any rank: then every rank skips the step together and the scale halves. After
    growth_interval clean steps it doubles.
    """

    def __init__(self, enabled, init_scale=2.0**16, growth_interval=2000):
        self.enabled = enabled
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def step(self, optimizer):
        """Unscale and step; returns False when the step was skipped."""
        if not self.enabled:
            optimizer.step()
            return True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)
        found_inf = torch.stack([g.isfinite().all() for g in grads]).logical_not().any().float()
        if is_distributed():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # one rank's overflow skips the step everywhere
        if found_inf.item():
            self.scale /= 2
            self.clean_steps = 0
            return False
        optimizer.step()
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2
        return True


# -----------------------------------------------------------------------------
# Schedules every training script shares


def get_lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """
    Linear warmup over warmup_steps, flat, then linear warmdown over the last warmdown_ratio of training
    to final_lr_frac: warmup-stable-decay (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations"). Past the end it holds the final value: a negative multiplier would be
    gradient ascent.
    """
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown_iters == 0 or step <= num_iterations - warmdown_iters:
        return 1.0
    progress = max(0.0, (num_iterations - step) / warmdown_iters)  # 1 -> 0 across the warmdown
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step, num_iterations=None, warmdown_ratio=0.0):
    """
    0.85 -> 0.97 linearly over the first 400 steps (a momentum warmup from the modded-nanogpt speedrun; these
    values are upstream nanochat's 2026 ones): a lower momentum settles the early, noisy steps
    faster, a higher one then averages more gradients. Given the horizon, it is pulled linearly to 0.90
    across the warmdown (the last warmdown_ratio of num_iterations): as the LR shrinks, the update
    follows the latest gradients more closely.
    """
    momentum = 0.85 + 0.12 * min(step / 400, 1.0)
    warmdown_iters = round(warmdown_ratio * num_iterations) if num_iterations else 0
    if warmdown_iters > 0 and step > num_iterations - warmdown_iters:
        progress = min((step - (num_iterations - warmdown_iters)) / warmdown_iters, 1.0)
        momentum += progress * (0.90 - momentum)
    return momentum


def get_weight_decay(step, num_iterations, weight_decay):
    """Cosine decay to 0 at the end of training: most of the decay acts early, little near the end."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * min(step / num_iterations, 1.0)))


# -----------------------------------------------------------------------------
# Transfer of the batch size and hyperparameters tuned at d12 (2^19 tokens per step) to other sizes

REFERENCE_BATCH_SIZE = 2**19


def auto_batch_size(tokens, reference_tokens):
    """
    Tokens per optimizer step for a run that trains on `tokens`, given that the reference run (d12, same
    tokens-per-parameter ratio) trains on reference_tokens with 2^19: the best batch grows as a power of the
    tokens (Power Lines, Bergsma et al. 2025), tokens^0.383 (upstream nanochat's fit across model sizes),
    rounded to a power of two so it splits evenly into rows.
    """
    return 2 ** round(math.log2(REFERENCE_BATCH_SIZE * (tokens / reference_tokens) ** 0.383))


def batch_lr_scale(batch_size):
    """Every LR scales by sqrt(batch / 2^19): the gradient noise falls as 1/sqrt(batch) (the square-root rule for
    Adam, Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms")."""
    return (batch_size / REFERENCE_BATCH_SIZE) ** 0.5


def transfer_weight_decay(weight_decay, batch_size, tokens, reference_tokens):
    """
    The Muon weight decay tuned at the reference run, for this one. Decay's timescale 1/(lr * wd) steps
    should stay a fixed fraction of the run (Power Lines, Bergsma et al. 2025: tau = batch / (lr * wd * tokens)):
    lr scales by sqrt(batch / 2^19), and a run on more tokens (more steps at this batch) wants proportionally
    less decay per step.
    """
    return weight_decay * batch_lr_scale(batch_size) * reference_tokens / tokens


def apply_schedules(optimizer, lrm, muon_momentum=None, muon_weight_decay=None):
    """lr = initial_lr * lrm on every group; momentum and weight decay on the muon groups when given."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            if muon_momentum is not None:
                group["momentum"] = muon_momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay
