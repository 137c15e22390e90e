"""
Run model-written Python in separate, contained processes, and judge it where it cannot reach.

The verdict. With tests, execute_code(code, tests=..., entry_point=...) runs the untrusted code in one
process (the program) and the tests in another (the judge). The program defines entry_point and answers
calls; the judge runs the tests' check(candidate), every call to candidate going to the program as plain
data (None, bools, numbers, strings, bytes, lists, tuples, dicts, sets) and coming back as plain data.
Only the judge writes the verdict, on a file only it holds, and the layers below keep the program away
from the judge's memory and files: whatever the program does inside its own process (read its memory,
forge reports, crash) it can pass the tests only by answering their calls correctly. Without tests the
program judges itself: success means it reported running to its end, which code that wants to can always
claim, so a verdict about code someone else wrote needs its tests passed apart. Whatever a process leaves
behind is read with bounds and parsed defensively: it becomes a result, never an exception in the caller.

The containment, in layers, each one applied to the program and the judge alike:
  - bubblewrap (`bwrap`), when it is installed and can create namespaces here: no network, a PID
    namespace of its own (it sees neither the caller nor the other process), a read-only view of the
    system with a fresh /proc and a /dev of four devices, and as the only writable place its temp dir, a
    tmpfs of DISK_LIMIT bytes. Without it one warning per run says that the rest stops accidents, not a
    program written to escape (NANOCHAT_NO_BWRAP=1 chooses that, silently).
  - the kernel's own confinement, where it offers it: no new privileges, no capabilities, not dumpable;
    a seccomp filter refusing new processes, signals, sockets, ptrace, and changing other processes'
    scheduling or limits; Landlock: writing only inside the temp dir, no /proc of other processes, no
    signals or TCP outside. They hold whatever runs in the process, native code included.
  - an in-process guard, an audit hook (PEP 578): refuses the same operations by name (a clear error
    for accidents), bounds the files in the temp dir, and refuses ctypes and making code objects
    (marshal, CodeType), which would let the program corrupt its own interpreter. It is Python code: a
    program written to defeat it can, and only the layers above contain that.
  - rlimits: memory, CPU time, file size, open files.
The parent waits at most timeout + STARTUP_ALLOWANCE seconds, then kills the process groups (and with
bubblewrap the PID namespaces). Output goes to files, not pipes, so nothing left running can make it wait.
This module is the parent's side; nanochat/sandbox.py is what runs in the children.
"""

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

from nanochat import sandbox
from nanochat.sandbox import DISK_LIMIT, OUTPUT_LIMIT, TRUNCATED  # noqa: F401  (DISK_LIMIT: for callers)

logger = logging.getLogger(__name__)

STARTUP_ALLOWANCE = 2.0  # seconds added to the timeout for the interpreters to start on a busy machine
REPORT_LIMIT = 8 * OUTPUT_LIMIT  # bytes of a report read: its error message JSON-escaped, with room to spare


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # why it failed: the exception, the timeout, the process's death
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, tests=None, entry_point=None):
    """
    Run code in a contained child process (see the module docstring); never raises for the code's faults.
    tests: source defining check(candidate), run in a second process against the function entry_point
    that code defines (candidate, and the name entry_point in the tests, call it); success is then the
    judge's verdict, which code cannot forge.
    """
    if (tests is None) != (entry_point is None):
        raise ValueError("execute_code: tests and entry_point go together")
    limits = {"timeout": timeout, "maximum_memory_bytes": maximum_memory_bytes}
    processes = []
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
        stack.callback(_remove_tree, workdir)
        report = stack.enter_context(tempfile.TemporaryFile())
        deadline = time.monotonic() + timeout + STARTUP_ALLOWANCE
        try:
            if tests is None:
                processes.append(_start("program", {**limits, "code": code, "entry_point": None, "answers_fd": report.fileno()}, workdir, stack))
            else:
                calls, answers = os.pipe(), os.pipe()
                try:
                    processes.append(_start("program", {**limits, "code": code, "entry_point": entry_point,
                                                        "calls_fd": calls[0], "answers_fd": answers[1]}, workdir, stack))
                    processes.append(_start("judge", {**limits, "tests": tests, "entry_point": entry_point, "answers_fd": answers[0],
                                                      "calls_fd": calls[1], "verdict_fd": report.fileno()}, workdir, stack))
                finally:
                    for fd in (*calls, *answers):
                        os.close(fd)
            try:
                processes[-1].wait(timeout=max(deadline - time.monotonic(), 0))
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            for process in processes:
                _kill_process_group(process)  # on success too: nothing the code started may outlive it
        stdout = "".join(_read_output(process.stdout_file) for process in processes)
        stderr = "".join(_read_output(process.stderr_file) for process in processes)
        if timed_out:
            return ExecutionResult(False, stdout, stderr, error=f"Timed out after {timeout} s", timeout=True)
        report.seek(0)
        verdict = _parse_report(report.read(REPORT_LIMIT))
    if verdict.get("passed") is True:
        return ExecutionResult(True, stdout, stderr)
    if any(process.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU) for process in processes):  # bwrap: 128 + N
        return ExecutionResult(False, stdout, stderr, error=f"CPU time limit exceeded (timeout {timeout} s)", timeout=True)
    error = verdict.get("error")
    error = str(error)[:OUTPUT_LIMIT] if error is not None else (
        f"No verdict: the {processes[-1].role} did not run to its end (exit code {processes[-1].returncode}: "
        "it exited, was killed or ran out of memory)")
    return ExecutionResult(False, stdout, stderr, error=error, memory_exceeded=verdict.get("memory") is True)


