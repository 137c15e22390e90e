"""
The contained side of nanochat.execution: what runs inside the child processes, a module that imports
little, so that each child starts fast. A child runs main(ROLE) (see child_command) with its request,
JSON, on stdin:
  - "program": confines itself with the kernel's help (this takes ctypes), then becomes a fresh interpreter
    ("confined-program"), which never loads ctypes, installs the guard and runs the code; with an
    entry_point it then answers the judge's calls to that function, plain data both ways.
  - "judge": confines itself, installs the guard, runs the tests' check(candidate), candidate calling the
    program, and writes the verdict on a descriptor that only it holds.
Each writes a report line {"passed", "error", "memory"}: the program about its code (to the judge, or with
no tests to the parent), the judge its verdict.
"""

import json
import os
import signal
import struct
import sys
from types import MappingProxyType

OUTPUT_LIMIT = 10_000  # characters kept of stdout and of stderr: plenty for a test's failure message
TRUNCATED = "\n[... output truncated]\n"
FILE_SIZE_LIMIT = 2 * 1024 * 1024  # largest file the code may write (RLIMIT_FSIZE)
MAX_FILES = 32  # files and directories in the temp dir at once (the guard refuses creating more)
MAX_OPEN_FILES = 32  # descriptors (RLIMIT_NOFILE): also bounds files deleted while still open
# disk the code can fill: every entry and every open descriptor at most one FILE_SIZE_LIMIT (128 MB)
DISK_LIMIT = (MAX_FILES + MAX_OPEN_FILES) * FILE_SIZE_LIMIT
MESSAGE_LIMIT = 16 * 1024 * 1024  # largest call or answer between the judge and the program, in bytes

# audit events refused outright: processes, signals, network, links, raising limits, a subinterpreter
# (our hook is per interpreter), and the ways to raw memory: hand-made code objects, gc's object lists
REFUSED_EVENTS = frozenset([
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
    "os.kill", "os.killpg", "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.link", "os.symlink", "os.chown", "os.chflags", "sqlite3.connect", "resource.setrlimit", "resource.prlimit",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__", "marshal.load",
    "cpython.PyInterpreterState_New",
])  # and every "ctypes.*" event; "marshal.loads" only for the import system's own .pyc files (see _make_guard)
# native modules that read memory or write files without raising audit events (dbm falls back to dbm.dumb)
REFUSED_IMPORTS = frozenset(["_ctypes", "_dbm", "_gdbm", "readline", "_testcapi", "_testinternalcapi"])
# events that change files: (position of a path it changes, position of that path's dir_fd or None), ...
WRITE_EVENTS = MappingProxyType({
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.chmod": ((0, 2),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# functions CPython raises no audit event for: replaced by ones raising PermissionError (in os and in
# posix, the module behind it), so that an accident gets a clear error even where the kernel refuses nothing
UNAUDITED_FUNCTIONS = {"os": ["mkfifo", "mknod", "pidfd_open", "chroot"], "posix": ["mkfifo", "mknod", "pidfd_open", "chroot"],
                       "signal": ["pidfd_send_signal"], "_posixsubprocess": ["fork_exec"], "_posixshmem": ["shm_open"]}

# the seccomp filter: system calls refused with EPERM, by number on (x86_64, aarch64); None: no such call
SECCOMP_REFUSED = {
    "socket": (41, 198), "socketpair": (53, 199), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "setpriority": (141, 140), "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119), "sched_setaffinity": (203, 122), "sched_setattr": (314, 274), "ioprio_set": (251, 30),
    "migrate_pages": (256, 238), "move_pages": (279, 239), "process_madvise": (440, 440), "kcmp": (312, 272),
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281), "unshare": (272, 97),
    "setns": (308, 268), "mount": (165, 40), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),  # io_uring bypasses seccomp
}
# the calls checked on their arguments: clone (threads only), prlimit64 (own limits only), fcntl (no F_SETOWN)
SECCOMP_ARCHES = {"x86_64": (0, 0xC000003E, {"clone": 56, "clone3": 435, "prlimit64": 302, "fcntl": 72}),
                  "aarch64": (1, 0xC00000B7, {"clone": 220, "clone3": 435, "prlimit64": 261, "fcntl": 25})}


