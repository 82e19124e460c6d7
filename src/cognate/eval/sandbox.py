"""Run untrusted Python (model-written MBPP solutions) in a separate, confined process. Linux only.

The layers, each meant to hold if another fails (docs/evaluation.md says what each stops and what it cannot):

1. A separate `python -I -S -B` process (isolated mode: no environment variables, no user or site packages, no
   current directory on the path) in a new session, with a clean environment, run in a fresh temporary folder
   that is deleted afterwards. It is a supervisor (a child subreaper) that forks the program, ends it at the
   wall-clock timeout and then kills every process it left, whatever session or process group they moved to
   (`sandbox_child.py` says how).
2. Linux namespaces, when `unshare` works here (probed once per process): a network namespace (only a downed
   loopback, so no network at all), a private mount namespace in which every mount is read-only except a
   size-limited tmpfs over the throwaway folder, a PID namespace with its own /proc (the program sees only its
   own processes, and they all die with it) and an IPC namespace.
3. Resource limits: CPU time, address space, file size, processes (threads included), open files, no core
   dumps. Every capability is dropped and no_new_privs set. Root is exempt from the process limit, so under
   root the program runs with a real uid that nothing else uses (it keeps root's file-system uid for reading).
4. An audit hook installed in the child before the program runs: it refuses process creation, sockets,
   ctypes, signals to other processes, and writes outside the folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cognate.eval.sandbox_child import EXIT_CPU_TIME, EXIT_MEMORY, EXIT_SETUP_FAILED

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
TAIL_BYTES = 8192
MIN_MEMORY_MB = 64  # the interpreter itself needs about 30 MB of address space
# How long past the timeout the parent waits for the supervisor before killing it itself.
SUPERVISOR_GRACE_S = 5.0
# A root parent runs the program under a uid in [base, base + span): far above the ranges systems hand out.
THROWAWAY_UID_BASE = 1 << 30
THROWAWAY_UID_SPAN = 1 << 24


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed program.

    `passed`: it exited with status 0 within its limits. `returncode` is negative when a signal killed it.
    `killed_reason`: None, or why it was stopped ("wall-clock timeout", "memory limit", "cpu time limit",
    "killed by SIGSEGV", "sandbox setup failed"). `stdout`/`stderr`: the last TAIL_BYTES of each stream.
    `namespaces`: whether the namespace layer was in place. `completed`: for `check_mbpp_solution`, whether the
    harness signalled that the last assert returned (always False for `run_untrusted`).
    """

    passed: bool
    returncode: int
    timed_out: bool
    killed_reason: str | None
    stdout: str
    stderr: str
    duration_s: float
    namespaces: bool
    completed: bool = False


@dataclass(frozen=True)
class SandboxLimits:
    """The limits of one run; `run_untrusted` documents each."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_processes: int = 16
    disk_mb: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s}")
        if self.memory_mb < MIN_MEMORY_MB:
            raise ValueError(f"memory_mb must be at least {MIN_MEMORY_MB}, got {self.memory_mb}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be at least 1, got {self.max_processes}")
        if self.disk_mb < 1:
            raise ValueError(f"disk_mb must be at least 1, got {self.disk_mb}")


def run_untrusted(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 16,
    disk_mb: int = 64,
    namespaces: bool | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run the Python program `code` in the sandbox and report how it ended.

    `max_processes` counts every process and thread of the program (the audit hook refuses new processes
    anyway); `disk_mb` caps each file written, and the folder's total when namespaces are in place.
    `namespaces`: None uses them when available, True requires them, False leaves them out. `audit_hook=False`
    exists to test the kernel layers on their own.
    """
    if sys.platform != "linux":
        raise RuntimeError(f"the sandbox needs Linux (rlimits, /proc, namespaces); this is {sys.platform}")
    limits = SandboxLimits(
        timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes, disk_mb=disk_mb
    )
    unavailable = namespaces_unavailable_reason()
    if namespaces and unavailable:
        raise RuntimeError(f"namespaces were required but are unavailable: {unavailable}")
    use_namespaces = unavailable is None if namespaces is None else namespaces
    return _run([code], limits, use_namespaces=use_namespaces, audit_hook=audit_hook)


def check_mbpp_solution(
    code: str,
    test_list: list[str],
    test_setup_code: str = "",
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
) -> SandboxResult:
    """Run an MBPP candidate followed by the task's asserts; `passed` means every assert ran and held.

    The order is candidate, setup, tests: MBPP's setup code uses what the solution defines (e.g. `Node`).
    A random token that only the harness holds, written on a pipe of its own once the last assert returned,
    tells a completed run from one that exited early with status 0; it is never part of the program text
    (`sandbox_child.py` says how the candidate is kept from it).
    """
    if sys.platform != "linux":
        raise RuntimeError(f"the sandbox needs Linux (rlimits, /proc, namespaces); this is {sys.platform}")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    token = secrets.token_hex(16)
    parts = [code, test_setup_code, *test_list]
    use_namespaces = namespaces_unavailable_reason() is None
    result = _run(parts, limits, use_namespaces=use_namespaces, audit_hook=True, completion_token=token)
    return replace(result, passed=result.passed and result.completed)


