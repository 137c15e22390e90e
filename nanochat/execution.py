"""
Run model-written Python (HumanEval completions) in a separate, contained process.

Two layers, the same program behaving the same under both:
  - bubblewrap (`bwrap`), when it is installed and can create namespaces here: the child runs with no
    network, a read-only view of the system, a private writable temp dir (a tmpfs of DISK_LIMIT bytes)
    and its own PID namespace, so killing the sandbox kills every process the code started, and the
    code cannot see or signal ours. Without it one warning line is logged and only the guard below
    applies (NANOCHAT_NO_BWRAP=1 chooses that, silently).
  - an in-process guard, always: an audit hook (PEP 578) that CPython calls before every sensitive
    operation whichever module, alias or keyword argument the call came through (os.remove(path=...),
    posix.fork(), io.FileIO...). It refuses new processes, signals to other processes, sockets,
    links, sqlite3 (its file writes are invisible to the hook), ctypes and a few native modules, and
    allows creating, writing, renaming and deleting files only inside the temp dir (at most MAX_FILES
    entries). Reading is allowed everywhere except /proc. Rlimits cap memory, CPU time, file size
    (FILE_SIZE_LIMIT) and open files; environment variables may change freely (nothing can inherit
    them). The guard stops accidents and the attacks in tests/test_execution.py, but it is Python
    code: a program written to defeat it (patching os.path, rebuilding a native module) can, and only
    bubblewrap contains that.

The verdict cannot be forged by the program it judges. A program "succeeds" when it runs to its end
without an uncaught exception; the parent learns that only from a per-run random nonce, which the
child receives on a descriptor of its own and which a verdict thread reads (closing the descriptor)
before the program starts. The program runs inside a generator, `exec(code)` then `yield`: only a
program that ran to its end leaves the generator stopped at its yield, a state no code can fake.
After the program, the verdict thread writes the nonce if and only if that is the generator's state.
The program can write anything anywhere (the report descriptor, a replaced json.dumps), but not the
nonce: it lives only in the verdict thread's frame, and the guard refuses every way to reach another
thread's frame or arbitrary memory (sys._current_frames, gc's object lists, hand-made code objects,
ctypes, /proc/self/mem), and tracing, which could also jump over a failing assert. What remains is
native code the program would compile and load itself; bubblewrap keeps even that from touching
anything outside the sandbox. (A program that makes its own tests vacuous, say with an answer whose
__eq__ is always True, does run to its end: judging that is the task's business.)

The parent waits at most timeout + STARTUP_ALLOWANCE seconds, then kills the process group (and with
bubblewrap the whole PID namespace). The child's output goes to files, not pipes, so no process left
holding a descriptor can make the parent wait, and the temp dir is removed afterwards.
"""

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