class _BoundedWriter:
    """sys.stdout and sys.stderr of a child: the first OUTPUT_LIMIT characters straight to the descriptor, then a note."""

    def __init__(self, fd):
        self.fd, self.left = fd, OUTPUT_LIMIT

    def write(self, text):
        if self.left > 0:
            data = text[:self.left].encode(errors="replace") + (TRUNCATED.encode() if len(text) > self.left else b"")
            self.left -= len(text)
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass
        return len(text)

    def flush(self):
        pass


class ProgramError(Exception):
    """Raised in the judge where the program failed: it raised, died, or answered with something not plain data."""
    memory = False


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


def landlock_abi():
    """The Landlock ABI version the kernel offers this process (0: none, or refused by a container's seccomp profile)."""
    import ctypes
    if sys.platform != "linux":
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    return max(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)), 0)  # LANDLOCK_CREATE_RULESET_VERSION


def seccomp_works():
    """Whether this machine's kernel and architecture take the seccomp filter (x86_64 and aarch64 Linux)."""
    import ctypes
    import platform
    if sys.platform != "linux" or platform.machine() not in SECCOMP_ARCHES:
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(21, 0, 0, 0, 0) >= 0  # PR_GET_SECCOMP


def confine(workdir, exec_fd=None):
    """The kernel's confinement of this process (see nanochat/execution.py), each part where the kernel offers it.
    exec_fd: a descriptor on the interpreter, the one thing the process may still execute (see main)."""
    import ctypes
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: required by Landlock and seccomp; nothing, exec included, undoes them
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: other processes of this user cannot open our /proc files
    _landlock(libc, workdir)
    libc.capset(struct.pack("Ii", 0x20080522, 0), bytes(24))  # no capabilities (root's CAP_KILL, CAP_SYS_PTRACE...)
    _seccomp(libc, exec_fd)


def _landlock(libc, workdir):
    import ctypes
    syscall = lambda number, *args: libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    abi = syscall(444, None, 0, 1)
    if abi < 1:
        return
    all_fs = (1 << (13 + (abi >= 2) + (abi >= 3) + (abi >= 5))) - 1  # every file right this ABI knows: none granted by default
    read, truncate = 1 | 4 | 8, (1 << 14 if abi >= 3 else 0)  # EXECUTE | READ_FILE | READ_DIR; TRUNCATE (ABI 3)
    # handled file rights, TCP bind and connect (ABI 4), abstract unix sockets and signals out of the domain (ABI 6)
    attr = struct.pack("QQQ", all_fs, 3, 3)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        return
    # read everything but /proc (our own /proc/self excepted), write only in the temp dir and /dev/null
    rules = [(read, os.path.join("/", name)) for name in os.listdir("/") if name != "proc" and os.path.isdir(os.path.join("/", name))]
    rules += [(read, "/proc/self"), (all_fs, workdir), (2 | 4 | truncate, os.devnull)]
    added = True
    for access, path in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:  # a mount we cannot even look at (another user's FUSE): unreadable then
            continue
        added &= syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
    if added:  # a rule the kernel refused could make the interpreter's own files unreadable: all or nothing
        syscall(446, ruleset, 0)
    os.close(ruleset)


