"""
Things every stage needs: the base dir, distributed/device init and teardown, user errors and flag
checks, rank-0 printing, wandb stand-in, GPU peak FLOPs for MFU, files written whole or not at all.
Device and dtype decisions live here and nowhere else. (Where data comes from, and downloads:
nanochat/datasource.py.)
"""

import os
import re
import sys
import time
import atexit
import contextlib
import secrets
import shutil
import socket
import argparse
import functools
import importlib
import logging
import threading
from dataclasses import dataclass

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


# -----------------------------------------------------------------------------
# The compute dtype, the Muon orthogonalization dtype and compile-by-default, decided here for every
# script, by what the device does fast. Measured (dev/LOG.md): on a CPU with AVX512_BF16 bf16 matmuls run
# ~4.5x faster than fp32, and the d4 training step ~2.9x faster than fp32 eager (bf16 compute and Muon,
# compiled); on an AVX2-only CPU bf16 matmuls run ~100x slower than fp32. CUDA GPUs from Ampere (SM 8.0) on have bf16 tensor cores.

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ComputeChoice:
    dtype: torch.dtype  # activations, matmuls, embeddings and KV cache (weights stay fp32 masters)
    orth_dtype: torch.dtype  # Muon's orthogonalization matmuls
    compile: bool  # torch.compile the training model unless a flag says otherwise
    reason: str  # one line: what was detected, so logs and benchmarks can say why


@functools.cache
def cpu_bf16_flags():
    """The bf16 dot-product extensions this CPU advertises in /proc/cpuinfo (Linux x86): avx512_bf16, amx_bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no flags, so the fp32 path (always correct, never pathologically slow)
        return []
    return sorted({"avx512_bf16", "amx_bf16"} & set(flags))


def compute_choice(device_type):
    """The dtypes and compile default for this machine; NANOCHAT_DTYPE (bfloat16|float16|float32) overrides the dtype."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        fast_bf16 = major >= 8
        reason = f"CUDA SM {major}.{minor}: bf16 tensor cores {'yes' if fast_bf16 else 'no (SM < 8.0)'}"
    elif device_type == "cpu":
        capability, flags = torch.backends.cpu.get_cpu_capability(), cpu_bf16_flags()
        # torch reaches the bf16 instructions only through its AVX512 kernels (oneDNN picks the same ISA)
        fast_bf16 = capability == "AVX512" and bool(flags)
        reason = f"CPU {capability}{' with ' + '/'.join(flags) if flags else ''}: native bf16 {'yes' if fast_bf16 else 'no'}"
    else:
        fast_bf16, reason = False, f"{device_type}: no bf16 rule, fp32"
    dtype = torch.bfloat16 if fast_bf16 else torch.float32
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={name!r} is not a compute dtype: use one of {', '.join(DTYPES)} (or unset it)")
        dtype = DTYPES[name]
        reason += f"; NANOCHAT_DTYPE={name}"
    # Compiling pays on every GPU (fused elementwise kernels, FlexAttention's sliding windows). On a CPU it pays
    # in native bf16, where it fuses the casts, softcap and loss (d4 step 1.3-1.6x faster); in fp32 it gains
    # 15-22%, about what its cold compile (1-1.5 min) costs a few-hundred-step CPU run (dev/LOG.md).
    compile = device_type == "cuda" or (fast_bf16 and dtype == torch.bfloat16)
    # Muon orthogonalizes in bf16 where that is fast; an fp32 run (say, to rule precision out) stays fp32 throughout.
    orth_dtype = torch.bfloat16 if fast_bf16 and dtype != torch.float32 else torch.float32
    return ComputeChoice(dtype=dtype, orth_dtype=orth_dtype, compile=compile, reason=reason)


