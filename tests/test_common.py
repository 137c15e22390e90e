"""
nanochat/common.py: a distributed run tears down in a safe order on every way out. Each case runs
for real under torchrun (2 ranks, gloo on CPU).
"""
import os
import re
import time

import pytest

from conftest import run_torchrun


def run_script_torchrun(tmp_path, script):
    """The timeout only guards against a hang: starting two ranks takes from seconds to a minute on a busy machine."""
    path = tmp_path / "worker.py"
    path.write_text(script)
    return run_torchrun(path, timeout=300)


# Creating an optimizer imports torch._dynamo, which imports torch.distributed.nn: imported after the
# group exists, that module kept the group (and gloo's worker threads) alive past destroy_process_group,
# and the threads could then abort the process at interpreter exit.
GLOO_THREADS_SCRIPT = """
import os
import torch, torch.distributed as dist
from nanochat.common import compute_init, compute_cleanup

def gloo_threads():
    names = [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
    return sorted(name for name in names if "gloo" in name)

ddp, rank, _, world_size, device = compute_init("cpu")
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
gathered = [torch.empty(4) for _ in range(world_size)]
dist.all_gather(gathered, torch.full((4,), float(rank)))
assert [g[0].item() for g in gathered] == [0.0, 1.0]
assert gloo_threads(), "expected gloo threads while the group is alive"
compute_cleanup()
print(f"rank {rank} gloo threads after cleanup: {gloo_threads()}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux /proc")
def test_cleanup_joins_the_process_group_threads(tmp_path):
    returncode, output = run_script_torchrun(tmp_path, GLOO_THREADS_SCRIPT)
    assert returncode == 0, output
    for rank in (0, 1):
        assert f"rank {rank} gloo threads after cleanup: []" in output, output


# Rank 1 fails while a collective it started waits for rank 0, which never joins it. Tearing down would
# wait for that collective (until gloo's 30-minute timeout); the failing rank must leave at once. "At once"
# is timed from the error, not from the launch: starting the ranks alone can take a minute on a busy machine.
FAILING_RANK_SCRIPT = """
import time
import torch, torch.distributed as dist
from nanochat.common import compute_init, compute_cleanup
ddp, rank, _, world_size, device = compute_init("cpu")
if rank == 1:
    pending = dist.all_reduce(torch.ones(4), async_op=True)
    print(f"rank 1 raises at {time.time()}", flush=True)
    raise RuntimeError("boom on rank 1")
dist.barrier()
compute_cleanup()
"""


@pytest.mark.slow
def test_failing_rank_exits_at_once_with_its_error(tmp_path):
    returncode, output = run_script_torchrun(tmp_path, FAILING_RANK_SCRIPT)
    raised = re.search(r"rank 1 raises at ([\d.]+)", output)
    assert raised, output
    assert time.time() - float(raised.group(1)) < 60, output  # (a hang lasts 30 minutes; the exit takes seconds)
    assert returncode != 0
    assert "[rank1]: RuntimeError: boom on rank 1" in output, output
    assert "exitcode  : 1" in output and "SIGABRT" not in output, output


# A clean exit that skips compute_cleanup (sys.exit, argparse errors) leaves the group through atexit.
# atexit runs its hooks last-in first-out, so a hook registered before compute_init runs after its own.
EXIT_SCRIPT = """
import atexit, os, sys
import torch, torch.distributed as dist
from nanochat.common import compute_init

def report_gloo_threads():
    names = [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
    print(f"rank {rank} gloo threads at exit: {sorted(n for n in names if 'gloo' in n)}", flush=True)

atexit.register(report_gloo_threads)
ddp, rank, _, world_size, device = compute_init("cpu")
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
dist.all_reduce(torch.ones(4))
sys.exit(0)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux /proc")
def test_sys_exit_leaves_the_group_cleanly(tmp_path):
    returncode, output = run_script_torchrun(tmp_path, EXIT_SCRIPT)
    assert returncode == 0, output
    for rank in (0, 1):
        assert f"rank {rank} gloo threads at exit: []" in output, output


# Every rank must use the same attention backend (a node without the FA3 kernels, or with another GPU, would
# compute attention differently from the rest): rank 1 is forced onto another one here.
BACKEND_SCRIPT = """
import os
from nanochat import flash_attention
from nanochat.common import compute_init, compute_cleanup
if os.environ["RANK"] == "1":
    flash_attention._override_impl = "flex"
compute_init("cpu")
print("started", flush=True)
compute_cleanup()
"""


@pytest.mark.slow
def test_ranks_with_different_attention_backends_stop_at_start(tmp_path):
    returncode, output = run_script_torchrun(tmp_path, BACKEND_SCRIPT)
    assert returncode != 0 and "started" not in output, output
    line = ("worker.py: error: The ranks of this run disagree on the attention backend (rank 0: sdpa; rank 1: flex): "
            "every node needs the same GPU model and the same software")
    assert output.count(line) == 2 and "]: Traceback" not in output, output  # (no rank's traceback; the launcher's is fine)


def test_rank_ranges():
    from nanochat.common import _rank_ranges
    assert _rank_ranges([3]) == "rank 3"
    assert _rank_ranges([0, 1, 2, 5, 7, 8]) == "ranks 0-2, 5, 7-8"
