"""
Several nodes, played on this machine: two torchrun launchers of two ranks each, joined over loopback
(static rendezvous at 127.0.0.1). Global ranks 2 and 3 are local ranks 0 and 1 of the second node, so
anything that took LOCAL_RANK where it needs RANK (data and optimizer shards) gives wrong results here.
"""
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO_ROOT, TEST_DATA, run_torchrun


def run_two_nodes(*args, envs=(None, None), timeout=300):
    """-> [(exit status, output) of node 0, of node 1]: `torchrun --nnodes=2 --nproc_per_node=2 *args` on each."""
    with socket.socket() as s:  # a free port for node 0's rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def node(rank):
        rendezvous = ("--nnodes=2", f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}")
        return run_torchrun(*args, env=envs[rank], timeout=timeout, rendezvous=rendezvous)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(node, (0, 1)))


@pytest.mark.slow
def test_optimizer_on_two_nodes_matches_one_process(tmp_path):
    """DistMuonAdamW over 4 ranks on 2 nodes == MuonAdamW in one process; per-rank state files resume exactly."""
    nodes = run_two_nodes(REPO_ROOT / "tests" / "dist_optim_check.py", tmp_path)
    for returncode, output in nodes:
        assert returncode == 0, output
        assert output.count("resume from per-rank state is exact") == 2, output
    (_, first), (_, second) = nodes
    assert "rank 0 (local rank 0) of 4:" in first and "rank 1 (local rank 1) of 4:" in first, first
    assert "rank 2 (local rank 0) of 4:" in second and "rank 3 (local rank 1) of 4:" in second, second
    assert sorted(os.listdir(tmp_path)) == [f"optim_rank{r}.pt" for r in range(4)]


@pytest.mark.slow
def test_loader_on_two_nodes_shards_by_global_rank(tiny_tokenizer, tmp_path):
    """Four ranks read disjoint row groups and documents; each one's batch is the single-process one for its RANK."""
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    env = {"NANOCHAT_DATA_DIR": str(TEST_DATA)}
    nodes = run_two_nodes(REPO_ROOT / "tests" / "dist_loader_check.py", tmp_path / "tokenizer", envs=(env, env))
    for returncode, output in nodes:
        assert returncode == 0, output
    assert "rank 0 ok: 4 ranks (local ranks [0, 1, 0, 1])" in nodes[0][1], nodes[0][1]


STARTS = """
from nanochat.common import compute_init, compute_cleanup
_, rank, _, _, _ = compute_init("cpu")
print(f"rank {rank} started", flush=True)
compute_cleanup()
"""


@pytest.mark.slow
def test_base_dir_not_shared_between_nodes_stops_at_start(tmp_path):
    """Each node with a base dir of its own: every rank stops in compute_init with the one line that says so."""
    script = tmp_path / "starts.py"
    script.write_text(STARTS)
    envs = [{"NANOCHAT_BASE_DIR": str(tmp_path / f"node{n}_base")} for n in (0, 1)]
    nodes = run_two_nodes(script, envs=envs, timeout=180)
    line = (f"starts.py: error: Ranks 2-3 cannot see the files rank 0 writes in its base dir {tmp_path / 'node0_base'} "
            f"(theirs: {tmp_path / 'node1_base'}): the base dir must be shared storage that every node mounts, so set "
            "NANOCHAT_BASE_DIR to one shared directory on every node")
    for returncode, output in nodes:
        assert returncode != 0, output
        assert output.count(line) == 2 and "started" not in output and "]: Traceback" not in output, output
    assert os.listdir(tmp_path / "node0_base") == []  # rank 0 took its marker away again
