"""
Checkpoints: save them atomically, find the latest complete one, rebuild model + tokenizer from it.

One checkpoint of step N in a directory (base_dir/<stage>_checkpoints/<model_tag>/):
  model_{N:06d}.pt            the model state dict (rank 0)
  optim_{N:06d}_rank{r}.pt    each rank's optimizer shard (optional; needed only to resume training)
  meta_{N:06d}.json           model config + training state (rank 0; nanochat/run.py's RunState), written LAST
Every file is written whole or not at all (common.atomic_write: a temp name, fsync, rename), so a file under
its final name is always whole. Because meta is written last (after every rank's optimizer shard), a
checkpoint counts as complete exactly when its meta file exists; a crash mid-save leaves at most an
incomplete newest step (ignored by find_last_step) and never touches earlier steps. The temp files of a
killed save are removed by the next save or load in that directory.
(Resuming a run: nanochat/run.py; re-running a pipeline stage by stage: nanochat/pipeline.py.)
"""

import dataclasses
import datetime
import glob
import hashlib
import json
import logging
import math
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import get_base_dir, UserError, atomic_write, remove_temp_files as remove_stale_temp_files

logger = logging.getLogger("nanochat")

# Where each training stage keeps its checkpoints, and the script that creates them.
STAGE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STAGE_SCRIPTS = {"base": "scripts.base_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}

MODEL_FILE_RE = re.compile(r"^model_(\d{6,})\.pt$")
STEP_FILE_RE = re.compile(r"^(?:model_(\d{6,})\.pt|meta_(\d{6,})\.json|optim_(\d{6,})_rank\d+\.pt)$")


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """
    Rank 0 writes model + meta, every rank writes its optimizer shard (when optimizer_data is not None;
    under torchrun every rank must then call this: meta waits for all shards). Each file is hashed
    (sha256) on its way to disk and meta records every file's hash, so a load can tell a damaged file.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    remove_stale_temp_files(checkpoint_dir)
    if rank == 0 and os.path.exists(meta_path(checkpoint_dir, step)):
        # Re-saving a step: mark it incomplete first so a crash halfway never pairs old meta with new weights.
        os.remove(meta_path(checkpoint_dir, step))
    checksums = {}
    if rank == 0:
        # Weights go to disk in fp32 whatever the run's compute dtype, so a checkpoint loads the same everywhere.
        model_data = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in model_data.items()}
        checksums.update(_save_hashed(model_path(checkpoint_dir, step), model_data))
    if optimizer_data is not None:
        checksums.update(_save_hashed(optim_path(checkpoint_dir, step, rank), optimizer_data))
        if dist.is_available() and dist.is_initialized():
            # Every shard is on disk before meta declares the step complete, and rank 0 gets every shard's hash.
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, checksums)
            checksums = {name: digest for rank_checksums in per_rank for name, digest in rank_checksums.items()}
    if rank == 0:
        payload = json.dumps({**meta_data, CHECKSUMS_KEY: checksums}, indent=2).encode("utf-8")
        atomic_write(meta_path(checkpoint_dir, step), lambda f: f.write(payload))


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """
    -> (model_data, optimizer_data or None, meta_data). A damaged file is a UserError naming it. Resuming
    (load_optimizer) checks the files against the sha256 hashes meta recorded; see must_verify.
    """
    return _load_checkpoint(checkpoint_dir, step, device, load_optimizer, rank, verify=load_optimizer)


def load_optimizer_shard(checkpoint_dir, step, device, rank=0):
    """
    -> this rank's optimizer state of a complete checkpoint, checked against the sha256 its meta recorded (a
    damaged file is a UserError naming it): for a stage that continues another's moments (SFT from the base run).
    """
    meta_data = _read_file(meta_path(checkpoint_dir, step), step, _read_json)
    checksums = meta_data.get(CHECKSUMS_KEY) if isinstance(meta_data, dict) else None
    return _read_file(optim_path(checkpoint_dir, step, rank), step, lambda path: torch.load(path, map_location=device),
                      checksums if isinstance(checksums, dict) else None)


# Checking a file's sha256 reads it once more: at d20 that about doubles a load (dev/LOG.md, checkpoint checksums).
# Worth it where training continues from the checkpoint for hours; for evaluation and chat, opt in with
# NANOCHAT_VERIFY_CHECKPOINTS=1. Checkpoints saved before meta recorded hashes load unchecked.
VERIFY_ENV = "NANOCHAT_VERIFY_CHECKPOINTS"


def must_verify(training):
    """Whether a load checks the files' hashes: always when training continues from it, else when VERIFY_ENV=1."""
    value = os.environ.get(VERIFY_ENV, "")
    if value not in ("", "0", "1"):
        raise UserError(f"{VERIFY_ENV}={value!r} is not understood: set it to 1 to check every checkpoint load "
                        f"against its sha256 hashes, or to 0 (or unset it) to check only loads that continue training")
    return training or value == "1"