def _seccomp(libc, exec_fd):
    import ctypes
    import errno
    import platform
    if platform.machine() not in SECCOMP_ARCHES:
        return
    column, audit_arch, checked = SECCOMP_ARCHES[platform.machine()]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF: ld [k], jeq #k, jge #k, jset #k, ret #k
    allow, refuse, absent = 0x7FFF0000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS  # SECCOMP_RET_ALLOW, _ERRNO
    arg = lambda i, high=False: 16 + 8 * i + 4 * high  # offset of an argument's low (high) 32 bits in seccomp_data
    program = [(load, 4), (jeq, audit_arch, 1, 0), (ret, refuse),  # another ABI (int 0x80 on x86_64): refused
               (load, 0), (jge, 0x40000000, 0, 1), (ret, refuse)]  # x32 system calls: refused
    if exec_fd is not None:  # execveat(exec_fd, "", ..., AT_EMPTY_PATH): the interpreter, once more
        program += [(jeq, SECCOMP_REFUSED["execveat"][column], 0, 6), (load, arg(0)), (jeq, exec_fd, 0, 3), (load, arg(4)),
                    (jeq, 0x1000, 0, 1), (ret, allow), (ret, refuse)]
    for numbers in SECCOMP_REFUSED.values():
        if numbers[column] is not None:
            program += [(jeq, numbers[column], 0, 1), (ret, refuse)]
    program += [(jeq, checked["clone3"], 0, 1), (ret, absent),  # glibc then falls back to clone, whose flags we can see
                (jeq, checked["clone"], 0, 4), (load, arg(0)), (jset, 0x10000, 1, 0), (ret, refuse), (ret, allow),  # CLONE_THREAD
                (jeq, checked["prlimit64"], 0, 6), (load, arg(0)), (jeq, 0, 0, 3), (load, arg(0, high=True)), (jeq, 0, 0, 1),
                (ret, allow), (ret, refuse),  # pid 0: this process
                (jeq, checked["fcntl"], 0, 5), (load, arg(1)), (jeq, 8, 2, 0), (jeq, 15, 1, 0), (ret, allow), (ret, refuse),  # F_SETOWN(_EX): SIGIO to another process
                (ret, allow)]
    code = b"".join(struct.pack("HBBI", op, *(rest[1:] or (0, 0)), rest[0]) for op, *rest in program)  # (op, k[, jt, jf])

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    libc.prctl(22, 2, ctypes.byref(SockFprog(len(program), code)), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _make_guard(root):
    """The audit hook (see nanochat/execution.py). Everything it uses is bound now, as a default argument: a
    program that replaces a module's attribute or this module's globals does not change what it checks."""
    import posix
    from importlib._bootstrap_external import _compile_bytecode
    root_dev = os.stat(root).st_dev
    private_dev = root_dev if root_dev != os.stat("/").st_dev else None  # the temp dir is a mount of its own (bwrap)

    def guard(event, args, root=root, private_dev=private_dev, refused_events=REFUSED_EVENTS, refused_imports=REFUSED_IMPORTS,
              write_events=WRITE_EVENTS, write_flags=WRITE_FLAGS, max_files=MAX_FILES, compile_bytecode=_compile_bytecode.__code__,
              getframe=sys._getframe, open_=posix.open, read=posix.read, fstat=posix.fstat, stat=posix.stat, close=posix.close,
              realpath=os.path.realpath, fsdecode=os.fsdecode, lexists=os.path.lexists, walk=os.walk, pathlike=os.PathLike):
        def refuse(detail):
            raise PermissionError(f"{event}: {detail} is disabled in nanochat's code execution guard")

        def check_write(path, dir_fd=None):
            if isinstance(path, int):  # a descriptor: the file it is open on
                path = f"/proc/self/fd/{path}"
            path = fsdecode(path)
            if dir_fd not in (None, -1) and not path.startswith("/"):
                path = f"/proc/self/fd/{dir_fd}/{path}"
            real = realpath(path)
            if real != root and not real.startswith(root + "/"):
                refuse(f"changing {real!r} outside the temporary directory")
            return real

        def check_creation(real):
            if not lexists(real) and sum(len(dirs) + len(files) for _, dirs, files in walk(root)) >= max_files:
                refuse(f"creating more than {max_files} files and directories")

        def written_here(path):  # a file the program may have written: in the temp dir
            return stat(path).st_dev == private_dev or realpath(path).startswith(root + "/")

        if event in refused_events or event.startswith("ctypes."):
            refuse("this operation")
        elif event == "import" and (args[0] in refused_imports or isinstance(args[1], str) and written_here(args[1])):
            raise ImportError(f"module {args[0]} is disabled in nanochat's code execution guard")  # native code of our own too
        elif event == "marshal.loads":
            # the import system loads cached bytecode so: allowed only when the bytes are a .pyc file's own,
            # and that file is not one the program could have written (in the temp dir)
            frame = getframe(1)
            path = frame.f_locals.get("bytecode_path") if frame.f_code is compile_bytecode else None
            if not isinstance(path, str):
                refuse("making code objects from bytes")
            fd = open_(path, os.O_RDONLY)
            try:
                if fstat(fd).st_dev == private_dev or realpath(path).startswith(root + "/"):  # written_here, for this very file
                    refuse("loading bytecode from the temporary directory")
                cached = chunk = b""
                while chunk := read(fd, 1 << 20):
                    cached += chunk
            finally:
                close(fd)
            if cached[16:] != bytes(args[0]):  # after the .pyc header
                refuse("making code objects from bytes")
        elif event == "open" and isinstance(args[0], (str, bytes, pathlike)) and args[2] & write_flags:
            real = check_write(args[0])
            if args[2] & os.O_CREAT:
                check_creation(real)
        elif event in write_events:
            for path_at, dir_fd_at in write_events[event]:
                real = check_write(args[path_at], None if dir_fd_at is None else args[dir_fd_at])
            if event == "os.mkdir":
                check_creation(real)
    return guard


def _contain(request):
    """Everything a child does before running code it did not write, after the kernel's confinement: limits, the guard."""
    import importlib
    import linecache  # noqa: F401  (imported now, for _attempt)
    import traceback  # noqa: F401
    import site
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.path += request["path"]  # the packages, without running their .pth files
    site.setquit()  # what site would have defined: exit(), quit(), help()
    site.sethelper()
    _apply_limits(request["maximum_memory_bytes"], request["timeout"])
    for module_name, names in UNAUDITED_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refused(f"{module_name}.{name}"))
    sys.addaudithook(_make_guard(os.path.realpath(os.getcwd())))
    sys.stdout, sys.stderr = _BoundedWriter(1), _BoundedWriter(2)