OUTPUT_LIMIT = 10_000  # characters kept of stdout and of stderr: plenty for a test's failure message
STARTUP_ALLOWANCE = 2.0  # seconds added to the timeout for the child interpreter to start on a busy machine
FILE_SIZE_LIMIT = 2 * 1024 * 1024  # largest file the code may write (RLIMIT_FSIZE)
MAX_FILES = 32  # files and directories in the temp dir at once (the guard refuses creating more)
MAX_OPEN_FILES = 32  # descriptors (RLIMIT_NOFILE): also bounds files deleted while still open
# disk the code can fill: every entry and every open descriptor at most one FILE_SIZE_LIMIT (128 MB)
DISK_LIMIT = (MAX_FILES + MAX_OPEN_FILES) * FILE_SIZE_LIMIT
NONCE_BYTES = 32


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # why it failed: the exception, the timeout, the process's death
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run code in a contained child process (see the module docstring). Never raises for the code's faults."""
    nonce = secrets.token_hex(NONCE_BYTES // 2).encode()
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    # one thread each for BLAS/OpenMP: `import numpy` then fits the memory limit, and runs do not fight over cores
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        with tempfile.TemporaryFile() as request, tempfile.TemporaryFile() as secret, tempfile.TemporaryFile() as report:
            request.write(json.dumps({"code": code, "timeout": timeout, "maximum_memory_bytes": maximum_memory_bytes}).encode())
            secret.write(nonce)
            request.seek(0), secret.seek(0)
            command = [*_sandbox_prefix(workdir), sys.executable, "-I", "-B", os.path.abspath(__file__), str(secret.fileno())]
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=request, stdout=report, stderr=subprocess.STDOUT,
                                       pass_fds=(secret.fileno(),), start_new_session=True)
            try:
                process.wait(timeout=timeout + STARTUP_ALLOWANCE)
            except subprocess.TimeoutExpired:
                return ExecutionResult(False, "", "", error=f"Timed out after {timeout} s", timeout=True)
            finally:
                _kill_process_group(process)  # on success too: nothing the code started may outlive it
            report.seek(0)
            return _read_report(report.read(), nonce, process.returncode, timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _sandbox_prefix(workdir):
    """The bwrap command line that wraps the child, or [] when only the in-process guard is available."""
    if os.environ.get("NANOCHAT_NO_BWRAP") == "1" or not bubblewrap_works():
        return []
    return _bwrap_command(workdir)


def _bwrap_command(workdir):
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(DISK_LIMIT), "--tmpfs", workdir, "--chdir", workdir,
            "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]


@functools.cache
def bubblewrap_works():
    """Whether bwrap is installed and can create its namespaces here (checked once per process by a trial run)."""
    if shutil.which("bwrap") is None:
        logger.warning("bubblewrap (bwrap) not found: model code runs under the in-process guard only (apt-get install bubblewrap)")
        return False
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as workdir:
        trial = subprocess.run([*_bwrap_command(workdir), sys.executable, "-I", "-c", ""], capture_output=True, text=True, timeout=60)
    if trial.returncode != 0:
        why = (trial.stderr.strip().splitlines() or [f"exit code {trial.returncode}"])[-1]
        logger.warning(f"bubblewrap cannot isolate model code here ({why}): the in-process guard only")
        return False
    return True


def _kill_process_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    process.wait()


def _read_report(report, nonce, returncode, timeout):
    """The report is the verdict line (the nonce, or empty) then the details as JSON; only the nonce counts."""
    verdict, _, details = report.partition(b"\n")
    try:  # written by the child after the program: shown to the user, never trusted for success
        details = json.loads(details)
        stdout, stderr = str(details["stdout"])[:2 * OUTPUT_LIMIT], str(details["stderr"])[:2 * OUTPUT_LIMIT]
        error = None if details["error"] is None else str(details["error"])[:OUTPUT_LIMIT]
        memory_exceeded = details["memory_exceeded"] is True
    except (ValueError, KeyError, TypeError):  # the child died (or was made to die) before reporting
        stdout, stderr, error, memory_exceeded = "", report.decode("utf-8", errors="replace")[-OUTPUT_LIMIT:], None, False
    if secrets.compare_digest(verdict, nonce):
        return ExecutionResult(True, stdout, stderr)
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap passes on a death by signal N as exit code 128 + N
        return ExecutionResult(False, "", "", error=f"CPU time limit exceeded (timeout {timeout} s)", timeout=True)
    error = error or f"The program did not run to its end (exit code {returncode}: it exited, was killed or ran out of memory)"
    return ExecutionResult(False, stdout, stderr, error=error, memory_exceeded=memory_exceeded)


# ------------------------------------------------------------------------------------------------
# The child: everything below runs in the contained process.

# audit events refused outright: processes, signals, network, links, raising limits, and every way
# to another thread's frame or to raw memory (the verdict nonce)
REFUSED_EVENTS = frozenset([
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.link", "os.symlink", "os.chown", "os.chflags", "sqlite3.connect", "resource.setrlimit", "resource.prlimit",
    "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads",
    "sys.monitoring.register_callback", "code.__new__", "cpython.PyInterpreterState_New",
])
# native modules that read memory or write files without raising audit events (dbm falls back to dbm.dumb)
REFUSED_IMPORTS = frozenset(["_ctypes", "_dbm", "_gdbm", "readline", "_testcapi", "_testinternalcapi"])
# events that change files: (position of a path it changes, position of that path's dir_fd or None), ...
WRITE_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.chmod": ((0, 2),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# functions CPython raises no audit event for: replaced by ones raising PermissionError
# (in os and in posix, the module behind it)
UNAUDITED_FUNCTIONS = {"os": ["mkfifo", "mknod", "pidfd_open", "chroot"], "posix": ["mkfifo", "mknod", "pidfd_open", "chroot"],
                       "signal": ["pidfd_send_signal"], "_posixsubprocess": ["fork_exec"], "_posixshmem": ["shm_open"]}


class _BoundedWriter:
    """A text stream keeping the first OUTPUT_LIMIT characters and counting the rest."""

    def __init__(self):
        self.chunks, self.kept, self.dropped = [], 0, 0

    def write(self, text):
        keep = text[:max(OUTPUT_LIMIT - self.kept, 0)]
        self.chunks.append(keep)
        self.kept += len(keep)
        self.dropped += len(text) - len(keep)
        return len(text)

    def flush(self):
        pass

    def getvalue(self):
        truncated = f"\n[... {self.dropped} more characters truncated]" if self.dropped else ""
        return "".join(self.chunks) + truncated


def _refused(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in nanochat's code execution guard")
    return refused


def _apply_limits(maximum_memory_bytes, timeout):
    import math
    import resource
    if sys.platform == "linux":  # RLIMIT_AS is not enforced on macOS
        resource.setrlimit(resource.RLIMIT_AS, (maximum_memory_bytes, maximum_memory_bytes))
    cpu_seconds = math.ceil(timeout) + 1  # a backstop: the parent's wall-clock kill normally comes first
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write then raises OSError instead of killing
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork bombs (root ignores it: the guard refuses forks)


def _make_guard(root):
    """The audit hook (see the module docstring): refuses what the program may not do, checks where it writes."""
    realpath, fsdecode, lexists, walk = os.path.realpath, os.fsdecode, os.path.lexists, os.walk

    def refuse(event, detail):
        raise PermissionError(f"{event}: {detail} is disabled in nanochat's code execution guard")

    def resolve(path, dir_fd=None):
        if isinstance(path, int):  # a descriptor: the file it is open on
            path = f"/proc/self/fd/{path}"
        path = fsdecode(path)
        if dir_fd not in (None, -1) and not path.startswith("/"):
            path = f"/proc/self/fd/{dir_fd}/{path}"
        return realpath(path)

    def check_write(event, path, dir_fd=None):
        real = resolve(path, dir_fd)
        if real != root and not real.startswith(root + os.sep):
            refuse(event, f"changing {real!r} outside the temporary directory")
        return real

    def check_creation(event, real):
        if not lexists(real) and sum(len(dirs) + len(files) for _, dirs, files in walk(root)) >= MAX_FILES:
            refuse(event, f"creating more than {MAX_FILES} files and directories")

    def guard(event, args):
        if event in REFUSED_EVENTS:
            refuse(event, "this operation")
        elif event == "import" and args[0] in REFUSED_IMPORTS:
            raise ImportError(f"module {args[0]} is disabled in nanochat's code execution guard")
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, flags = args[0], args[2]
            if resolve(path).startswith("/proc/"):
                refuse(event, "reading /proc (process memory)")
            if flags & WRITE_FLAGS:
                real = check_write(event, path)
                if flags & os.O_CREAT:
                    check_creation(event, real)
        elif event in WRITE_EVENTS:
            for path_at, dir_fd_at in WRITE_EVENTS[event]:
                real = check_write(event, args[path_at], None if dir_fd_at is None else args[dir_fd_at])
            if event == "os.mkdir":
                check_creation(event, real)
    return guard


def _disable_unaudited_functions():
    import importlib
    import posix
    for module_name, names in UNAUDITED_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refused(f"{module_name}.{name}"))
    # the "open" event does not carry os.open's dir_fd: make the path absolute so that the guard sees the real target
    real_open = os.open

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and not os.fsdecode(path).startswith("/"):
            path = os.path.realpath(f"/proc/self/fd/{dir_fd}/{os.fsdecode(path)}")
        return real_open(path, flags, mode)
    os.open = posix.open = open_


def _run_program(code):
    """exec the program, then stop at the yield: only a program that ran to its end leaves the generator there."""
    exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
    yield


def _vouch(runner, secret_fd, nonce_taken, program_returned, report_fd):
    """The verdict thread (see the module docstring): the only holder of the nonce."""
    nonce = os.read(secret_fd, NONCE_BYTES)
    os.close(secret_fd)
    has_flag = hasattr(runner, "gi_suspended")  # Python 3.10 lacks it: a kept frame, not running, means the same
    nonce_taken.release()
    program_returned.acquire()
    if runner.gi_suspended if has_flag else (runner.gi_frame is not None and not runner.gi_running):
        os.write(report_fd, nonce)


def _run_child(secret_fd):
    import traceback
    request = json.loads(sys.stdin.buffer.read())
    # the report goes to a private copy of stdout; fds 0-2 go to /dev/null so that output written below
    # Python's sys.stdout (os.write(1, ...), C extensions) does not land in it
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    runner = _run_program(request["code"])
    nonce_taken, program_returned = threading.Lock(), threading.Lock()
    nonce_taken.acquire(), program_returned.acquire()
    verdict = threading.Thread(target=_vouch, args=(runner, secret_fd, nonce_taken, program_returned, report_fd), daemon=True)
    verdict.start()
    nonce_taken.acquire()  # the nonce's descriptor is closed before the program can run
    _apply_limits(request["maximum_memory_bytes"], request["timeout"])
    _disable_unaudited_functions()
    sys.addaudithook(_make_guard(os.path.realpath(os.getcwd())))
    stdout, stderr = _BoundedWriter(), _BoundedWriter()
    sys.stdout, sys.stderr = stdout, stderr
    error, memory_exceeded = None, False
    try:
        next(runner)
    except MemoryError:
        error, memory_exceeded = "MemoryError: the program exceeded its memory limit", True
    except SystemExit as e:  # sys.exit() must not end the harness silently: the program did not finish
        error = f"SystemExit({e.code!r}): the program called sys.exit()"
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next.tb_next, file=stderr)  # from the program's frame on
        error = f"{type(e).__name__}: {e}"[:OUTPUT_LIMIT]
    program_returned.release()
    verdict.join()
    details = json.dumps({"stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                          "error": error, "memory_exceeded": memory_exceeded})
    report = b"\n" + details.encode()
    while report:
        report = report[os.write(report_fd, report):]
    os._exit(0)  # without waiting for threads the program left running


if __name__ == "__main__":
    _run_child(int(sys.argv[1]))