def _load_checkpoint(checkpoint_dir, step, device, load_optimizer, rank, verify):
    remove_stale_temp_files(checkpoint_dir)
    path = meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint step {step} in {checkpoint_dir} is missing or incomplete "
                                f"(no {os.path.basename(path)}); pick another --step")
    meta_data = _read_file(path, step, _read_json)
    if not isinstance(meta_data, dict) or not isinstance(meta_data.get("model_config"), dict):
        raise _damaged(path, step, "has no model_config")
    checksums = meta_data.pop(CHECKSUMS_KEY, None)  # the caller gets back the meta it saved
    if checksums is not None and not isinstance(checksums, dict):
        raise _damaged(path, step, f"has a {CHECKSUMS_KEY!r} entry that is not a dict of file hashes")
    checksums = checksums if must_verify(verify) else None
    model_data = _read_file(model_path(checkpoint_dir, step), step, lambda path: torch.load(path, map_location=device),
                            checksums)
    optimizer_data = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No optimizer state for rank {rank} at {path}: resume needs the checkpoint of a "
                                    f"run with the same number of processes (or train without --resume-from-step)")
        optimizer_data = _read_file(path, step, lambda path: torch.load(path, map_location=device), checksums)
    return model_data, optimizer_data, meta_data


# meta's entry {file name: sha256 hex digest} for the step's model and optimizer files (`sha256sum FILE` agrees).
CHECKSUMS_KEY = "sha256"


class _HashingWriter:
    """A binary file to write through: every byte written also goes into a sha256, so hashing needs no second read."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def __getattr__(self, name):  # everything else (flush, fileno, tell) is the file's own
        return getattr(self.f, name)


def _save_hashed(path, data):
    """torch.save data to path (atomically) -> {file name: sha256 of the bytes written}."""
    writers = []

    def write(f):
        writers.append(_HashingWriter(f))
        torch.save(data, writers[-1])

    atomic_write(path, write)
    return {os.path.basename(path): writers[-1].sha256.hexdigest()}


def file_sha256(path):
    digest = hashlib.sha256()  # (hashlib.file_digest needs Python 3.11)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _check_config_value(key, value, kind):
    """ValueError unless value is a kind (int, float, str, bool) that a model config can hold."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        expected = "a positive number"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key == "short_window" else 1)
        expected = "a non-negative int" if key == "short_window" else "a positive int"
    else:
        ok, expected = isinstance(value, kind), f"a {kind.__name__}"
    if not ok:
        raise ValueError(f"model_config.{key} is {value!r}, not {expected}")


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_file(path, step, read, checksums=None):
    """
    read(path), or a UserError naming the file when it is empty, cannot be parsed, or (given checksums, meta's
    {file name: sha256}) its bytes are not the ones that were saved.
    """
    if os.path.getsize(path) == 0:
        raise _damaged(path, step, "is empty (0 bytes)")
    if checksums is not None:
        name = os.path.basename(path)
        if name not in checksums:
            raise _damaged(path, step, f"has no sha256 in {os.path.basename(meta_path(os.path.dirname(path), step))}: "
                                       f"it was not saved with this step")
        if file_sha256(path) != checksums[name]:
            raise _damaged(path, step, "does not have the sha256 its meta recorded (its bytes changed after the save)")
    try:
        return read(path)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the device is full, the file may be fine
    except Exception as e:  # torch.load alone raises EOFError, OSError, KeyError, UnpicklingError... on bad bytes
        first_sentence = str(e).strip().split("\n")[0].split(". ")[0]  # torch's hints run to 20 lines of advice
        raise _damaged(path, step, f"cannot be read ({type(e).__name__}: {first_sentence})") from e


def _damaged(path, step, problem):
    checkpoint_dir = os.path.dirname(path)
    others = [s for s in complete_steps(checkpoint_dir) if s != step]
    return UserError(f"Checkpoint file {path} {problem}, so step {step} cannot be loaded. Pick another step "
                     f"(complete: {', '.join(map(str, others)) or 'none'}), or delete step {step}'s files "
                     f"(*_{step:06d}*) from {checkpoint_dir}")


