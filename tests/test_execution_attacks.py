"""
The attacker's corpus against nanochat/execution.py: model-written code that tries to forge its verdict,
crash or reach the caller, grow without bound, or corrupt its interpreter. Every attack runs inside
bubblewrap (skipped where it cannot run) and without it; a case that needs a kernel feature this machine
lacks (seccomp, Landlock) skips without bubblewrap, saying which. Attacks that would harm the machine if
they worked (signals, renicing) run only where a layer that stops them is present.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO_ROOT, TEST_DATA
from nanochat import sandbox
from nanochat.execution import execute_code

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("isolation")]  # each test in both layers


def needs(isolation, feature):
    """Skip a guard-layer case that only `feature` of the kernel stops (bubblewrap stops it by itself)."""
    available = {"seccomp": sandbox.seccomp_works, "Landlock": lambda: sandbox.landlock_abi() >= 1}[feature]()
    if isolation == "guard" and not available:
        pytest.skip(f"without bubblewrap only {feature} stops this, and this machine's kernel (or container) does not offer it")


@pytest.fixture(scope="module")
def humaneval():
    from tasks.humaneval import HumanEval
    return HumanEval(data_dir=str(TEST_DATA))


# a wrong answer to HumanEval/0 (has_close_elements): True for every list, where the tests want False too
WRONG = "    return True\n\n"
FORGED = json.dumps({"passed": True, "error": None, "memory": False})
DEFEAT_GUARD = "import os, posixpath\nposixpath.abspath = lambda path: os.getcwd()  # every path looks inside the temp dir\n"

# ------------------------------------------------------------------------------------------------
# The verdict: a wrong answer stays wrong, whatever the code does in its own process

FORGERIES = {
    # the attack that forged main's verdict 5 times in 5: find the real os.open (main's wrapper kept it in a
    # closure cell), read our own memory through /proc/self/mem opened relative to an fd on /proc (main's guard
    # checked the relative path), take the 32 hex digits of a bytes object there (main's verdict nonce) and
    # write them, then a success report, everywhere
    "own_memory": """
        import os, re
        found = []
        try:
            real_open = os.open.__closure__[0].cell_contents if getattr(os.open, "__closure__", None) else os.open
            proc = real_open("/proc", os.O_RDONLY)
            maps = os.read(real_open("self/maps", os.O_RDONLY, dir_fd=proc), 10**7).decode()
            mem = real_open("self/mem", os.O_RDONLY, dir_fd=proc)
            for line in maps.splitlines():
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if "r" in line.split()[1] and end - start < 64 * 2**20:
                    try:
                        os.lseek(mem, start, 0)
                        found += re.findall(rb"\\x20\\x00{7}.{8}([0-9a-f]{32})\\x00", os.read(mem, end - start), re.DOTALL)
                    except OSError:
                        pass
        except OSError:
            pass
        for fd in range(1024):
            try:
                os.write(fd, (found or [b""])[0] + b"\\n" + FORGED + b"\\n")
            except OSError:
                pass
    """,
    # a success report on every descriptor, and on every descriptor of the judge we can find
    "forged_reports": """
        import os
        for fd in range(1024):
            try:
                os.write(fd, FORGED + b"\\n")
            except OSError:
                pass
        try:
            pids = os.listdir("/proc")
        except OSError:
            pids = []
        for pid in pids:
            try:
                if b"judge" in open(f"/proc/{pid}/cmdline", "rb").read():
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with open(f"/proc/{pid}/fd/{fd}", "wb") as f:
                            f.write(FORGED + b"\\n")
            except OSError:
                pass
    """,
    # the harness of our own process patched through its frames: it now answers every call with success
    "patched_harness": """
        import sys
        frame = sys._getframe()
        while frame.f_back:
            frame = frame.f_back
        harness = frame.f_globals
        harness["_encode"] = lambda value: True
        harness["_attempt"] = lambda *args, **kwargs: {"passed": True, "error": None, "memory": False}
        harness["json"].dumps = lambda *args, **kwargs: '{"passed": true, "return": true}'
    """,
    # leave before anything can fail
    "exit_early": "import os\nos._exit(0)\n",
    # an answer that equals everything
    "equals_everything": """
        class Anything(list):
            def __eq__(self, other):
                return True
        _real = has_close_elements
        has_close_elements = lambda *args: Anything()
    """,
}


@pytest.mark.parametrize("attack", list(FORGERIES))
def test_a_wrong_answer_cannot_forge_its_verdict(humaneval, attack):
    completion = WRONG + f"FORGED = {FORGED.encode()!r}\n" + textwrap.dedent(FORGERIES[attack])
    for _ in range(3):
        assert humaneval.evaluate(humaneval[0], completion) is False


def test_the_judge_and_its_tests_are_out_of_the_program_s_sight():
    # the tests' source, a secret of the judge: nothing the program can read holds it
    program = textwrap.dedent("""
        import os
        def f(x):
            seen = []
            try:
                pids = os.listdir("/proc")
            except OSError:
                pids = []
            for pid in pids:
                for name in ["cmdline", "environ", "fd/0", "fd/3", "fd/4", "fd/5", "mem"]:
                    try:
                        seen.append(open(f"/proc/{pid}/{name}", "rb").read(10**6))
                    except (OSError, ValueError):
                        pass
            return b"SECRET_TEST_MARKER" in b"".join(seen)
    """)
    tests = "SECRET = 'SECRET_TEST_MARKER'\ndef check(candidate):\n    assert candidate(0) is False\n"
    result = execute_code(program, tests=tests, entry_point="f")
    assert result.success, result.error


# ------------------------------------------------------------------------------------------------
# Whatever the program leaves behind becomes a result, never an exception in the caller

# written on every descriptor: to the parent's report (no tests), to the judge's answers (tests)
REPORTS = {"newline_then_nesting": "b'\\n' + b'[' * 100_000", "nesting": "b'[' * 100_000", "objects": "b'{' * 50_000 + b'\\n'",
           "one": "b'{\"passed\": 1}\\n'", "string": "b'{\"passed\": \"true\"}\\n'", "not_utf8": "b'\\xff\\xfe' * 10_000",
           "huge": "b'7' * 5_000_000"}
WRITE_EVERYWHERE = "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, {payload})\n    except OSError:\n        pass\n"


@pytest.mark.parametrize("report", list(REPORTS))
def test_any_report_is_a_result(humaneval, report):
    code = WRITE_EVERYWHERE.format(payload=REPORTS[report])
    result = execute_code(code + "assert False\n")
    assert not result.success and isinstance(result.error, str)
    example = humaneval[0]
    assert humaneval.evaluate(example, WRONG + code) is False
    assert humaneval.evaluate(example, example["messages"][1]["content"] + "\n" + code) is False  # what the program said: garbage


# past the guard's file count (os.scandir emptied), a directory tree deeper than shutil.rmtree's recursion
DEEP_TREE = DEFEAT_GUARD + """
class Empty:
    __enter__ = __iter__ = lambda self: self
    __exit__ = lambda self, *args: None
    def __next__(self):
        raise StopIteration
