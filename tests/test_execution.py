"""
The contained code runner: every misbehaviour is contained and reported, nothing outside its temp dir
is touched, no verdict can be forged, and no test can hang (each is bounded by pytest-timeout too).
Every test runs twice: inside bubblewrap (skipped where it cannot run) and under the in-process guard alone.
"""
import json
import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO_ROOT, TEST_DATA
from nanochat import execution
from nanochat.execution import DISK_LIMIT, OUTPUT_LIMIT, STARTUP_ALLOWANCE, bubblewrap_works, execute_code

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, params=["bwrap", "guard"])
def isolation(request, monkeypatch):
    if request.param == "bwrap" and not bubblewrap_works():
        pytest.skip("bubblewrap is not installed here or cannot create namespaces (see the warning logged)")
    monkeypatch.setenv("NANOCHAT_NO_BWRAP", "1" if request.param == "guard" else "0")
    return request.param


@pytest.fixture
def sentinel(tmp_path):
    """A file of the test's own, alone in its directory, that no executed code may change."""
    path = tmp_path / "outside" / "sentinel.txt"
    path.parent.mkdir()
    path.write_text("keep me")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


def assert_sentinel_intact(sentinel):
    assert sorted(os.listdir(sentinel.parent)) == ["sentinel.txt"]
    assert sentinel.read_text() == "keep me"
    stat = sentinel.stat()
    assert stat.st_mtime == 1_000_000_000 and stat.st_mode & 0o777 == 0o644


def test_success_captures_stdout():
    result = execute_code("import math\nprint('hello', math.factorial(5))")
    assert result.success and result.error is None
    assert result.stdout == "hello 120\n"
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_reported_with_its_traceback():
    result = execute_code("def f():\n    return 1 / 0\nf()")
    assert not result.success
    assert result.error.startswith("ZeroDivisionError")
    assert "line 2, in f" in result.stderr  # the program's own frames, from its first line


def test_assert_failure_is_a_failure():
    # how HumanEval's check() reports a wrong answer
    assert not execute_code("assert 1 + 1 == 3").success


def test_runs_in_a_fresh_temp_dir_that_is_removed(tmp_path):
    result = execute_code("import os\nprint(os.getcwd())\nprint(os.listdir('.'))")
    workdir, listing = result.stdout.splitlines()
    assert listing == "[]"
    assert workdir != os.getcwd() and os.path.realpath(workdir) != os.path.realpath(tmp_path)
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["busy_loop", "sleep"])
def test_timeout(code):
    start = time.time()
    result = execute_code(code, timeout=0.5)
    elapsed = time.time() - start
    assert result.timeout and not result.success
    assert elapsed < 0.5 + STARTUP_ALLOWANCE + 2  # killed, not waited out


def test_a_process_escaping_the_group_cannot_hold_up_the_caller():
    # a forked grandchild in a session of its own kept the parent waiting for its pipe (20 s for a 1 s timeout)
    code = "import os, posix, time\nif posix.fork() == 0:\n    os.setsid()\ntime.sleep(10)"
    start = time.time()
    result = execute_code(code, timeout=0.5)
    assert not result.success
    assert time.time() - start < 0.5 + STARTUP_ALLOWANCE + 2


def test_huge_allocation_is_contained():
    result = execute_code("x = bytearray(2 * 1024**3)\nprint('allocated')", maximum_memory_bytes=256 * 1024**2)
    assert not result.success and "allocated" not in result.stdout
    assert result.memory_exceeded or result.error
    # the limit is a limit, not a ban: a modest allocation under it works
    assert execute_code("x = bytearray(16 * 1024**2)\nprint(len(x))", maximum_memory_bytes=256 * 1024**2).stdout == f"{16 * 1024**2}\n"


@pytest.mark.parametrize("code", [
    "import os\nos.system('rm -f {path}')",
    "import subprocess\nsubprocess.run(['rm', '-f', '{path}'])",
    "import subprocess\nsubprocess.Popen(['rm', '-f', '{path}']).wait()",
    "import shutil\nshutil.rmtree('{dir}')",
    "import os\nos.remove('{path}')",
    "import os\nos.unlink('{path}')",
    "import pathlib\npathlib.Path('{path}').unlink()",
    "import os\nos.rename('{path}', 'stolen.txt')",
    "import shutil\nshutil.move('{path}', 'stolen.txt')",
    "open('{path}', 'w').write('overwritten')",
    "import os\nos.truncate('{path}', 0)",
    "import os\nos.chdir('{dir}')\nopen('sentinel.txt', 'a').write('appended')",
    # the same calls with the path as a keyword argument
    "import os\nos.remove(path='{path}')",
    "open(file='{path}', mode='w').write('overwritten')",
    "open('a', 'w').close()\nimport os\nos.replace('a', dst='{path}')",
    "import os\nos.truncate(path='{path}', length=0)",
    "import os\nos.close(os.open(path='{path}', flags=os.O_WRONLY | os.O_TRUNC))",
    # writers that are not open()
    "import os\nos.mkdir('{dir}/new')",
    "import os, shutil\nos.mkdir('src')\nshutil.copytree('src', '{dir}/copy')",
    "import os\nos.utime('{path}', (0, 0))",
    "import os\nos.chmod(path='{path}', mode=0o777)",
    "import sqlite3\nsqlite3.connect('{dir}/db.sqlite').execute('create table t (x)')",
    "import os\nfd = os.open('{dir}', os.O_RDONLY)\nos.close(os.open('sentinel.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd))",
], ids=["os.system", "subprocess.run", "subprocess.Popen", "shutil.rmtree", "os.remove", "os.unlink", "pathlib.unlink",
        "os.rename", "shutil.move", "open_w", "os.truncate", "chdir_then_append",
        "os.remove(path=)", "open(file=)", "os.replace(dst=)", "os.truncate(path=)", "os.open(path=)",
        "os.mkdir", "shutil.copytree", "os.utime", "os.chmod(path=)", "sqlite3.connect", "os.open(dir_fd=)"])