@functools.cache
def namespaces_unavailable_reason() -> str | None:
    """None when the namespace layer works on this machine, else why it does not (probed once, by a real run)."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = _run([""], SandboxLimits(timeout_s=30.0), use_namespaces=True, audit_hook=True)
    if probe.passed:
        return None
    return f"a probe run ended with {probe.killed_reason or probe.returncode}: {probe.stderr.strip()[-300:]}"


def describe_isolation() -> str:
    """One line for reports: which layers `run_untrusted` applies on this machine."""
    unavailable = namespaces_unavailable_reason()
    if unavailable is None:
        return "namespaces (network, mount read-only, pid, ipc) + rlimits + dropped privileges + audit hook"
    return f"rlimits + dropped privileges + audit hook; no namespaces ({unavailable})"


def _unshare_command() -> list[str]:
    flags = [
        "--net",
        "--ipc",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]
    if os.geteuid() != 0:  # an unprivileged user needs a user namespace to create the others
        flags = ["--user", "--map-root-user", *flags]
    return [shutil.which("unshare") or "unshare", *flags, "--"]


def _throwaway_uid() -> int | None:
    """Under root, a random uid for the program: RLIMIT_NPROC then counts its processes and nothing else's.

    It must be mapped in our user namespace: every uid is on an ordinary host, only a range in a rootless
    container. With only uid 0 mapped there is nothing to switch to (root is then usually an ordinary user
    outside, whose processes RLIMIT_NPROC does count).
    """
    if os.geteuid() != 0:
        return None
    mapped = []  # [first, last] ranges of uids other than 0
    for line in Path("/proc/self/uid_map").read_text().splitlines():
        first, _, count = map(int, line.split())
        if first + count > 1:
            mapped.append((max(first, 1), first + count - 1))
    preferred = (THROWAWAY_UID_BASE, THROWAWAY_UID_BASE + THROWAWAY_UID_SPAN - 1)
    if any(first <= preferred[0] and preferred[1] <= last for first, last in mapped):
        return preferred[0] + secrets.randbelow(THROWAWAY_UID_SPAN)
    if not mapped:
        return None
    first, last = max(mapped, key=lambda bounds: bounds[1] - bounds[0])
    return first + secrets.randbelow(last - first + 1)


def _clean_environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _run(
    parts: list[str],
    limits: SandboxLimits,
    *,
    use_namespaces: bool,
    audit_hook: bool,
    completion_token: str | None = None,
) -> SandboxResult:
    """Run `parts` as one program. With `completion_token`, `completed` says whether the harness wrote it after
    the last part returned."""
    report_read, report_write = os.pipe()
    completion_read, completion_write = os.pipe() if completion_token is not None else (None, None)
    inherited = [fd for fd in (report_write, completion_write) if fd is not None]
    with (
        tempfile.TemporaryDirectory(prefix="cognate-sandbox-") as workdir,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
    ):
        settings = {
            "workdir": workdir,
            "namespaces": use_namespaces,
            "parent_mount_namespace": os.readlink("/proc/self/ns/mnt"),
            "audit_hook": audit_hook,
            "timeout_s": limits.timeout_s,
            "memory_mb": limits.memory_mb,
            "cpu_s": math.ceil(limits.timeout_s) + 1,  # CPU time can outrun wall time only with threads
            "disk_mb": limits.disk_mb,
            "max_processes": limits.max_processes,
            "throwaway_uid": _throwaway_uid(),
            "report_fd": report_write,
            "completion_fd": completion_write,
        }
        request = {"parts": parts, "completion_token": completion_token}
        prefix = _unshare_command() if use_namespaces else []
        command = [*prefix, sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT), json.dumps(settings)]
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                cwd=workdir,
                env=_clean_environment(workdir),
                start_new_session=True,
                pass_fds=inherited,
            )
        finally:
            for fd in inherited:  # the read ends see EOF once every process of the run is gone
                os.close(fd)
        backstop_timed_out = False
        try:
            process.communicate(
                json.dumps(request).encode("utf-8"), timeout=limits.timeout_s + SUPERVISOR_GRACE_S
            )
        except subprocess.TimeoutExpired:
            backstop_timed_out = True  # the supervisor itself did not end in time (e.g. killed, or starved)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        duration_s = time.monotonic() - started
        stdout_text, stderr_text = _tail(stdout), _tail(stderr)
        report = _read_pipe(report_read)
        completed = completion_token is not None and completion_token.encode() in _read_pipe(completion_read)
    wait_status = json.loads(report)["wait_status"] if report else None
    timed_out = backstop_timed_out or (bool(report) and wait_status is None)
    if wait_status is not None:
        returncode = os.waitstatus_to_exitcode(wait_status)
    elif timed_out:
        returncode = -signal.SIGKILL
    else:  # no report: the supervisor itself failed
        returncode = process.returncode
    return SandboxResult(
        passed=returncode == 0 and not timed_out,
        returncode=returncode,
        timed_out=timed_out,
        killed_reason=_killed_reason(returncode, timed_out),
        stdout=stdout_text,
        stderr=stderr_text,
        duration_s=duration_s,
        namespaces=use_namespaces,
        completed=completed,
    )


def _read_pipe(fd: int | None) -> bytes:
    """Everything written to the pipe `fd` (whose writers are all gone), then closed."""
    if fd is None:
        return b""
    chunks = []
    with os.fdopen(fd, "rb") as pipe:
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := pipe.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _killed_reason(returncode: int, timed_out: bool) -> str | None:
    if timed_out:
        return "wall-clock timeout"
    if returncode == EXIT_MEMORY:
        return "memory limit"
    if returncode in (EXIT_CPU_TIME, -signal.SIGXCPU):
        return "cpu time limit"
    if returncode == EXIT_SETUP_FAILED:
        return "sandbox setup failed"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return None


def _tail(file) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - TAIL_BYTES))
    return file.read().decode("utf-8", errors="replace")
