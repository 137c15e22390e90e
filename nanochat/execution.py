"""
Run model-written Python (HumanEval completions) in a separate, guarded process.

This is a best-effort guard against *accidents* (an infinite loop, a huge allocation, a stray
os.remove or rm -rf, a network call, sys.exit), NOT a security sandbox: code that means harm can get
around it (ctypes, _io.FileIO, raw syscalls...). Run untrusted code inside a container or VM.

How: the parent starts a fresh interpreter running this file (`python -I execution.py`, so the child
imports nothing of ours and no torch) in a new temporary directory and its own process group, and
sends it the code on stdin. The child, before running the code:
  - caps its address space (RLIMIT_AS), CPU time, file size, and process count (RLIMIT_NPROC: no
    fork bombs; root ignores that limit, so os.fork and friends are also disabled);
  - replaces destructive and escaping functions with ones raising PermissionError: os.system,
    os.kill/fork/exec*/spawn*/putenv/chmod/chown..., shutil.rmtree/move/chown, subprocess.*, socket
    creation (no network), builtins exit/quit;
  - allows writing, deleting and renaming files (open for writing, os.remove/unlink/rmdir/rename/
    replace/truncate) only inside its temporary directory;
  - captures print output in memory, truncated to OUTPUT_LIMIT characters.
It then reports one JSON object on a private copy of its stdout. The parent enforces the wall-clock
timeout by killing the whole process group, and removes the temporary directory.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

OUTPUT_LIMIT = 10_000  # characters kept of stdout and of stderr: plenty for a test's failure message
STARTUP_ALLOWANCE = 2.0  # seconds added to the timeout for the child interpreter to start on a busy machine
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # largest file the code may write (in its temp dir): no disk filling


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # why it failed: the exception, the timeout, the process's death
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run code in a guarded child process (see the module docstring). Never raises for the code's faults."""
    request = json.dumps({"code": code, "timeout": timeout, "maximum_memory_bytes": maximum_memory_bytes})
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__)], cwd=workdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so one kill reaches anything it started
        )
        try:
            out, err = process.communicate(request.encode(), timeout=timeout + STARTUP_ALLOWANCE)
        except subprocess.TimeoutExpired:
            _kill_process_group(process)
            process.communicate()
            return ExecutionResult(False, "", "", error=f"Timed out after {timeout} s", timeout=True)
        _kill_process_group(process)  # nothing should be left, but make sure
        return _read_report(out, err, process.returncode, timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_process_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    process.wait()


def _read_report(out, err, returncode, timeout):
    try:
        report = json.loads(out)
    except ValueError:  # the child died before reporting
        if returncode == -signal.SIGXCPU:
            return ExecutionResult(False, "", "", error=f"CPU time limit exceeded (timeout {timeout} s)", timeout=True)
        stderr = err.decode("utf-8", errors="replace")[-OUTPUT_LIMIT:]
        return ExecutionResult(False, "", stderr, error=f"The process died before reporting (exit code {returncode}; out of memory or killed)")
    return ExecutionResult(success=report["error"] is None, stdout=report["stdout"], stderr=report["stderr"],
                           error=report["error"], memory_exceeded=report["memory_exceeded"])


# ------------------------------------------------------------------------------------------------
# The child: everything below runs in the guarded process.

# module -> functions (and classes) replaced by ones raising PermissionError
DISABLED_FUNCTIONS = {
    "os": ["system", "popen", "fork", "forkpty", "kill", "killpg", "putenv", "unsetenv", "removedirs", "renames",
           "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "setuid", "link", "symlink", "_exit",
           "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
           "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
           "posix_spawn", "posix_spawnp"],
    "shutil": ["rmtree", "move", "chown"],
    "subprocess": ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
    "_posixsubprocess": ["fork_exec"],  # what subprocess and multiprocessing use underneath
    "socket": ["socket", "socketpair", "fromfd", "create_connection", "create_server"],
    "_socket": ["socket", "socketpair"],
    "builtins": ["exit", "quit", "help"],
}
# allowed only on paths inside the temp dir (temp files must work: tempfile itself unlinks a probe file)
PATH_GUARDED_OS_FUNCTIONS = ["remove", "unlink", "rmdir", "rename", "replace", "truncate"]
BLOCKED_MODULES = ["resource"]  # so the code cannot raise its own limits back (root could)


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


def _refuse(name, original):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in nanochat's code execution guard")
    if isinstance(original, type):  # a class stays subclassable (ssl subclasses socket.socket); creating one fails
        return type(original.__name__, (original,), {"__init__": refused})
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
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _guard_paths(root):
    """
    Writing, deleting and renaming files only inside root (the temp dir), so that code using temp files
    still works while nothing outside can be touched; reading stays allowed everywhere.
    """
    import builtins
    import io
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(name, path):
        if isinstance(path, int):  # an already open file descriptor: its path was checked when opened
            return
        real = os.path.realpath(os.fsdecode(path))
        if real != root and not real.startswith(root + os.sep):
            raise PermissionError(f"{name}({real!r}) outside the temporary working directory is disabled in nanochat's code execution guard")

    def guard(name, function, needs_check=lambda *args, **kwargs: True):
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"{name}() with dir_fd is disabled in nanochat's code execution guard")
            if needs_check(*args, **kwargs):
                for arg in args:
                    if isinstance(arg, (str, bytes, os.PathLike)):
                        check(name, arg)
            return function(*args, **kwargs)
        return guarded

    opens_for_writing = lambda file, mode="r", *args, **kwargs: any(c in mode for c in "wax+")
    builtins.open = io.open = guard("open", builtins.open, opens_for_writing)
    os.open = guard("os.open", os.open, lambda path, flags, *args, **kwargs: bool(flags & write_flags))
    for name in PATH_GUARDED_OS_FUNCTIONS:
        setattr(os, name, guard(f"os.{name}", getattr(os, name)))


def _disable_dangerous_functions():
    import importlib
    for module_name, names in DISABLED_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"{module_name}.{name}", getattr(module, name)))
    for module_name in BLOCKED_MODULES:
        sys.modules[module_name] = None  # `import resource` now raises ImportError


def _run_child():
    import traceback
    request = json.loads(sys.stdin.read())
    # keep a private copy of stdout for the report; fds 1 and 2 go to /dev/null so that output written
    # below Python's sys.stdout (os.write(1, ...), C extensions) cannot corrupt the report
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _apply_limits(request["maximum_memory_bytes"], request["timeout"])
    _guard_paths(os.path.realpath(os.getcwd()))
    _disable_dangerous_functions()
    stdout, stderr = _BoundedWriter(), _BoundedWriter()
    sys.stdout, sys.stderr = stdout, stderr
    error, memory_exceeded = None, False
    try:
        exec(compile(request["code"], "<program>", "exec"), {"__name__": "__main__"})
    except MemoryError:
        error, memory_exceeded = "MemoryError: the program exceeded its memory limit", True
    except SystemExit as e:  # sys.exit() must not end the harness silently: the program did not finish
        error = f"SystemExit({e.code!r}): the program called sys.exit()"
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next, file=stderr)  # from the program's frame on
        error = f"{type(e).__name__}: {e}"[:OUTPUT_LIMIT]
    report = json.dumps({"stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                         "error": error, "memory_exceeded": memory_exceeded}).encode()
    while report:
        report = report[os.write(report_fd, report):]


if __name__ == "__main__":
    _run_child()