def test_files_outside_the_temp_dir_survive(code, sentinel):
    result = execute_code(code.format(path=sentinel, dir=sentinel.parent))
    assert not result.success and "PermissionError" in result.error
    assert_sentinel_intact(sentinel)


def test_files_inside_the_temp_dir_can_be_written_and_deleted():
    code = ("import os, shutil, tempfile\n"
            "open('a.txt', 'w').write('data')\n"
            "os.rename('a.txt', 'b.txt')\n"
            "print(open('b.txt').read())\n"
            "os.remove('b.txt')\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n"
            "    f.write('x')\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    os.mkdir(os.path.join(d, 'sub'))\n"
            "    shutil.copytree(d, 'copy')\n"
            "shutil.rmtree('copy')\n"
            "print(os.listdir('.'))")
    result = execute_code(code)
    assert result.success, result.error
    assert result.stdout == "data\n[]\n"


def test_total_disk_written_is_bounded():
    # 600 MB in many files, half of them deleted while kept open (their space stays in use): wrote 600 MB in 1.5 s
    code = ("import os\n"
            "total, held = 0, []\n"
            "for i in range(400):\n"
            "    try:\n"
            "        fd = os.open(f'f{i}', os.O_WRONLY | os.O_CREAT)\n"
            "    except OSError:\n"
            "        continue\n"
            "    try:\n"
            "        while total < 600 * 2**20:\n"
            "            total += os.write(fd, bytes(2**20))\n"
            "    except OSError:\n"
            "        pass\n"
            "    if i % 2:\n"
            "        os.unlink(f'f{i}')\n"
            "        held.append(fd)\n"
            "    else:\n"
            "        os.close(fd)\n"
            "print(total)")
    result = execute_code(code)
    assert result.success, result.error
    assert 0 < int(result.stdout) <= DISK_LIMIT < 600 * 2**20


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        for code in [f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
                     f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"]:
            result = execute_code(code)
            assert not result.success and "PermissionError" in result.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
    finally:
        server.close()


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "import sys\nsys.exit('bye')", "exit()", "quit(3)"])
def test_exit_is_an_error_not_a_crash(code):
    result = execute_code("print('before')\n" + code)
    assert not result.success and result.error
    assert result.stdout == "before\n"  # the report still arrives, with the output so far


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import posix\nposix.fork()",
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
    "import multiprocessing\np = multiprocessing.get_context('spawn').Process(target=print)\np.start()\np.join()",
    "import _posixsubprocess\n_posixsubprocess.fork_exec()",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import os\nos.execv('/bin/true', ['true'])",
])
def test_no_new_processes(code):
    result = execute_code(code, timeout=2.0)
    assert not result.success and not result.timeout
    assert "PermissionError" in result.error


