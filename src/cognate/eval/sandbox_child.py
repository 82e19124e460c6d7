"""The program that runs inside the sandbox; `sandbox.py` is the side that starts it.

Started as `python -I -S -B sandbox_child.py SETTINGS_JSON` with a JSON request on stdin: the program's parts
(run one after another in one `__main__` module) and, for MBPP checks, a completion token. It uses only the
standard library.

Two processes: this one becomes a *supervisor* (a child subreaper, PR_SET_CHILD_SUBREAPER, so every descendant
that loses its parent is re-parented to it rather than to init) and forks the *program* process, which confines
itself (mounts, resource limits, credentials, audit hook) and only then executes the code. The supervisor
enforces the wall-clock limit and then kills every descendant, whatever sessions or process groups they moved
to: it SIGKILLs its children and reaps them until it has none; a killed child's own children become its
children, so the loop ends only when the whole tree is gone. It reports the program's wait status on a pipe
the parent passed (fd `report_fd`), which the program never holds. Under namespaces the supervisor is the PID
namespace's first process, so its exit also takes down anything left, and `unshare --kill-child` kills it when
the parent kills `unshare`.

Completion token: the parts of an MBPP check are candidate, setup, asserts. The token never appears in the
program text; it is kept only in a closure of an audit hook (which Python code cannot enumerate), and written to
the completion pipe (fd `completion_fd`) when the harness's own frame raises the completion event after the
last part returned. A candidate that raises the event itself, from any other frame, or calls the harness again,
writes nothing; tracing (which could move the harness frame's line) and memory reads are refused.

Order matters: everything the confinement needs is imported before it starts, because after the credentials
change nothing may be imported until file access is restored, and after the audit hook is installed ctypes is off.
"""

import contextlib
import ctypes
import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback
import types

# Exit statuses the parent turns into a `killed_reason`; a program that exits with them itself only fools itself.
EXIT_MEMORY = 120
EXIT_CPU_TIME = 121
EXIT_SETUP_FAILED = 122

PROGRAM_FILENAME = "<sandboxed>"
COMPLETION_BEGIN_EVENT = "cognate.sandbox.begin"
COMPLETION_EVENT = "cognate.sandbox.completed"

# Linux constants (include/uapi/linux/{prctl,capability,mount,fcntl}.h).
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CAP_SETUID = 7
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the syscall tables were unified)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

# Audit events that are refused outright: process creation, signals to other processes, new namespaces, the
# network, native code, and the introspection that could reach the hook itself.
BLOCKED_EVENTS = frozenset(
    {
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "os.posix_spawn",
        "os.setns",
        "os.spawn",
        "os.system",
        "os.unshare",
        "subprocess.Popen",
        "cpython.PyInterpreterState_New",
        "gc.get_objects",
        "gc.get_referents",
        "gc.get_referrers",
        "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
    }
)
BLOCKED_EVENT_PREFIXES = ("socket.", "ctypes.")
# Modules whose functions create processes or run native code without raising an audit event of their own.
BLOCKED_MODULES = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_interpreters"})
# Events that change the file system: event -> (index of a path argument, index of its dir_fd argument or None).
WRITE_EVENTS = {
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.link": ((0, 2), (1, 3)),  # the source too: a hard link to an outside file would make it writable
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.rmdir": ((0, 1),),
    "os.setxattr": ((0, None),),
    "os.symlink": ((1, 2),),  # where the link is made; what it points to is checked when it is opened
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "sqlite3.connect": ((0, None),),  # SQLite opens its files in C, without an "open" event
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
WRITABLE_OUTSIDE = frozenset({os.devnull})


class CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def checked(result: int, what: str) -> None:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    # prctl is variadic: pass full-width zeros, since the kernel rejects garbage in the unused arguments.
    zero = ctypes.c_ulong(0)
    checked(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero), f"prctl({option})")


def mount_setattr(libc: ctypes.CDLL, path: str, flags: int, attr: MountAttr) -> None:
    result = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    checked(result, f"mount_setattr({path})")


def make_everything_read_only_but(libc: ctypes.CDLL, workdir: str, disk_mb: int, parent_mounts: str) -> None:
    """In our private mount namespace: a fresh tmpfs on `workdir`, every other mount read-only."""
    if os.readlink("/proc/self/ns/mnt") == parent_mounts:  # never the parent's mounts, whatever went wrong
        raise OSError("not in a mount namespace of our own; refusing to remount")
    options = f"size={disk_mb}m,mode=0700".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    mounted = libc.mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", ctypes.c_ulong(flags), options)
    checked(mounted, f"mount tmpfs on {workdir}")
    mount_setattr(libc, "/", AT_RECURSIVE, MountAttr(attr_set=MOUNT_ATTR_RDONLY))
    mount_setattr(libc, workdir, 0, MountAttr(attr_clr=MOUNT_ATTR_RDONLY))
    os.chdir(workdir)  # the old cwd is the directory under the tmpfs