def get_compute_dtype(device_type):
    """The one compute dtype of this run on device_type (see compute_choice)."""
    return compute_choice(device_type).dtype


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
    distributed run leaves its group safely however it ends (see below). A distributed run also checks
    that every rank sees the same base dir and gets the same attention backend, and stops at once if not.
    The device of a CUDA rank is its LOCAL_RANK (its GPU on its node); data and optimizer shards follow
    the global RANK.
    Returns (ddp, rank, local_rank, world_size, device).
    """
    sys.excepthook = _report_user_errors(sys.excepthook)
    # Read when CUDA's allocator starts, so set before anything touches the GPU: growing segments instead of
    # fixed-size blocks avoids the fragmentation that pushes d20 at 32 x 2048 tokens past 80 GB.
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu", "mps"):
        raise UserError(f"--device-type must be cuda, cpu or mps (or empty to autodetect), got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device-type=cuda but torch {torch.__version__} sees no CUDA GPU: check nvidia-smi and "
                        "re-run `bash runs/setup.sh` (it installs the torch build for this driver), or use --device-type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type=mps but MPS is not available; use --device-type=cpu")
    choice = compute_choice(device_type)  # (also rejects a bad NANOCHAT_DTYPE before any work starts)
    print0(f"Compute: {choice.dtype} (Muon orthogonalization {choice.orth_dtype}); {choice.reason}")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (an fp32 compute dtype) use TF32
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
    if ddp:
        check_base_dir_shared(rank)
        from nanochat import flash_attention  # (here: flash_attention imports this module)
        check_same_on_all_ranks("the attention backend", flash_attention.backend_name(device_type),
                                "every node needs the same GPU model and the same software; run `bash runs/setup.sh` "
                                "on each node (it installs `kernels` and caches the FA3 kernels)")
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return ddp, rank, local_rank, world_size, device


def _rank_ranges(ranks):
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    runs = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def check_same_on_all_ranks(what, value, fix):
    """Stop every rank, with one line saying which ranks have which value and how to fix it, unless all agree."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        ranks_of = {}
        for rank, v in enumerate(values):
            ranks_of.setdefault(v, []).append(rank)
        listing = "; ".join(f"{_rank_ranges(ranks)}: {v}" for v, ranks in ranks_of.items())
        raise UserError(f"The ranks of this run disagree on {what} ({listing}): {fix}")


def check_base_dir_shared(rank, patience=10.0):
    """
    Every rank reads what rank 0 writes in the base dir (the tokenizer, checkpoints, data), so on several nodes it
    must be one shared directory. Rank 0 writes a marker with a random name into it; every rank must see it
    (waiting up to `patience` seconds for a network filesystem), else every rank stops with one line.
    """
    base_dir = get_base_dir()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token)
    marker = os.path.join(base_dir, f".shared_check_{token[0]}")
    if rank == 0:
        try:
            atomic_write(marker, lambda f: f.write(token[0].encode()))
        except OSError as e:
            raise UserError(f"Cannot write in the base dir {base_dir} ({e}): set NANOCHAT_BASE_DIR to a writable "
                            "directory (shared by every node)") from e
    dist.barrier()
    deadline = time.monotonic() + patience
    while not _holds(marker, token[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (_holds(marker, token[0]), base_dir))  # (after it every rank has looked)
    if rank == 0:
        os.remove(marker)
    blind = [r for r, (sees, _) in enumerate(views) if not sees]
    if blind:
        their_dirs = ", ".join(sorted({views[r][1] for r in blind}))
        raise UserError(f"{_rank_ranges(blind).capitalize()} cannot see the files rank 0 writes in its base dir "
                        f"{views[0][1]} (theirs: {their_dirs}): the base dir must be shared storage that every node "
                        "mounts, so set NANOCHAT_BASE_DIR to one shared directory on every node")


def _holds(path, text):
    try:
        with open(path) as f:
            return f.read() == text
    except OSError:
        return False


def _report_user_errors(print_traceback):
    """An excepthook: a user error is one line (as argparse prints a bad flag), anything else a traceback."""
    def excepthook(exc_type, exc_value, exc_traceback):
        if issubclass(exc_type, USER_ERRORS):
            print(f"{os.path.basename(sys.argv[0])}: error: {exc_value}", file=sys.stderr)
        else:
            print_traceback(exc_type, exc_value, exc_traceback)
    return excepthook


def report_user_errors():
    """For scripts that need no device (the tokenizer's): user errors as one line, as compute_init arranges for the rest."""
    sys.excepthook = _report_user_errors(sys.excepthook)


# Tearing down a distributed run. The process group owns background threads (gloo's worker loops) that
# hold the last references to finished collectives and their tensors. If they are still alive when the
# interpreter finalizes, a worker that drops such a tensor needs the GIL, is told to exit instead, and
# the C++ runtime aborts the process: SIGABRT, "terminate called without an active exception", after
# all the work was done. So the group must be destroyed, and its threads joined, while the interpreter
# is whole, on every way out: compute_cleanup() at the normal end, _leave_process_group at any other.

def is_distributed():
    """True in a process that joined a torchrun process group (compute_init does)."""
    return dist.is_available() and dist.is_initialized()


def _leave_process_group():
    """
    atexit of a distributed run. After a clean exit that skipped compute_cleanup (sys.exit, parser.error),
    leave the group. After an uncaught error (printed by now), leave the process at once with status 1:
    tearing down could wait forever on a collective that the other ranks never join, and finalizing with
    the group alive aborts, which hides the real error. torchrun then stops the other ranks.
    """
    if not is_distributed():
        return
    if getattr(sys, "last_value", None) is not None:  # set when an uncaught exception was reported
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def compute_cleanup():
    """The normal end of a run: wait until every rank is done with its collectives, then leave the group."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Numbers (counts, sums) summed over all ranks -> a list of floats; float64 is exact for counts (MPS has no
    float64: float32 there, exact below 2**24)."""
    tensor = torch.tensor(values, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


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


# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets. A row matches
# when every word of its name is a word of the device name (so "L4" never matches an "L40", nor "A10" an
# "A10G"), and the first matching row wins: variants come before their base name.
_PEAK_FLOPS = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),  # (H100 without a variant: SXM)
    ("H200 NVL", 835e12), ("H200", 989e12),
    ("H800 PCIe", 756e12), ("H800", 989e12),
    ("GH200", 989e12), ("H20", 148e12),
    ("GB300", 2.5e15), ("B300", 2.25e15), ("GB200", 2.5e15), ("B200", 2.25e15),
    ("A100", 312e12), ("A800", 312e12), ("A40", 149.7e12), ("A30", 165e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 6000 Ada", 364e12), ("RTX A6000", 154.8e12), ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
    ("MI300X", 1307.4e12),
]


def get_peak_flops(device_name):
    """bf16 dense peak FLOP/s for a GPU name; unknown -> inf (MFU is then not shown rather than wrong)."""
    words = set(device_name.upper().replace("-", " ").split())
    for name, flops in _PEAK_FLOPS:
        if set(name.upper().split()) <= words:
            return flops
    logger.warning(f"Unknown peak FLOPs for device {device_name!r}: MFU is not shown")
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


def progress_bar(total, desc):
    """
    A tqdm bar (call .update(n), then .close()) for work that may take more than a few seconds, on rank 0 only.
    On a terminal it redraws in place and vanishes when done; in a log file it adds a line at most every 30 s,
    so a long evaluation shows its rate and ETA without flooding the log of a run that evaluates often.
    """
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=int(os.environ.get("RANK", 0)) != 0,
                mininterval=0.5 if sys.stderr.isatty() else 30)