def prune_checkpoints(checkpoint_dir, keep_last, keep_steps=()):
    """
    Keep the keep_last newest complete steps and keep_steps (e.g. the step this run resumed from), and
    delete the files of every older step, meta first so that a step stops counting as complete before
    its weights go. Call it on rank 0 once save_checkpoint has returned (the new step is then complete);
    a step newer than the newest complete one (a save in progress) is never touched.
    """
    complete = complete_steps(checkpoint_dir)
    if not complete:
        return
    kept = set(complete[-keep_last:]) | set(keep_steps)
    files_by_step = {}
    for name in os.listdir(checkpoint_dir):
        if match := STEP_FILE_RE.match(name):
            step = int(next(group for group in match.groups() if group is not None))
            files_by_step.setdefault(step, []).append(name)
    for step, names in sorted(files_by_step.items()):
        if step < complete[-1] and step not in kept:
            for name in sorted(names, key=lambda name: not name.startswith("meta_")):  # meta first
                os.remove(os.path.join(checkpoint_dir, name))
            logger.info(f"Removed checkpoint step {step} from {checkpoint_dir} (keeping the last {keep_last})")


# ---------------------------------------------------------------------------------------------------
# Rebuilding a model from a checkpoint, including checkpoints written before a feature existed.

# Config keys that older checkpoints lack, with the value that reproduces how those models were trained.
LEGACY_CONFIG_DEFAULTS = {"window_pattern": "L"}  # before sliding windows every layer attended fully
# Keys every checkpoint ever had: one missing is damage, never a default (a model trained at sequence_len 256
# rebuilt at GPTConfig's 2048 would run, and talk nonsense past its training length).
REQUIRED_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd")


def patch_model_config(config_kwargs, config_cls):
    """
    Fill keys missing from an older meta["model_config"] with neutral values; drop unknown keys. ValueError
    naming the key when a key every checkpoint has is missing, or a value has the wrong type or range.
    """
    known = {f.name: f.type for f in dataclasses.fields(config_cls)}
    config_kwargs = dict(config_kwargs)
    for key in sorted(set(config_kwargs) - set(known)):
        logger.warning(f"Checkpoint config key {key!r} is unknown to GPTConfig; ignoring it")
        del config_kwargs[key]
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config_kwargs]
    if missing:
        raise ValueError(f"model_config lacks {', '.join(missing)}")
    for key, value in config_kwargs.items():
        _check_config_value(key, value, known[key])
    if "n_kv_head" not in config_kwargs:
        logger.warning("Older checkpoint: model_config lacks n_kv_head; using n_kv_head = n_head (no GQA)")
        config_kwargs["n_kv_head"] = config_kwargs["n_head"]
    for key, value in LEGACY_CONFIG_DEFAULTS.items():
        if key not in config_kwargs:
            logger.warning(f"Older checkpoint: model_config lacks {key}; using {value!r}")
            config_kwargs[key] = value
    return config_kwargs


def neutral_tensor(key, like):
    """A value for a parameter the checkpoint predates that makes it a no-op, or None if there is none."""
    if key == "resid_lambdas":
        return torch.ones(like.shape, dtype=like.dtype)  # x = 1.0 * x: the plain residual stream
    zero_keys = ("x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")
    if key in zero_keys or key.startswith("value_embeds.") or key.endswith(".ve_gate.weight"):
        return torch.zeros(like.shape, dtype=like.dtype)  # no x0 mixing / nothing added to v / no smear / no backout
    return None


def patch_state_dict(model_data, expected):
    """Add neutral tensors for keys in `expected` (name -> tensor) that an older checkpoint lacks."""
    for key in expected:
        if key in model_data:
            continue
        value = neutral_tensor(key, expected[key])
        if value is None:
            raise KeyError(f"Checkpoint lacks parameter {key!r} and there is no neutral default for it: "
                           f"the checkpoint does not match this version of GPT")
        logger.warning(f"Older checkpoint: missing {key}; filling with the neutral value {value.flatten()[0].item()}")
        model_data[key] = value
    return model_data