def set_capabilities(libc: ctypes.CDLL, mask: int) -> None:
    data = (CapData * 2)()
    data[0].effective = data[0].permitted = mask
    checked(libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")


def drop_privileges(libc: ctypes.CDLL, throwaway_uid: int | None) -> None:
    """Give up every capability, for good (no_new_privs keeps exec from granting them back).

    The kernel does not apply RLIMIT_NPROC to root, so a root parent passes `throwaway_uid`: a uid nothing else
    uses becomes the real, effective and saved uid (so RLIMIT_NPROC counts this sandbox's processes only, and
    there is no way back to uid 0), while the file-system uid stays 0 so the interpreter and its standard
    library stay readable wherever they are installed (e.g. under /root, mode 0700).
    """
    if throwaway_uid is not None:
        prctl(libc, PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresuid(throwaway_uid, throwaway_uid, throwaway_uid)
        set_capabilities(libc, 1 << CAP_SETUID)
        libc.setfsuid(ctypes.c_uint32(0))
        if libc.setfsuid(ctypes.c_uint32(0xFFFFFFFF)) != 0:  # an invalid uid only reports the current one
            raise OSError("setfsuid(0) failed")
    set_capabilities(libc, 0)
    prctl(libc, PR_SET_NO_NEW_PRIVS, 1)


def set_resource_limits(memory_mb: int, cpu_s: int, disk_mb: int, max_processes: int) -> None:
    megabyte = 1024 * 1024
    limits = {
        resource.RLIMIT_AS: (memory_mb * megabyte,) * 2,
        # SIGXCPU at the soft limit (handled below), SIGKILL one second later if the handler never runs.
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        resource.RLIMIT_FSIZE: (disk_mb * megabyte,) * 2,
        resource.RLIMIT_NPROC: (max_processes,) * 2,  # threads count too
        resource.RLIMIT_NOFILE: (128, 128),
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))
    signal.signal(signal.SIGXCPU, lambda signum, frame: os._exit(EXIT_CPU_TIME))


def install_audit_hook(workdir: str) -> None:
    """Refuse process creation, networking, native code and writes outside `workdir`, at the Python level.

    A tripwire behind the kernel's limits, not a boundary of its own: code written to defeat it can (for
    example by replacing the standard-library functions it calls). Everything it uses is bound here, so
    rebinding a module attribute later does not change what it calls.
    """
    realpath, join, isdir, readlink = os.path.realpath, os.path.join, os.path.isdir, os.readlink
    fspath, fsdecode = os.fspath, os.fsdecode
    root = realpath(workdir)
    root_prefix = root.rstrip(os.sep) + os.sep

    def resolve(path, dir_fd=None) -> str | None:
        if isinstance(path, int):  # an open descriptor: find the file it names (None for pipes, sockets...)
            target = readlink(f"/proc/self/fd/{path}")
            return target if target.startswith("/") else None
        path = fsdecode(fspath(path))
        if dir_fd is not None and dir_fd >= 0 and not path.startswith("/"):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def inside(resolved: str | None) -> bool:
        return resolved is None or resolved in (root, *WRITABLE_OUTSIDE) or resolved.startswith(root_prefix)

    def refuse(event: str, detail: str = "") -> None:
        raise PermissionError(f"sandbox: {event} {detail}".rstrip())

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_EVENT_PREFIXES):
            refuse(event, "is not allowed")
        elif event == "import" and args[0] in BLOCKED_MODULES:
            refuse(event, f"of {args[0]} is not allowed")
        elif event == "object.__setattr__" and args[1] == "__code__":
            refuse(event, "of __code__ is not allowed")
        elif event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # an already-open descriptor was checked when it was opened
                return
            resolved = resolve(path)
            writes = (flags or 0) & WRITE_FLAGS or (mode is not None and any(c in mode for c in "wax+"))
            # An outside directory opened for reading would give a dir_fd for os.open(..., dir_fd=fd), whose
            # "open" event does not show the dir_fd.
            if not inside(resolved) and (writes or isdir(resolved)):
                refuse(event, f"of {resolved!r} outside the sandbox")
        elif event in WRITE_EVENTS:
            for path_index, dir_fd_index in WRITE_EVENTS[event]:
                dir_fd = None if dir_fd_index is None else args[dir_fd_index]
                resolved = resolve(args[path_index], dir_fd)
                if not inside(resolved):
                    refuse(event, f"of {resolved!r} outside the sandbox")

    sys.addaudithook(hook)


