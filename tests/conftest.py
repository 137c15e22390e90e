"""
Shared fixtures: the data tree the tests read, a small trained tokenizer, an isolated data environment, a file
server, one torch thread, and the one way tests launch several ranks (run_torchrun).
"""
import collections
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch.overrides import TorchFunctionMode

# Numerical tests compare against fp32 references, and should not depend on whether this CPU runs bf16
# natively: fp32 unless the caller says otherwise. Tests of the bf16/fp16 paths ask for them explicitly.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The data tree the tests read: the embedded sample in the repo's data/, or $NANOCHAT_TEST_DATA.
TEST_DATA = Path(os.environ.get("NANOCHAT_TEST_DATA") or REPO_ROOT / "data")
# The full local data tree, beside the repo on our machines and in CI ($NANOCHAT_SHARED_DATA overrides
# it), for the few tests that need more than the embedded sample: they skip without it.
SHARED_DATA = Path(os.environ.get("NANOCHAT_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs the full data tree {SHARED_DATA}")


def pytest_configure(config):
    if not (TEST_DATA / "pretrain").is_dir():
        raise pytest.UsageError(f"NANOCHAT_TEST_DATA={TEST_DATA} is not a data tree (pretrain/, eval_bundle/, chat/, "
                                "words/): point it at one, or unset it to test with the repo's data/")


def pretrain_texts(max_chars=2_000_000, shard=0):
    """Documents from one of the test data's pretraining shards (real Wikipedia text); shard=-1 is val."""
    path = sorted((TEST_DATA / "pretrain").glob("shard_*.parquet"))[shard]
    total = 0
    for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
        if total >= max_chars:
            break
        total += len(text)
        yield text


def run_torchrun(*args, nproc=2, env=None, timeout=300, rendezvous=("--standalone",)):
    """
    -> (exit status, stdout and stderr together) of `torchrun --standalone --nproc_per_node=nproc *args` (a script
    and its arguments, or "-m", a module and its arguments) run from the repo root with one thread per rank and
    `env` on top of ours. On a timeout the launcher, which stops its ranks, is stopped and the timeout raised.
    rendezvous: the launcher flags that replace --standalone (one node of several: --nnodes, --node-rank, ...).
    """
    # the repo and tests/ importable, as in the tests: a worker can take its models from helpers.py
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", **(env or {})}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous,
                                 f"--nproc_per_node={nproc}", *map(str, args)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.terminate()  # torchrun then stops its ranks (each runs in its own session: killing it would not)
        launcher.communicate(timeout=60)
        raise
    return launcher.returncode, output


@pytest.fixture(params=["bwrap", "guard"])
def isolation(request, monkeypatch):
    """The code-execution tests run twice: inside bubblewrap (skipped where it cannot run) and under the guard alone."""
    from nanochat.execution import bubblewrap_works
    if request.param == "bwrap" and not bubblewrap_works():
        pytest.skip("bubblewrap is not installed here or cannot create namespaces (see the warning logged)")
    monkeypatch.setenv("NANOCHAT_NO_BWRAP", "1" if request.param == "guard" else "0")
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread: with two, the sync overhead dominates (and explodes when the
    machine's cores are shared). Modules of tiny-model tests use it: pytestmark = usefixtures("one_torch_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 1024-token BPE tokenizer trained on ~2M chars of the first shard (a few seconds)."""
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(pretrain_texts(), vocab_size=1024)


@pytest.fixture(autouse=True)
def isolated_data_env(tmp_path_factory, monkeypatch):
    """
    Every test starts with an empty NANOCHAT_BASE_DIR of its own (outside its tmp_path) and no data
    settings from the shell (NANOCHAT_DATA_DIR, NANOCHAT_DATA): a test that needs data says which tree.
    Subprocesses inherit this.
    """
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    base = tmp_path_factory.mktemp("nanochat_base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture(autouse=True)
def keep_excepthook(monkeypatch):
    """A stage's main() called in-process and ending in an error leaves compute_init's excepthook installed (a
    real process needs it to report the error): put the original back after every test."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


@pytest.fixture
def base_dir(isolated_data_env):
    """The test's own empty NANOCHAT_BASE_DIR."""
    return isolated_data_env


class FileServer:
    """Serves files {name: bytes} over HTTP on 127.0.0.1 (404 for others); some names misbehave on purpose."""

    def __init__(self, files, dest=None, stall_seconds=3):
        self.files, self.dest = files, dest  # dest: where the client writes, checked while a transfer is cut
        self.requests = collections.Counter()
        self.drop_first, self.drop_always, self.stall = set(), set(), set()
        self.stall_seconds, self.release = stall_seconds, threading.Event()  # a stall ends early on exit
        self.final_name_present_during_partial = []  # checked while a partial file is being received
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                drop = name in server.drop_always or (name in server.drop_first and server.requests[name] == 1)
                if drop or name in server.stall:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    time.sleep(0.2)  # let the client write what it got
                    if server.dest is not None:
                        server.final_name_present_during_partial.append(os.path.exists(os.path.join(server.dest, name)))
                    if name in server.stall:
                        server.release.wait(server.stall_seconds)
                    return  # HTTP/1.0: the connection closes here, mid-file
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data"  # nothing listens there: connection refused


class CountHostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (.item(), .tolist(), int(t), ...): on CUDA each one is a GPU sync."""
    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"}

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))