def build_model(checkpoint_dir, step, device, phase):
    """-> (model, tokenizer, meta_data) with the model in train or eval mode on `device`."""
    from nanochat.gpt import GPTConfig, build_gpt, check_config, compute_window_sizes
    from nanochat.tokenizer import get_tokenizer
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    # Training from it (a stage starting from the previous one's checkpoint) checks its hashes, as resuming does.
    model_data, _, meta_data = _load_checkpoint(checkpoint_dir, step, device, False, 0, verify=phase == "train")
    try:
        config = GPTConfig(**patch_model_config(meta_data["model_config"], GPTConfig))
        check_config(config)
        compute_window_sizes(config)
    except ValueError as e:
        raise _damaged(meta_path(checkpoint_dir, step), step, f"is unusable ({e})") from e
    model = build_gpt(config, device)  # init_weights fills the non-persistent buffers (rotary tables)
    # torch.compile'd models save their keys under _orig_mod.
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    try:
        model_data = patch_state_dict(model_data, model.state_dict())
        model.load_state_dict(model_data, strict=True)  # copied into the model's dtypes (embeddings: the compute dtype)
    except torch.OutOfMemoryError:
        raise  # the device is full, the files may be fine
    except (KeyError, RuntimeError) as e:
        lines = str(e).strip("'\" \n").splitlines()
        # torch says "Error(s) in loading state_dict for GPT:", then one line per tensor: name the first
        detail = lines[min(1, len(lines) - 1)].strip()
        raise _damaged(model_path(checkpoint_dir, step), step, f"does not fit the model_config of "
                       f"{os.path.basename(meta_path(checkpoint_dir, step))} ({detail})") from e
    if phase == "train":
        model.train()
    else:
        model.eval()

    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"The tokenizer in {os.path.join(get_base_dir(), 'tokenizer')} has {tokenizer.get_vocab_size()} "
                        f"tokens but the checkpoint in {checkpoint_dir} was trained with vocab_size {config.vocab_size}: "
                        f"use the tokenizer of that run (same NANOCHAT_BASE_DIR) or retrain the model")
    return model, tokenizer, meta_data


# ---------------------------------------------------------------------------------------------------
# Finding checkpoints.

def find_largest_model(checkpoints_dir):
    """The model tag to use by default: the deepest d<N> tag, else the most recently modified directory."""
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise FileNotFoundError(f"No model directories in {checkpoints_dir}")
    depth_tags = [(int(m.group(1)), tag) for tag in tags if (m := re.fullmatch(r"d(\d+)", tag))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def set_aside(directory):
    """Move a checkpoint folder out of the way, kept, to base_dir/replaced/<its path>.<date-time> -> that path."""
    name = os.path.relpath(directory, get_base_dir())
    name = os.path.basename(os.path.abspath(directory)) if name.startswith("..") else name  # (outside the base dir)
    aside = os.path.join(get_base_dir(), "replaced", f"{name}.{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(directory, aside)
    return aside


def complete_steps(checkpoint_dir):
    """Sorted steps with a complete checkpoint (model and meta present); temp and partial files don't count."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        match = MODEL_FILE_RE.match(os.path.basename(path))
        if match and os.path.exists(meta_path(checkpoint_dir, int(match.group(1)))):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    """The largest step with a complete checkpoint."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"No complete checkpoint (model_*.pt + meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def pick_checkpoint(checkpoints_dir, model_tag=None, step=None):
    """-> (checkpoint_dir, model_tag, step): the given tag and step, else the largest model and its latest step."""
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"No model tag {model_tag!r} in {checkpoints_dir} (have: {sorted(os.listdir(checkpoints_dir))})")
    step = find_last_step(checkpoint_dir) if step is None else step
    return checkpoint_dir, model_tag, step


def stage_checkpoints_dir(source):
    """base|sft|rl -> base_dir/<stage>_checkpoints, which must hold at least one model."""
    if source not in STAGE_DIRS:
        raise ValueError(f"source must be one of {sorted(STAGE_DIRS)}, got {source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), STAGE_DIRS[source])
    if not os.path.isdir(checkpoints_dir) or not os.listdir(checkpoints_dir):
        raise FileNotFoundError(f"No {source} checkpoints in {checkpoints_dir}: run `python -m {STAGE_SCRIPTS[source]}` "
                                f"first (or set NANOCHAT_BASE_DIR to the run's base dir)")
    return checkpoints_dir


def find_checkpoint(source, model_tag=None, step=None):
    """source: base|sft|rl -> (checkpoint_dir, model_tag, step) that load_model(source, ...) would load: for
    callers that need to know which checkpoint the defaults picked."""
    return pick_checkpoint(stage_checkpoints_dir(source), model_tag, step)


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    """Pick the tag (largest model) and step (latest) unless given, then build -> (model, tokenizer, meta_data)."""
    checkpoint_dir, model_tag, step = pick_checkpoint(checkpoints_dir, model_tag, step)
    logger.info(f"Loading model from {checkpoint_dir} at step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, device, phase, model_tag=None, step=None):
    """source: base|sft|rl -> (model, tokenizer, meta_data) from base_dir/<stage>_checkpoints. To know which tag
    and step the defaults picked, call find_checkpoint first and pass them here."""
    return load_model_from_dir(stage_checkpoints_dir(source), device, phase, model_tag, step)