def confine(settings: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    workdir = settings["workdir"]
    if settings["namespaces"]:
        make_everything_read_only_but(libc, workdir, settings["disk_mb"], settings["parent_mount_namespace"])
    os.chdir(workdir)
    set_resource_limits(
        settings["memory_mb"], settings["cpu_s"], settings["disk_mb"], settings["max_processes"]
    )
    drop_privileges(libc, settings["throwaway_uid"])
    # Die with the supervisor, should anything kill it (set after the uid change, which would clear it).
    prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    if settings["audit_hook"]:
        install_audit_hook(workdir)


def install_completion_signal(token: bytes, completion_fd: int) -> None:
    """Write `token` to `completion_fd` once the harness frame that raised the begin event raises the completion
    event (see the module docstring). Also refuses what could reach the token or move that frame: tracing,
    object-graph walks, native code and reading process memory."""
    write, getframe, fsdecode, realpath = os.write, sys._getframe, os.fsdecode, os.path.realpath
    harness_frame = []

    def hook(event: str, args: tuple) -> None:
        if event == COMPLETION_BEGIN_EVENT:
            if not harness_frame:
                harness_frame.append(getframe(1))
        elif event == COMPLETION_EVENT:
            if harness_frame and getframe(1) is harness_frame[0]:
                write(completion_fd, token)
        elif event in ("sys.settrace", "sys.setprofile") or event.startswith(("gc.get_", "ctypes.")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "open" and isinstance(args[0], (str, bytes)):
            path = realpath(fsdecode(args[0]))  # /proc/self/mem, or "self/mem" from /proc, alike
            if path.startswith("/proc/") and path.endswith(("/mem", "/map_files")):
                raise PermissionError(f"sandbox: open of {path!r} is not allowed")

    sys.addaudithook(hook)


def run_program(parts: list[str], completion: bool) -> None:
    """Execute `parts` in order as one `__main__` module, with their source available to tracebacks.

    Every part is compiled before any runs, and `exec` is bound here, so the program cannot change what the
    later parts (the asserts) are or how they run.
    """
    module = types.ModuleType("__main__")
    module.__file__ = PROGRAM_FILENAME
    sys.modules["__main__"] = module
    source = "".join(part if part.endswith("\n") else part + "\n" for part in parts)
    linecache.cache[PROGRAM_FILENAME] = (
        len(source),
        None,
        source.splitlines(keepends=True),
        PROGRAM_FILENAME,
    )
    run, audit = exec, sys.audit
    try:
        compiled, line = [], 0
        for part in parts:  # blank lines in front keep each part's line numbers those of `source`
            compiled.append(compile("\n" * line + part, PROGRAM_FILENAME, "exec"))
            line += part.count("\n") + (not part.endswith("\n"))
        if completion:
            audit(COMPLETION_BEGIN_EVENT)
        for code in compiled:
            run(code, module.__dict__)
    except MemoryError:
        os.write(2, b"MemoryError: the sandbox's memory limit was reached\n")
        os._exit(EXIT_MEMORY)
    except Exception as error:  # the program's own traceback, without this file's frames
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)
    if completion:
        audit(COMPLETION_EVENT)


def prepare(settings: dict) -> list[str]:
    """Read the request, confine this process, arm the completion signal; returns the program's parts.

    A completion token goes into the completion hook and nowhere else: the request is parsed here, so no frame
    still running when the program starts holds it.
    """
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the program reads an empty stdin, not our pipe
    confine(settings)
    if request["completion_token"] is not None:
        install_completion_signal(request["completion_token"].encode(), settings["completion_fd"])
    return request["parts"]


def run_confined(settings: dict) -> None:
    """The program process: confine, then run the program. Never returns."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the supervisor blocks SIGCHLD; the program must not
    try:
        parts = prepare(settings)
    except (OSError, ValueError) as error:
        print(f"sandbox setup failed: {error}", file=sys.stderr, flush=True)
        os._exit(EXIT_SETUP_FAILED)
    run_program(parts, completion=settings["completion_fd"] is not None)
    sys.exit(0)  # a normal interpreter exit (threads joined, buffers flushed), never back into the supervisor


def children_of(pid: int) -> list[int]:
    """Live children of `pid`, from /proc (the namespace's own /proc when there is one)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def kill_all_descendants() -> None:
    """SIGKILL and reap children until there are none. As a subreaper we inherit the children of every child that
    dies, so no descendant is left when waitpid reports that we have no children at all."""
    me = os.getpid()
    while True:
        for child in children_of(me):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def wait_for(pid: int, timeout_s: float) -> int | None:
    """The wait status of child `pid`, or None when it is still running after `timeout_s`; reaps any other child
    (orphans re-parented to us) on the way. SIGCHLD is blocked, so sigtimedwait sleeps until a child changes."""
    deadline = time.monotonic() + timeout_s
    while True:
        while True:
            try:
                reaped, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None  # cannot happen while `pid` is unreaped
            if reaped == 0:
                break
            if reaped == pid:
                return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        signal.sigtimedwait([signal.SIGCHLD], min(remaining, 1.0))


def supervise(settings: dict) -> None:
    """Fork the program, wait for it within the wall-clock limit, kill everything it left, report. Never
    returns."""
    report_fd = settings["report_fd"]
    prctl(ctypes.CDLL(None, use_errno=True), PR_SET_CHILD_SUBREAPER, 1)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    program = os.fork()
    if program == 0:
        os.close(report_fd)
        run_confined(settings)
    if settings["completion_fd"] is not None:
        os.close(settings["completion_fd"])
    os.close(0)  # only the program reads the request
    status = wait_for(program, settings["timeout_s"])
    kill_all_descendants()
    os.write(report_fd, json.dumps({"wait_status": status}).encode())
    os._exit(0)


def main() -> None:
    supervise(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
