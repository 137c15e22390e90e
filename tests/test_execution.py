"""
The contained code runner as a program sees it: every misbehaviour is contained and reported, nothing
outside its temp dir is touched, a function passes its tests only by answering them, and no test can
hang (each is bounded by pytest-timeout too). Every test runs twice: inside bubblewrap (skipped where it
cannot run) and without it. The attacker's corpus is tests/test_execution_attacks.py.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TEST_DATA
from nanochat import execution
from nanochat.execution import DISK_LIMIT, OUTPUT_LIMIT, STARTUP_ALLOWANCE, bubblewrap_works, execute_code

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("isolation")]  # each test in both layers


@pytest.fixture
def sentinel(tmp_path):
    """A file of the test's own, alone in its directory, that no executed code may change. Not in /tmp when
    /var/tmp can take it: bubblewrap gives the code a /tmp of its own, where the file would simply be absent."""
    parent = Path(tempfile.mkdtemp(dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else tmp_path))
    path = parent / "outside" / "sentinel.txt"
    path.parent.mkdir()
    path.write_text("keep me")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    yield path
    shutil.rmtree(parent)


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
    # refused by the guard, or by the kernel: Landlock (PermissionError), bubblewrap's read-only mount
    assert not result.success and ("PermissionError" in result.error or "Read-only file system" in result.error)
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


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "import sys\nsys.exit('bye')", "exit()", "quit(3)", "import os\nos._exit(0)"])
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


def test_low_level_writes_are_output_not_reports():
    result = execute_code("import os\nos.write(1, b'{not json')\nos.write(2, b'noise')\nprint('fine')")
    assert result.success
    assert result.stdout == "{not jsonfine\n" and result.stderr == "noise"


@pytest.mark.slow
@pytest.mark.timeout(600)  # 164 problems, three interpreters each: about 40 s on 2 loaded cores
def test_humaneval_canonical_solutions_pass():
    from tasks.humaneval import HumanEval, program_and_tests
    task = HumanEval(data_dir=str(TEST_DATA))

    def passes(index):
        example = task.get_example(index)
        program, tests = program_and_tests(example, example["messages"][1]["content"])
        return execute_code(program, timeout=10.0, tests=tests, entry_point=example["entry_point"]).success
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(passes, range(task.num_examples())))
    assert len(results) == 164 and all(results)


# ------------------------------------------------------------------------------------------------
# A function judged by tests that run in a process of their own

ECHO = "def echo(*args, **kwargs):\n    return [args, kwargs]\n"


def test_tests_call_the_function_with_plain_data():
    values = [None, True, 0, -3, 2**80, 1.5, float("inf"), "text \u00e9\\n\"", b"\x00\xff", 1 + 2j, [1, [2]], (1, (2,)),
              {"a": 1, 2: (3,), (4, 5): None}, {1, 2}, frozenset({"x"})]
    tests = (f"inf = float('inf')\nVALUES = {values!r}\n"
             "def check(candidate):\n"
             "    args, kwargs = candidate(*VALUES, key=VALUES)\n"
             "    assert [type(v) for v in args] == [type(v) for v in VALUES] and args == tuple(VALUES)\n"
             "    assert kwargs == {'key': VALUES} and type(kwargs['key'][11]) is tuple\n"
             "    assert echo(1) == [(1,), {}]\n")  # the function's own name, in the tests, calls the program's too
    result = execute_code(ECHO, tests=tests, entry_point="echo")
    assert result.success, result.stderr


@pytest.mark.parametrize("program, error", [
    ("def f(x):\n    return x + 1\n", "AssertionError"),
    ("def f(x):\n    return 1 / 0\n", "ProgramError: the program raised ZeroDivisionError: division by zero"),
    ("def f(x):\n    return (i for i in [x])\n", "cannot pass between the program and its tests"),
    ("class Equal:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Equal()\n", "plain data only"),
    ("def f(x):\n    import sys\n    sys.exit(0)\n", "SystemExit"),
    ("def g(x):\n    return x\n", "AttributeError"),
    ("def f(x):\n    return x\nraise ValueError('at import')\n", "the program failed: ValueError: at import"),
    ("def f(x) return x", "the program failed: SyntaxError"),
], ids=["wrong", "raises", "generator", "always_equal", "exit", "no_entry_point", "import_fails", "syntax_error"])
def test_a_function_passes_only_by_answering_right(program, error):
    result = execute_code(program, tests="def check(candidate):\n    assert candidate(1) == 1\n", entry_point="f")
    assert not result.success and not result.timeout
    assert error in result.error


def test_a_program_that_fails_to_load_fails_even_vacuous_tests():
    result = execute_code("def f():\n    pass\nassert False\n", tests="def check(candidate):\n    pass\n", entry_point="f")
    assert not result.success and result.error == "the program failed: AssertionError"


def test_the_function_s_output_and_the_tests_failure_are_reported():
    program = "def f(x):\n    print('called with', x)\n    return x\n"
    result = execute_code(program, tests="def check(candidate):\n    assert candidate(1) == 2, 'one is not two'\n", entry_point="f")
    assert not result.success and result.error == "AssertionError: one is not two"
    assert result.stdout == "called with 1\n"
    assert 'File "<tests>", line 2, in check' in result.stderr and "assert candidate(1) == 2" in result.stderr


def test_a_hanging_function_times_out():
    start = time.time()
    result = execute_code("def f(x):\n    while True:\n        pass\n", timeout=1.0,
                          tests="def check(candidate):\n    candidate(1)\n", entry_point="f")
    assert not result.success and result.timeout
    assert time.time() - start < 1.0 + STARTUP_ALLOWANCE + 5


def test_a_function_out_of_memory_is_reported():
    result = execute_code("def f(x):\n    return bytearray(2 * 1024**3)\n", maximum_memory_bytes=256 * 1024**2,
                          tests="def check(candidate):\n    candidate(1)\n", entry_point="f")
    assert not result.success and result.memory_exceeded


def test_tests_need_an_entry_point():
    with pytest.raises(ValueError):
        execute_code("pass", tests="def check(candidate):\n    pass\n")


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
    message = caplog.records[0].getMessage()
    assert ("No permissions to create a new namespace" if bwrap_script else "not installed") in message
    assert "stops accidents, not code written to escape" in message


def test_an_interpreter_and_package_under_tmp_still_get_the_sandbox(isolation, tmp_path):
    """The sandbox replaces /tmp with an empty one: a venv and a clone that live there are shown to it again."""
    if isolation == "guard":
        pytest.skip("about bubblewrap: runs once, with it")
    if not str(tmp_path.resolve()).startswith("/tmp/") or not bubblewrap_works():
        pytest.skip("needs pytest's temp dir under /tmp and a working bubblewrap")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=60)
    (tmp_path / "clone").mkdir()
    os.symlink(REPO_ROOT / "nanochat", tmp_path / "clone" / "nanochat")  # (execution.py needs nothing beyond it)
    script = ("import logging; logging.basicConfig(); from nanochat.execution import bubblewrap_works, execute_code; "
              "print(bubblewrap_works(), execute_code('print(6 * 7)').stdout.strip())")
    result = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "clone"), "NANOCHAT_NO_BWRAP": "0"},
                            timeout=120)
    assert result.stdout.split() == ["True", "42"], result.stdout + result.stderr