def _attempt(function, source_name=None, source=None):
    """-> a report {"passed", "error", "memory"} of calling function, its failure's traceback printed to stderr."""
    import linecache
    import traceback
    if source is not None:  # so that tracebacks show the lines of the code
        linecache.cache[source_name] = (len(source), None, source.splitlines(True), source_name)
    try:
        function()
        return {"passed": True, "error": None, "memory": False}
    except MemoryError:
        return {"passed": False, "error": "MemoryError: the program exceeded its memory limit", "memory": True}
    except SystemExit as e:  # sys.exit() must not end the harness silently: the code did not finish
        return {"passed": False, "error": f"SystemExit({e.code!r}): the code called sys.exit()", "memory": False}
    except BaseException as e:
        traceback_ = e.__traceback__.tb_next  # from the code's own frames on
        traceback.print_exception(type(e), e, traceback_.tb_next if traceback_ else None, file=sys.stderr)
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return {"passed": False, "error": error[:OUTPUT_LIMIT], "memory": getattr(e, "memory", False) is True}


def _send(fd, message):
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def _receive(stream):
    line = stream.readline(MESSAGE_LIMIT + 1)
    if not line.endswith(b"\n"):
        raise ProgramError(f"the program ended, or sent more than {MESSAGE_LIMIT} bytes, before answering")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ProgramError("the program answered with something that is not an answer")
    return message