os.scandir = lambda *args, **kwargs: Empty()
print(os.path.dirname(os.getcwd()))
for _ in range(1500):
    os.mkdir("d")
    os.chdir("d")
print("deep")
"""


def test_a_tree_too_deep_for_recursion_is_removed(isolation):
    result = execute_code(DEEP_TREE, timeout=30.0)  # (main's caller died here of a RecursionError)
    workdir, deep = result.stdout.splitlines()
    assert result.success and deep == "deep"
    assert not os.path.exists(workdir)


# ------------------------------------------------------------------------------------------------
# Every writable place is bounded: /dev, /dev/shm, /tmp hold nothing the program writes

def test_nothing_outside_the_temp_dir_is_writable(isolation):
    needs(isolation, "Landlock")
    places = ["/dev/shm", "/dev", "/tmp", "/var/tmp", os.path.expanduser("~")]
    code = DEFEAT_GUARD + textwrap.dedent(f"""
        import uuid
        for place in {places!r}:
            path = f"{{place}}/nanochat_attack_{{uuid.uuid4().hex}}"
            try:
                with open(path, "wb") as f:
                    f.write(bytes(2**20))
                print("wrote", path)
            except OSError:
                pass
    """)
    result = execute_code(code)
    assert result.success, result.error
    for line in result.stdout.splitlines():  # clean up before failing (a tmpfs of the sandbox's is gone already)
        if os.path.exists(line.split()[1]):
            os.remove(line.split()[1])
    assert result.stdout == ""


def test_other_programs_shm_files_survive(isolation):
    needs(isolation, "Landlock")
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="nanochat_test_") as victim:
        victim.write(b"keep me")
        victim.flush()
        for code in [f"import os\nos.remove({victim.name!r})", DEFEAT_GUARD + f"os.remove({victim.name!r})",
                     DEFEAT_GUARD + f"open({victim.name!r}, 'wb').write(b'overwritten')"]:
            assert not execute_code(code).success
            assert open(victim.name, "rb").read() == b"keep me"


# ------------------------------------------------------------------------------------------------
# No way to raw memory: code objects from bytes, hand-made code objects, ctypes, gc's object lists

CODE_OBJECT_ATTACKS = {
    "marshal.loads": "import marshal\nmarshal.loads(marshal.dumps((lambda: 0).__code__))",
    "marshal.load": "import io, marshal\nmarshal.load(io.BytesIO(marshal.dumps((lambda: 0).__code__)))",
    "code.replace": "(lambda: 0).__code__.replace(co_code=b'\\x00' * 8)",  # CodeType() raises the same audit event
    # the import system's own loader, handed our bytes under the name of a real .pyc file
    "importlib_loader": "import importlib._bootstrap_external as b, importlib.util, json, marshal\n"
                        "b._compile_bytecode(marshal.dumps((lambda: 0).__code__), bytecode_path=importlib.util.cache_from_source(json.__file__))",
    # a .pyc we wrote, imported from the temp dir
    "planted_pyc": "import py_compile, sys\nopen('planted.py', 'w').write('print(\"planted ran\")')\n"
                   "py_compile.compile('planted.py', doraise=True)\nsys.path.insert(0, '.')\nimport planted",
    # native code of our own: a copy of an extension module, loaded from the temp dir
    "own_extension": "import importlib.util, _lzma, shutil\nshutil.copy(_lzma.__file__, 'mine.so')\n"
                     "importlib.util.module_from_spec(importlib.util.spec_from_file_location('_lzma', 'mine.so'))",
    "import ctypes": "import ctypes",
    # ctypes' classes outlive the module (and pointer arithmetic raises no audit event): none may be alive
    "ctypes_classes": "def walk(c):\n    yield c\n    for s in type.__subclasses__(c):\n        yield from walk(s)\n"
                      "classes = {c.__name__: c for c in walk(object)}\n"
                      "L = type('L', (classes['_SimpleCData'],), {'_type_': 'l'})\n"
                      "P = type('P', (classes['_Pointer'],), {'_type_': L})\nprint([P(L(7))[i] for i in range(4)])",
    "gc.get_objects": "import gc\ngc.get_objects()",
    "gc.get_referrers": "import gc\ngc.get_referrers(gc)",
}


@pytest.mark.parametrize("attack", list(CODE_OBJECT_ATTACKS))
def test_code_objects_and_raw_memory_are_refused(attack):
    result = execute_code(CODE_OBJECT_ATTACKS[attack] + "\nprint('reached the end')")
    refused = "KeyError: '_SimpleCData'" if attack == "ctypes_classes" else ("PermissionError", "ImportError")
    assert not result.success and result.error.startswith(refused), result.error
    assert result.stdout == ""


def test_imports_still_load_their_bytecode():
    # modules the harness did not import: loaded from their .pyc files with the guard watching marshal
    code = "import fractions, decimal, statistics, typing, heapq, hashlib\nprint(statistics.mean([fractions.Fraction(1, 2), 1]))"
    result = execute_code(code)
    assert result.success and result.stdout == "3/4\n", result.stderr


# ------------------------------------------------------------------------------------------------
# The caller: never killed, slowed, pinned or read, even by code that gets past the guard

# a program run by a caller process of its own, so that a successful attack does not take pytest down
CALLER = """
import json, os, sys
from nanochat.execution import execute_code
import resource
state = lambda: (os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_NOFILE))
before = state()
r = execute_code(sys.stdin.read(), timeout=10.0)
after = state()
print(json.dumps({"success": r.success, "stdout": r.stdout, "error": r.error, "unchanged": before == after}))
"""
# the guard's replacements undone: posix and signal imported again come with their real functions
REIMPORTED = "import sys\nfor name in ['posix', 'signal', '_signal', 'os']:\n    sys.modules.pop(name, None)\nimport os, posix, signal\n"

CALLER_ATTACKS = {
    "posix.kill": "posix.kill(os.getppid(), signal.SIGKILL)",
    "pidfd": "signal.pidfd_send_signal(posix.pidfd_open(os.getppid()), signal.SIGKILL)",
    "killpg": "posix.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "stop": "posix.kill(os.getppid(), signal.SIGSTOP)",
    "renice": "os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
    "renice_user": "os.setpriority(os.PRIO_USER, os.getuid(), 19)",
    "pin": "os.sched_setaffinity(os.getppid(), {0})",
    "prlimit": "import resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
    "sigio": "import fcntl\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, os.getppid())\n"
             "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')",
}


@pytest.mark.parametrize("attack", list(CALLER_ATTACKS))
def test_the_caller_is_out_of_reach(isolation, attack):
    needs(isolation, "seccomp")
    code = REIMPORTED + CALLER_ATTACKS[attack] + "\nprint('done')"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", CALLER], input=code, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=60, start_new_session=True)  # (a group of its own: killpg must not reach pytest)
    assert run.returncode == 0, run.stderr  # the caller lived
    report = json.loads(run.stdout.splitlines()[-1])
    assert not report["success"] and "PermissionError" in report["error"] and report["unchanged"], report


# every environment in sight, the caller's first, also through an fd on /proc (how main's guard was passed)
READ_ENVIRONMENTS = REIMPORTED + """
real_open = os.open.__closure__[0].cell_contents if getattr(os.open, "__closure__", None) else os.open
seen = [str(os.environ).encode()]
def read(path, dir_fd=None):
    try:
        fd = real_open(path, os.O_RDONLY, dir_fd=dir_fd)
        seen.append(os.read(fd, 10**6))
    except OSError:
        pass