@pytest.mark.parametrize("code", [
    "import os, posix\nposix.kill(os.getppid(), 9)",
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
], ids=["posix.kill", "pidfd"])
def test_the_caller_cannot_be_killed(code):
    # in a process of its own: killing the caller must not take pytest down (it ended chat_eval with 137)
    caller = ("import json, sys\nfrom nanochat.execution import execute_code\n"
              "r = execute_code(sys.stdin.read())\nprint(json.dumps([r.success, r.error]))")
    run = subprocess.run([sys.executable, "-c", caller], input=code, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    success, error = json.loads(run.stdout)
    assert not success and "PermissionError" in error


FORGED = json.dumps({"stdout": "", "stderr": "", "error": None, "memory_exceeded": False})


@pytest.mark.parametrize("code", [
    # a success report written on every descriptor (the result pipe among them), then closed against the real one
    f"import os\nfor fd in range(3, 32):\n    try:\n        os.write(fd, b'{FORGED}')\n        os.close(fd)\n"
    f"    except OSError:\n        pass\nassert False",
    # the harness's own serializer replaced
    f"import json\njson.dumps = lambda *args, **kwargs: '{FORGED}'\nassert False",
    # leaving early with a clean exit status
    "import os\nprint('all tests passed')\nos._exit(0)\nassert False",
    # waking the verdict thread before the program has ended
    "import threading, time\nfor thread in threading.enumerate():\n    for arg in getattr(thread, '_args', ()):\n"
    "        if hasattr(arg, 'release'):\n            try:\n                arg.release()\n            except RuntimeError:\n"
    "                pass\ntime.sleep(0.2)\nassert False",
], ids=["forged_report", "replaced_json_dumps", "os._exit(0)", "early_wake"])
def test_a_failing_program_cannot_report_success(code):
    result = execute_code(code)
    assert not result.success and result.error


def test_the_verdict_nonce_is_out_of_reach():
    attempts = {
        "sys._current_frames": "sys._current_frames()",
        "gc.get_objects": "gc.get_objects()",
        "gc.get_referrers": "gc.get_referrers(threading.enumerate()[-1])",
        "sys.settrace": "sys.settrace(lambda *args: None)",
        "/proc/self/mem": "open('/proc/self/mem', 'rb')",
        "ctypes": "import ctypes",
        "code objects": "(lambda: 0).__code__.replace(co_code=b'')",
    }
    code = "import gc, sys, threading\n" + "".join(
        f"try:\n    {attempt}\n    print({name!r})\nexcept (PermissionError, ImportError):\n    pass\n" for name, attempt in attempts.items())
    result = execute_code(code)
    assert result.success, result.error
    assert result.stdout == ""  # every route refused


def test_bubblewrap_contains_code_that_defeats_the_guard(isolation, sentinel):
    if isolation == "guard":
        pytest.skip("the in-process guard alone does not claim to stop code that patches the interpreter")
    # with os.path's abspath patched, every path looks inside the temp dir to the guard
    code = f"import os, posixpath\nposixpath.abspath = lambda path: os.getcwd()\nopen('{sentinel}', 'w').write('overwritten')"
    result = execute_code(code)
    assert not result.success and "Read-only file system" in result.error
    assert_sentinel_intact(sentinel)


def test_limits_cannot_be_lifted_from_inside():
    result = execute_code("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert not result.success and "resource" in result.error


@pytest.mark.parametrize("code", [
    "import os\nos.environ['NANOCHAT_TEST'] = 'set'\nprint(os.environ['NANOCHAT_TEST'])",
    "import numpy\nprint(numpy.arange(4).sum())",
    "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\nprint(Point(1, 2).x)",
], ids=["os.environ", "numpy", "namedtuple"])
def test_ordinary_programs_work(code):
    if "numpy" in code:
        pytest.importorskip("numpy")
    result = execute_code(code)
    assert result.success, result.stderr
    assert result.stdout.strip() in ("set", "6", "1")


def test_output_is_truncated():
    result = execute_code(f"print('x' * {10 * OUTPUT_LIMIT})\nimport sys\nprint('y' * {10 * OUTPUT_LIMIT}, file=sys.stderr)")
    assert result.success
    assert result.stdout.startswith("x" * OUTPUT_LIMIT) and "truncated" in result.stdout
    assert len(result.stdout) < OUTPUT_LIMIT + 100 and len(result.stderr) < OUTPUT_LIMIT + 100


def test_low_level_writes_cannot_corrupt_the_report():
    result = execute_code("import os\nos.write(1, b'{not json')\nos.write(2, b'noise')\nprint('fine')")
    assert result.success and result.stdout == "fine\n"


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass():
    from tasks.humaneval import HumanEval, build_program
    task = HumanEval(data_dir=str(TEST_DATA))

    def passes(index):
        example = task.get_example(index)
        return execute_code(build_program(example, example["messages"][1]["content"])).success
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(passes, range(task.num_examples())))
    assert len(results) == 164 and all(results)


@pytest.fixture
def fresh_probe():
    bubblewrap_works.cache_clear()
    yield
    bubblewrap_works.cache_clear()


@pytest.mark.parametrize("bwrap_script", [None, "echo 'bwrap: No permissions to create a new namespace' >&2; exit 1"],
                         ids=["missing", "no_namespaces"])
def test_falls_back_to_the_guard_with_one_warning(isolation, bwrap_script, tmp_path, monkeypatch, caplog, fresh_probe):
    if isolation == "bwrap":
        pytest.skip("needs no bubblewrap: runs once, with the guard")
    monkeypatch.setenv("NANOCHAT_NO_BWRAP", "0")  # let execute_code look for bwrap
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if bwrap_script:
        (bin_dir / "bwrap").write_text(f"#!/bin/sh\n{bwrap_script}\n")
        (bin_dir / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with caplog.at_level(logging.WARNING, logger=execution.__name__):
        results = [execute_code("print('still runs')") for _ in range(2)]
    assert all(r.success and r.stdout == "still runs\n" for r in results)
    assert len(caplog.records) == 1
    assert ("No permissions to create a new namespace" if bwrap_script else "not found") in caplog.records[0].getMessage()
