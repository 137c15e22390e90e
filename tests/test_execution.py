"""
The guarded code runner: every misbehaviour is contained and reported, nothing outside its temp dir
is touched, and no test can hang (each attempt is bounded by pytest-timeout too).
"""
import os
import socket
import time

import pytest

from nanochat.execution import OUTPUT_LIMIT, STARTUP_ALLOWANCE, execute_code

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sentinel(tmp_path):
    """A file of the test's own that no executed code may change or remove."""
    path = tmp_path / "sentinel.txt"
    path.write_text("keep me")
    return path


def assert_sentinel_intact(sentinel):
    assert sentinel.exists() and sentinel.read_text() == "keep me"


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
    result = execute_code(code, timeout=1.0)
    elapsed = time.time() - start
    assert result.timeout and not result.success
    assert elapsed < 1.0 + STARTUP_ALLOWANCE + 3  # killed, not waited out


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
], ids=["os.system", "subprocess.run", "subprocess.Popen", "shutil.rmtree", "os.remove", "os.unlink", "pathlib.unlink",
        "os.rename", "shutil.move", "open_w", "os.truncate", "chdir_then_append"])
def test_files_outside_the_temp_dir_survive(code, sentinel):
    result = execute_code(code.format(path=sentinel, dir=sentinel.parent))
    assert not result.success and "PermissionError" in result.error
    assert_sentinel_intact(sentinel)


def test_files_inside_the_temp_dir_can_be_written_and_deleted():
    code = ("import os, tempfile\n"
            "open('a.txt', 'w').write('data')\n"
            "os.rename('a.txt', 'b.txt')\n"
            "print(open('b.txt').read())\n"
            "os.remove('b.txt')\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n"
            "    f.write('x')\n"
            "print(os.listdir('.'))")
    result = execute_code(code)
    assert result.success, result.error
    assert result.stdout == "data\n[]\n"


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
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
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


def test_output_is_truncated():
    result = execute_code(f"print('x' * {10 * OUTPUT_LIMIT})\nimport sys\nprint('y' * {10 * OUTPUT_LIMIT}, file=sys.stderr)")
    assert result.success
    assert result.stdout.startswith("x" * OUTPUT_LIMIT) and "truncated" in result.stdout
    assert len(result.stdout) < OUTPUT_LIMIT + 100 and len(result.stderr) < OUTPUT_LIMIT + 100


def test_low_level_writes_cannot_corrupt_the_report():
    result = execute_code("import os\nos.write(1, b'{not json')\nos.write(2, b'noise')\nprint('fine')")
    assert result.success and result.stdout == "fine\n"