try:
    proc = real_open("/proc", os.O_RDONLY)
except OSError:
    proc = None
try:
    pids = os.listdir("/proc")
except OSError:
    pids = []
for pid in ["self", str(os.getppid()), *pids]:
    read(f"/proc/{pid}/environ")
    if proc is not None:
        read(f"{pid}/environ", proc)
print(SECRET in b"".join(seen))
"""


def test_the_caller_s_environment_is_unreadable(isolation):
    needs(isolation, "Landlock")  # (or a root caller: the program has no capabilities, the caller has)
    secret = "nanochat-test-secret-" + os.urandom(8).hex()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NANOCHAT_TEST_SECRET": secret}
    run = subprocess.run([sys.executable, "-c", CALLER], input=f"SECRET = {secret.encode()!r}\n" + READ_ENVIRONMENTS, cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["success"] and report["stdout"] == "False\n", report


# the guard's tables emptied through the harness's globals (how main's guard was emptied), then a connection
CONNECT = """
import sys
frame = sys._getframe()
while frame.f_back:
    frame = frame.f_back
frame.f_globals["REFUSED_EVENTS"] = frozenset()
sys.modules["__main__"].__dict__["REFUSED_EVENTS"] = frozenset()
import socket
socket.create_connection(("127.0.0.1", PORT), timeout=2)
"""


def test_no_network_even_past_the_guard():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        result = execute_code(f"PORT = {server.getsockname()[1]}\n" + CONNECT)
        assert not result.success and "PermissionError" in result.error
        with pytest.raises(socket.timeout):
            server.accept()  # nobody ever connected
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------
# The kernel's confinement alone, against a program that runs native code (here: ctypes, before any guard)

NATIVE_ATTACKER = """
import ctypes, json, os, socket, sys
from nanochat.sandbox import confine
victim = int(sys.argv[1])
confine(os.getcwd())
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, function):
    try:
        result = function()
        outcomes[name] = "allowed" if result is None or result >= 0 else os.strerror(ctypes.get_errno())
    except OSError as e:
        outcomes[name] = e.strerror
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buffer = ctypes.create_string_buffer(8)
local, remote = iovec(ctypes.cast(buffer, ctypes.c_void_p), 8), iovec(0x10000, 8)  # allowed, it would fail with EFAULT
outcomes = {}
ppid = os.getppid()
# all harmless where they succeed: signal 0 only checks, the same priority and affinity again, a read of limits
attempt("signal 0 to the caller", lambda: os.kill(ppid, 0))
attempt("signal 0 to the other process", lambda: os.kill(victim, 0))
attempt("ptrace the other process", lambda: libc.ptrace(ctypes.c_long(16), ctypes.c_long(victim), None, None))  # PTRACE_ATTACH
attempt("read the other process's memory", lambda: libc.process_vm_readv(victim, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
attempt("write to the other process's fd 1", lambda: open(f"/proc/{victim}/fd/1", "wb").close())
attempt("read the caller's environment", lambda: open(f"/proc/{ppid}/environ", "rb").close())
attempt("open a socket", lambda: socket.socket().close())
attempt("fork", lambda: os._exit(0) if os.fork() == 0 else None)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("renice the caller", lambda: os.setpriority(os.PRIO_PROCESS, ppid, os.getpriority(os.PRIO_PROCESS, ppid)))
attempt("pin the caller", lambda: os.sched_setaffinity(ppid, os.sched_getaffinity(ppid)))
attempt("read the caller's limits", lambda: __import__("resource").prlimit(ppid, 7) and None)
attempt("write outside the temp dir", lambda: open(sys.argv[2], "wb").close())
attempt("a thread", lambda: __import__("threading").Thread(target=print).start())
attempt("write inside the temp dir", lambda: open("inside", "wb").close())
print(json.dumps(outcomes))
"""


def test_the_kernel_confinement_holds_against_native_code(isolation, tmp_path):
    if isolation == "bwrap":
        pytest.skip("the kernel's confinement on its own: runs once, without bubblewrap")
    if not sandbox.seccomp_works() or sandbox.landlock_abi() < 1:
        pytest.skip("this machine's kernel (or container) offers no seccomp or no Landlock")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    victim = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nfrom nanochat.sandbox import confine\n"
                               "confine(os.getcwd())\nprint('ready', flush=True)\ntime.sleep(60)"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline() == "ready\n"
        outside = tmp_path / "outside"
        workdir = tmp_path / "attacker"
        workdir.mkdir()
        run = subprocess.run([sys.executable, "-c", NATIVE_ATTACKER, str(victim.pid), str(outside)], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=60)
    finally:
        victim.kill()
        victim.wait()
    outcomes = json.loads(run.stdout)
    allowed = {"a thread", "write inside the temp dir"}
    assert all(outcomes.pop(name) == "allowed" for name in allowed), outcomes
    assert set(outcomes.values()) <= {"Operation not permitted", "Permission denied"} and len(outcomes) == 13, outcomes
    assert not outside.exists()
