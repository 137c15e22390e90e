"""
Things every stage needs: the base dir, distributed/device init and teardown, user errors and flag
checks, rank-0 printing, wandb stand-in, GPU peak FLOPs for MFU. Device and dtype decisions live here
and nowhere else. (Where data comes from, and downloads: nanochat/datasource.py.)
"""

import os
import sys
import atexit
import logging
import argparse
import importlib

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")


def get_base_dir():
    """All state (data, tokenizer, checkpoints, reports) lives here: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


class UserError(Exception):
    """
    A problem the user can fix (a damaged checkpoint, a resume step past the end, ...), with a message
    that says how. A script started with compute_init prints it as one line, without a traceback.
    """


# Errors that scripts report as one line: ours, and a missing file or directory (the library names
# the file and the step that creates it).
USER_ERRORS = (UserError, FileNotFoundError)


def positive(kind):
    """An argparse type for flags that must be > 0: type=positive(int) or type=positive(float)."""
    def parse(text):
        value = kind(text)
        if not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def print0(*args, **kwargs):
    """print on rank 0 only (RANK is set by torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def print_banner():
    print0("=" * 64 + "\n nanochat: train your own ChatGPT, from raw text to a chat UI\n" + "=" * 64)


def is_ddp_requested():
    """torchrun sets these; a plain `python -m` run has none of them."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info():
    """-> (ddp, rank, local_rank, world_size)."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type():
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type


def get_compute_dtype(device_type):
    """bf16 autocast on CUDA, fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def autocast_ctx(device_type):
    """The one autocast context every script uses: bf16 on CUDA, a no-op elsewhere."""
    import contextlib
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def get_max_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**2
    import resource  # CPU: peak resident set size of this process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_init(device_type="", seed=42):
    """
    Seed, pick the device, and join the process group when launched by torchrun (nccl on CUDA, gloo on
    CPU). From here on, a user error ends the script with one line instead of a traceback, and a
    distributed run leaves its group safely however it ends (see below).
    Returns (ddp, rank, local_rank, world_size, device).
    """
    sys.excepthook = _report_user_errors(sys.excepthook)
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu", "mps"):
        raise UserError(f"--device-type must be cuda, cpu or mps (or empty to autodetect), got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type=cuda was requested but CUDA is not available; use --device-type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type=mps was requested but MPS is not available; use --device-type=cpu")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (rare under bf16 autocast) use TF32
        torch.backends.cudnn.allow_tf32 = True

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        # torch.distributed.nn binds the default group into its functions' default arguments when it is
        # first imported (creating any optimizer imports it, through torch._dynamo). Imported after the
        # group exists, it would keep the group, and its threads, alive past destroy_process_group
        # (see the teardown notes below). Imported before, it binds None.
        importlib.import_module("torch.distributed.nn")
        atexit.register(_leave_process_group)
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return ddp, rank, local_rank, world_size, device


def _report_user_errors(print_traceback):
    """An excepthook: a user error is one line (as argparse prints a bad flag), anything else a traceback."""
    def excepthook(exc_type, exc_value, exc_traceback):
        if issubclass(exc_type, USER_ERRORS):
            print(f"{os.path.basename(sys.argv[0])}: error: {exc_value}", file=sys.stderr)
        else:
            print_traceback(exc_type, exc_value, exc_traceback)
    return excepthook


# Tearing down a distributed run. The process group owns background threads (gloo's worker loops) that
# hold the last references to finished collectives and their tensors. If they are still alive when the
# interpreter finalizes, a worker that drops such a tensor needs the GIL, is told to exit instead, and
# the C++ runtime aborts the process: SIGABRT, "terminate called without an active exception", after
# all the work was done. So the group must be destroyed, and its threads joined, while the interpreter
# is whole, on every way out: compute_cleanup() at the normal end, _leave_process_group at any other.

def _leave_process_group():
    """
    atexit of a distributed run. After a clean exit that skipped compute_cleanup (sys.exit, parser.error),
    leave the group. After an uncaught error (printed by now), leave the process at once with status 1:
    tearing down could wait forever on a collective that the other ranks never join, and finalizing with
    the group alive aborts, which hides the real error. torchrun then stops the other ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if getattr(sys, "last_value", None) is not None:  # set when an uncaught exception was reported
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def compute_cleanup():
    """The normal end of a run: wait until every rank is done with its collectives, then leave the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when logging is off (--run dummy)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name, project, config, master_process):
    """wandb only when asked for (--run NAME) on the master process; WANDB_MODE=offline works without an account."""
    if run_name == "dummy" or not master_process:
        return DummyWandb()
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--run was given but wandb is not installed: pip install wandb (or use --run dummy)") from e
    return wandb.init(project=project, name=run_name, config=config)


# bf16 dense peak FLOP/s by device name substring. Order matters: the more specific name first.
_PEAK_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1.3074e15),
]


def get_peak_flops(device_name):
    """bf16 dense peak FLOP/s for a GPU name; unknown -> inf (MFU then reads 0 rather than a wrong figure)."""
    for key, flops in _PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    logger.warning(f"Unknown peak FLOPs for device {device_name!r}: MFU will read 0")
    return float("inf")


def get_device_name(device_type):
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return device_type


def format_duration(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"