def _start(role, request, workdir, stack):
    """Start one child (nanochat/sandbox.py) in its own directory, its request on stdin and its outputs in files."""
    workdir = os.path.join(workdir, role)
    os.mkdir(workdir)
    stdin, stdout, stderr = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
    # -S skips site (its .pth files cost more than the rest of the start): the packages' dirs are on the path instead
    request["path"] = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    stdin.write(json.dumps(request).encode())
    stdin.seek(0)
    # one thread each for BLAS/OpenMP: `import numpy` then fits the memory limit, and runs do not fight over cores
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [*_sandbox_prefix(workdir), *sandbox.child_command(role)]
    process = subprocess.Popen(command, cwd=workdir, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                               pass_fds=[fd for key, fd in request.items() if key.endswith("_fd")], start_new_session=True)
    process.role, process.stdout_file, process.stderr_file = role, stdout, stderr
    return process


def _sandbox_prefix(workdir):
    """The bwrap command line that wraps a child, or [] when only the guard and the kernel's confinement apply."""
    if os.environ.get("NANOCHAT_NO_BWRAP") == "1" or not bubblewrap_works():
        return []
    return _bwrap_command(workdir)


def _bwrap_command(workdir):
    devices = [arg for device in ["null", "zero", "random", "urandom"] for arg in ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]]
    return ["bwrap", "--ro-bind", "/", "/", "--proc", "/proc",  # a fresh /proc: only the sandbox's own processes
            "--size", "65536", "--tmpfs", "/dev", *devices, "--remount-ro", "/dev",  # no /dev/shm, nothing writable
            "--size", "65536", "--tmpfs", "/tmp", "--size", str(DISK_LIMIT), "--tmpfs", workdir,
            *[arg for path in _code_under_tmp() for arg in ["--ro-bind", path, path]], "--remount-ro", "/tmp",
            "--chdir", workdir, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]


def _code_under_tmp():
    """
    The folders the sandbox's processes run from (this interpreter, its environment, this package) that lie
    under /tmp, which the sandbox replaces with an empty one: shown again, read-only (a clone or a venv in /tmp).
    """
    folders = [sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), os.path.dirname(__file__)]
    paths = {path for folder in folders for path in (os.path.abspath(folder), os.path.realpath(folder))}
    return sorted(path for path in paths if path.startswith("/tmp/"))


@functools.cache
def bubblewrap_works():
    """Whether bwrap is installed and can create its namespaces here (checked once per process by a trial run)."""
    why = None
    if shutil.which("bwrap") is None:
        why = "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    else:
        with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as workdir:
            trial = subprocess.run([*_bwrap_command(workdir), sys.executable, "-I", "-c", ""], capture_output=True, text=True, timeout=60)
        if trial.returncode != 0:
            why = "bubblewrap cannot create its sandbox here (" + (trial.stderr.strip().splitlines() or [f"exit code {trial.returncode}"])[-1] + ")"
    if why:
        logger.warning(f"{why}: model-written code runs without a sandbox, under an in-process guard that stops accidents, "
                       "not code written to escape it (see docs/sandbox.md)")
    return why is None


def _kill_process_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    process.wait()


def _remove_tree(path):
    """Remove a temp dir whatever the code left in it: a tree too deep for shutil.rmtree's recursion, too."""
    try:
        shutil.rmtree(path)
    except Exception:
        subprocess.run(["rm", "-rf", "--", path], capture_output=True)


def _read_output(file):
    file.seek(0)
    text = file.read(4 * OUTPUT_LIMIT + len(TRUNCATED)).decode("utf-8", errors="replace")
    return text if len(text) <= OUTPUT_LIMIT + len(TRUNCATED) else text[:OUTPUT_LIMIT] + TRUNCATED


def _parse_report(data):
    """A report's first line as a dict; {} for anything else (garbage, a nesting that overflows the parser...)."""
    try:
        report = json.loads(data.partition(b"\n")[0])
    except Exception:
        return {}
    return report if isinstance(report, dict) else {}