def _encode(value):
    """Plain data -> JSON: lists stay lists, the other containers are tagged (dict keys need not be strings)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(key), _encode(item)] for key, item in value.items()]}
    for kind in (tuple, set, frozenset):
        if isinstance(value, kind):
            return {kind.__name__: [_encode(item) for item in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).decode("latin-1")}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    for kind in (bool, int, float, str):  # subclasses (IntEnum, numpy.float64) as the plain type
        if isinstance(value, kind):
            return kind(value)
    if hasattr(type(value), "__index__"):  # numpy integers
        return int(value.__index__())
    raise TypeError(f"a {type(value).__name__} cannot pass between the program and its tests (plain data only)")


def _decode(data):
    """The inverse of _encode, strict: it builds only plain data, and raises on anything else."""
    if isinstance(data, list):
        return [_decode(item) for item in data]
    if not isinstance(data, dict):
        return data  # None, bool, int, float, str as json made them
    (kind, payload), = data.items()
    if kind == "dict":
        return {_decode(key): _decode(item) for key, item in payload}
    if kind in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](_decode(item) for item in payload)
    if kind == "bytes":
        return payload.encode("latin-1")
    if kind == "complex":
        return complex(*map(float, payload))
    raise ValueError(f"unknown tag {kind!r} in the program's answer")


def _run_program(request):
    """Run the code; with an entry_point, answer the judge's calls to it until the judge hangs up."""
    import types
    code, answers_fd = request["code"], request["answers_fd"]
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module  # the code's own namespace, as when it runs as a script
    _send(answers_fd, _attempt(lambda: exec(compile(code, "<program>", "exec"), module.__dict__), "<program>", code))
    if request["entry_point"] is None:
        return
    calls = os.fdopen(request["calls_fd"], "rb")
    while (line := calls.readline(MESSAGE_LIMIT + 1)).endswith(b"\n"):
        answer = {}

        def call():
            function = getattr(module, request["entry_point"])
            args, kwargs = _decode(json.loads(line))
            answer["return"] = _encode(function(*args, **kwargs))
            json.dumps(answer)  # fails here, not in _send, on what json cannot write (a number too long)
        report = _attempt(call)
        _send(answers_fd, answer if report["passed"] else report)


def _run_judge(request):
    """Run the tests' check(candidate), candidate calling the program; write the verdict."""
    answers, calls_fd = os.fdopen(request["answers_fd"], "rb"), request["calls_fd"]

    def candidate(*args, **kwargs):
        _send(calls_fd, [_encode(list(args)), _encode(kwargs)])
        answer = _receive(answers)
        if "return" in answer:
            return _decode(answer["return"])
        error = ProgramError(f"the program raised {answer.get('error')}")
        error.memory = answer.get("memory") is True
        raise error

    loaded = {}
    verdict = _attempt(lambda: loaded.update(_receive(answers)))
    if verdict["passed"] and loaded.get("passed") is not True:
        verdict = {"passed": False, "error": f"the program failed: {loaded.get('error')}", "memory": loaded.get("memory") is True}
    namespace = {"__name__": "__tests__"}
    if verdict["passed"]:
        verdict = _attempt(lambda: exec(compile(request["tests"], "<tests>", "exec"), namespace), "<tests>", request["tests"])
    if verdict["passed"]:
        namespace[request["entry_point"]] = candidate  # tests that call the function by its name call the program's too
        verdict = _attempt(lambda: namespace["check"](candidate))
    _send(request["verdict_fd"], verdict)


def child_command(role):
    """The command that starts a child: this file imported as a module, so that its cached bytecode serves (a
    script would be compiled again on every start), and off the path again before any code runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-I", "-B", "-S", "-c", f"import sys; sys.path.insert(0, {here!r}); import sandbox; "
            f"del sys.path[0]; sandbox.main({role!r})"]


def main(role):
    if role == "program" and sys.platform == "linux":
        # confining takes ctypes, whose classes outlive any unloading and read raw memory without an audit event:
        # confine, then run the code in a fresh interpreter, which never loads it (and cannot: the guard refuses)
        import fcntl
        interpreter = os.open(sys.executable, os.O_RDONLY | os.O_CLOEXEC)
        # a number the code can never give a descriptor of its own (RLIMIT_NOFILE): the exec cannot be reused
        exec_fd = fcntl.fcntl(interpreter, fcntl.F_DUPFD_CLOEXEC, MAX_OPEN_FILES)
        confine(os.getcwd(), exec_fd)
        try:
            os.execve(exec_fd, child_command("confined-program"), os.environ)
        except OSError:  # a kernel without execveat: go on in this interpreter (ctypes' classes stay reachable)
            pass
    if role == "judge":
        confine(os.getcwd())
    request = json.loads(sys.stdin.buffer.read())
    _contain(request)
    (_run_judge if role == "judge" else _run_program)(request)
    os._exit(0)  # without waiting for threads the code left running