# -----------------------------------------------------------------------------
# Files are written whole or not at all: to a hidden temp name beside the final one, then renamed over it.
# The temp name says who writes it, so a later start can remove what a killed writer left (a big
# checkpoint leaves a temp file as big as itself per kill; a download, a part of a shard).

TEMP_FILE_RE = re.compile(r"^\..+\.(?P<host>\w+)-(?P<pid>\d+)\.\w+\.tmp$")


def _host():
    return re.sub(r"\W", "_", socket.gethostname())


def temp_path(path):
    """.<name>.<host>-<pid>.<thread>.tmp beside path: hidden, and no glob of final names (*.pt, *.parquet) matches it."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{_host()}-{os.getpid()}.{threading.get_ident()}.tmp")


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def remove_temp_files(directory, stale_only=True):
    """
    Remove the temp files and folders (temp_path) in directory whose writer is gone: written on this host
    by a process that no longer exists; with stale_only=False also this process's own (a write it gave up).
    Another live process's (a rank saving right now) and other hosts' (nodes sharing the disk) stay.
    """
    if not os.path.isdir(directory):
        return
    host = _host()
    for name in os.listdir(directory):
        match = TEMP_FILE_RE.match(name)
        if not match or match["host"] != host:
            continue
        pid = int(match["pid"])
        if (pid == os.getpid() and not stale_only) or (pid != os.getpid() and not _process_alive(pid)):
            path = os.path.join(directory, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                logger.info(f"Removed {name} from {directory}, left by an interrupted write")
            except OSError:
                pass  # another rank removed it first, or the directory is read-only: nothing to do


def _fsync_dir(path):
    """Make a rename durable: the directory entry itself must reach the disk (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write_fn):
    """Call write_fn(binary_file) on temp_path(path), fsync it, then rename it over path: path is whole or untouched."""
    tmp_path = temp_path(path)
    try:
        with open(tmp_path, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(os.path.dirname(path) or ".")
