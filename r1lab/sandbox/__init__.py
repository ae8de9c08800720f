"""Run untrusted, model-written Python in an isolated, resource-limited child process.

Isolation comes from bubblewrap (``bwrap``): the child gets its own pid, ipc, uts and network
namespaces (no network at all), a root filesystem made only of read-only binds of what the Python
runtime needs (``/usr``, the ``/lib*`` links, the interpreter's install prefix), a private size-capped
tmpfs ``/tmp`` as working directory, a minimal ``/proc`` and ``/dev``, and an empty environment. The
project, the data and ``/home`` are simply not there.

Inside, a trusted harness (:mod:`r1lab.sandbox.bootstrap`) applies rlimits -- CPU seconds, address
space, process count, file size, open files, no core dumps -- and then runs the program as
``__main__``, followed by its tests when there are any. The interpreter runs with ``-I -S``:
isolated mode and no ``site``, so nothing from the host's site-packages or environment leaks in;
programs get the standard library only.

**Completion.** A program that exits -- ``sys.exit(0)``, ``os._exit(0)``, a signal, a thread, an
atexit handler -- has exit status 0 without having run its tests. So :attr:`SandboxResult.passed`
needs more than status 0: a per-run random sentinel that the harness writes to a private pipe only
once the last line of the tests (or of the program, without tests) has run. The sentinel reaches
the harness through a pipe it drains and closes before the program starts; it is never in the
program's source, argv, environment or files. The bootstrap's docstring says how the harness keeps
it from the program while the program runs.

**Memory and processes** are bounded for the whole program, not per process: see
:mod:`r1lab.sandbox.limits` (a cgroup per run where the machine offers one, else a single process
holding the whole budget; a seccomp filter refuses new user namespaces, memfds and SysV shared
memory either way).

Two ways of dropping privileges, because ``RLIMIT_NPROC`` is ignored by the kernel for processes
whose host uid is 0:

* caller is not root: ``--unshare-all`` with a user namespace (the sandbox maps to the caller's uid),
  ``--disable-userns`` and ``--cap-drop ALL``. Since Linux 5.14 the process limit counts only the
  processes of that user namespace, i.e. of this one sandbox.
* caller is root: a user namespace would map the sandbox onto host uid 0, where the process limit
  does not apply. So bwrap runs privileged *without* a user namespace, and the harness switches to
  an unprivileged uid (one per concurrently running sandbox, so their process budgets are separate)
  before the program starts; that switch drops every capability. bwrap always sets no_new_privs and
  mounts its binds nosuid.

The parent enforces a wall-clock timeout and an output cap. A run ends when the program exits or
when the outer bwrap is killed (then, with ``--die-with-parent``, the sandbox's pid-namespace init
dies with it); either way the kernel kills every process left in the namespace, daemonized
grandchildren included. :func:`run_python` returns only once that init is gone (its pid comes from
bwrap's ``--info-fd``), so nothing of the run is left behind.

Without bwrap (or when bwrap fails its self-check) :func:`run_python` refuses with
:class:`SandboxUnavailable` unless the caller opts in with ``allow_unsafe=True`` or the environment
variable ``R1LAB_ALLOW_UNSANDBOXED=1``; then the program runs as a plain child process that still
gets the harness, the rlimits, the timeout, the output cap, a scratch working directory, a cleared
environment and (where available) the run cgroup -- but no filesystem or network isolation, no
seccomp filter (and, run as root without a cgroup, no process limit).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from . import limits

__all__ = [
    "ENV_ALLOW_UNSANDBOXED",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailable",
    "check_sandbox",
    "isolated",
    "run_many",
    "run_python",
    "sandbox_available",
]

ENV_ALLOW_UNSANDBOXED = "R1LAB_ALLOW_UNSANDBOXED"

# Where the program and its tests live inside the sandbox (files on the private tmpfs).
_MAIN_PATH = "/tmp/main.py"
_TESTS_PATH = "/tmp/tests.py"
_TMPFS_BYTES = 64 * 1024 * 1024
_FILE_SIZE_BYTES = 16 * 1024 * 1024
_OPEN_FILES = 1024
# Unprivileged uids used when the caller is root: one block of 64 per host process, one uid per
# concurrently running sandbox. Far above any uid a distribution hands out.
_UID_BASE = 2_000_000_000
_UIDS_PER_PROCESS = 64
# The harness's exit status when something other than the tests' last line asked for the sentinel.
EXIT_FORGERY = 121

_BOOTSTRAP = (Path(__file__).parent / "bootstrap.py").read_text(encoding="utf-8")


def _new_sentinel() -> bytes:
    """The per-run proof of completion. Raw random bytes rather than hex, so that not even its
    shape stands out in memory."""
    return secrets.token_bytes(32)


class SandboxUnavailable(RuntimeError):
    """No working isolation on this machine and the caller did not opt in to running without it."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    ``returncode`` is the program's exit status (negative or >128 when it was killed by a signal);
    ``completed`` means the harness saw the last line of the tests (or of the program, without
    tests) run, proven by the run's sentinel; ``timed_out`` means the wall-clock limit was hit and
    the run was killed; ``output_truncated`` means it wrote more than the output cap and was
    killed; ``memory_exceeded`` means the kernel killed one of its processes for going over the
    program's memory budget. ``memory_peak_bytes`` is the most memory the whole program held (None
    without a run cgroup or where the kernel does not report it).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool = False
    sandboxed: bool = True
    duration_s: float = 0.0
    completed: bool = False
    memory_exceeded: bool = False
    memory_peak_bytes: int | None = None

    @property
    def passed(self) -> bool:
        """True when the program (and its tests) ran to the last line and exited with status 0,
        within its time, output and memory limits. An early ``sys.exit(0)`` does not pass."""
        return (self.completed and self.returncode == 0 and not self.timed_out
                and not self.output_truncated and not self.memory_exceeded)


# --------------------------------------------------------------------------------------------
# Layout of the sandbox filesystem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Runtime:
    python: str  # interpreter path, valid both on the host and inside the sandbox
    bind_args: tuple[str, ...]  # bwrap arguments that make the runtime visible, read-only


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@lru_cache(maxsize=1)
def _runtime() -> _Runtime:
    """Read-only binds of only what the interpreter needs: /usr, the /lib* and /bin links, and
    the Python install prefix (found from sys.base_prefix, never the virtualenv, /root or /home)."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # The dynamic loader looks here first; harmless and read-only.
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    roots = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    extra = [prefix] if not any(_is_under(prefix, r) for r in roots) else []
    if not any(_is_under(python, r) for r in roots + extra):
        extra.append(os.path.dirname(python))
    for path in extra:
        # bwrap copies the modes of the host's parent directories (e.g. /root is 0700), which
        # would hide the runtime from the unprivileged sandbox user: create them world-readable.
        parents: list[str] = []
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            parents.insert(0, parent)
            parent = os.path.dirname(parent)
        for directory in parents:
            args += ["--perms", "0755", "--dir", directory]
        args += ["--ro-bind", path, path]
    return _Runtime(python=python, bind_args=tuple(args))


def _bwrap_command(bwrap: str, files: dict[str, int], info_fd: int, seccomp_fd: int | None,
                   as_root: bool) -> list[str]:
    if as_root:
        # See the module docstring: no user namespace under root, the harness drops to a uid.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    file_args = [arg for path, fd in files.items()
                 for arg in ("--perms", "0644", "--file", str(fd), path)]
    return [
        bwrap,
        *namespaces,
        "--die-with-parent",
        "--new-session",
        "--info-fd", str(info_fd),  # bwrap reports the pid of the namespace's init here
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        *_runtime().bind_args,
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(_TMPFS_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
        *file_args,
        "--remount-ro", "/",  # the root tmpfs has no size cap; only the capped /tmp is writable
        "--chdir", "/tmp",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--",
    ]


class _UidSlots:
    """Hands out distinct unprivileged uids to concurrently running root-mode sandboxes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()

    def acquire(self) -> int:
        base = _UID_BASE + (os.getpid() % 2**20) * _UIDS_PER_PROCESS
        with self._lock:
            slot = 0
            while base + slot in self._busy:
                slot += 1
            uid = base + slot  # beyond 64 concurrent runs, blocks of neighbouring pids may overlap
            self._busy.add(uid)
            return uid

    def release(self, uid: int) -> None:
        with self._lock:
            self._busy.discard(uid)


_UIDS = _UidSlots()


# --------------------------------------------------------------------------------------------
# Self-check and opt-in
# --------------------------------------------------------------------------------------------

_check_lock = threading.Lock()
_check_result: tuple[bool, str] | None = None


def check_sandbox() -> None:
    """Raise :class:`SandboxUnavailable` (with the reason) unless bwrap isolation works here.

    The check (a trivial program run through the real sandbox) is done once per process.
    """
    global _check_result
    with _check_lock:
        if _check_result is None:
            _check_result = _self_check()
    ok, reason = _check_result
    if not ok:
        raise SandboxUnavailable(
            f"sandbox unavailable: {reason}. Install bubblewrap (Debian/Ubuntu: "
            f"`apt-get install bubblewrap`) on a kernel that allows namespaces, or opt in to running "
            f"model-written code WITHOUT isolation with allow_unsafe=True or "
            f"{ENV_ALLOW_UNSANDBOXED}=1."
        )


def sandbox_available() -> bool:
    """True when bwrap isolation works on this machine."""
    try:
        check_sandbox()
    except SandboxUnavailable:
        return False
    return True


def _self_check() -> tuple[bool, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "the `bwrap` executable (package bubblewrap) is not on PATH"
    try:
        result = _run_bwrap(bwrap, "print(6 * 7)", None, "", 10.0, 256, 64 * 1024, 16)
    except OSError as exc:
        return False, f"bwrap could not be started: {exc}"
    if not result.passed or result.stdout.strip() != "42":
        detail = (result.stderr or result.stdout).strip()[-500:]
        return False, f"bwrap self-check failed (exit {result.returncode}): {detail}"
    return True, ""


def _unsafe_allowed(allow_unsafe: bool | None) -> bool:
    if allow_unsafe is not None:
        return allow_unsafe
    return os.environ.get(ENV_ALLOW_UNSANDBOXED, "").strip().lower() in {"1", "true", "yes"}


def isolated(allow_unsafe: bool | None = None) -> bool:
    """Whether model-written code would run isolated: True when bwrap works here, False when it does not but
    running without it is allowed (allow_unsafe, or None: the R1LAB_ALLOW_UNSANDBOXED variable).

    Raises:
        SandboxUnavailable: no isolation here and running without it was not allowed.
    """
    try:
        check_sandbox()
    except SandboxUnavailable:
        if not _unsafe_allowed(allow_unsafe):
            raise
        return False
    return True


_warned_unsafe = False


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_python(
    code: str,
    *,
    tests: str | None = None,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 256 * 1024,
    max_processes: int = 32,
    allow_unsafe: bool | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox and return what it did.

    Args:
        code: the program (run as ``__main__``; standard library only).
        tests: Python run after the program, in the same namespace but compiled on its own;
            the run is ``completed`` only if its last line is reached. Builtins the program
            changed are restored before it.
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; the CPU-time rlimit is set just above it.
        memory_mb: memory budget of the whole program -- all its processes together, the files
            it writes to ``/tmp`` included -- and the address-space limit of each process.
        max_output_bytes: at most this many bytes of stdout and of stderr are kept; a program
            that writes more is killed (``output_truncated``).
        max_processes: process/thread limit inside the sandbox (fork bombs hit it); where no
            cgroup bounds the run, one process only (so that the memory budget cannot multiply).
        allow_unsafe: run without isolation when bwrap is unavailable (None: read the
            ``R1LAB_ALLOW_UNSANDBOXED`` environment variable).

    Raises:
        SandboxUnavailable: no isolation here and running without it was not allowed.
    """
    global _warned_unsafe
    if not isolated(allow_unsafe):
        if not _warned_unsafe:
            _warned_unsafe = True
            warnings.warn("r1lab.sandbox: running model-written code WITHOUT isolation "
                          "(rlimits and a timeout only)", RuntimeWarning, stacklevel=2)
        return _run_unsafe(code, tests, stdin, timeout_s, memory_mb, max_output_bytes,
                           max_processes)
    return _run_bwrap(shutil.which("bwrap") or "bwrap", code, tests, stdin, timeout_s, memory_mb,
                      max_output_bytes, max_processes)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


class _RunSetup:
    """The per-run pieces both launchers share: the sentinel and its two pipes, and the run's
    cgroup or, without one, the fallback rlimits."""

    def __init__(self, memory_mb: int, max_processes: int, extra_tasks: int,
                 fallback: bool) -> None:
        self.sentinel = _new_sentinel()
        self.key_read, key_write = os.pipe()
        os.write(key_write, self.sentinel)  # 32 bytes: fits the pipe buffer, never blocks
        os.close(key_write)
        self.report_read, self.report_write = os.pipe()
        self.cgroup: limits.RunCgroup | None = None
        layout = limits.cgroup_layout()
        if layout is not None:
            try:
                # + 2: bwrap itself and its pid-namespace init
                self.cgroup = limits.RunCgroup(layout, int(memory_mb) * limits.MIB,
                                               max_processes + extra_tasks + 2)
            except OSError:
                self.cgroup = None
        self.address_space = int(memory_mb) * limits.MIB
        self.nproc = max_processes
        if self.cgroup is None and fallback:
            self.address_space, self.nproc = limits.fallback_limits(int(memory_mb), extra_tasks)

    def launcher(self) -> list[str]:
        return limits.launcher_prefix(self.cgroup.procs_files) if self.cgroup else []

    def harness_argv(self, python: str, main_path: str, tests_path: str, timeout_s: float,
                     uid: int, undumpable: bool) -> list[str]:
        cpu_s = max(1, math.ceil(timeout_s)) + 1
        return [python, "-I", "-S", "-c", _BOOTSTRAP, main_path, tests_path, str(self.key_read),
                str(self.report_write), str(cpu_s), str(self.address_space), str(self.nproc),
                str(_FILE_SIZE_BYTES), str(_OPEN_FILES), str(uid), "1" if undumpable else "0"]

    def finish(self) -> tuple[bool, bool, int | None]:
        """(completed, memory exceeded, peak bytes), once every process of the run is gone."""
        peak, oom = None, False
        if self.cgroup is not None:
            self.cgroup.kill_all()
            peak, oom = self.cgroup.usage()
            self.cgroup.remove()
        os.set_blocking(self.report_read, False)
        report = b""
        try:
            while len(report) <= len(self.sentinel):
                chunk = os.read(self.report_read, 4096)
                if not chunk:
                    break
                report += chunk
        except BlockingIOError:
            pass
        return secrets.compare_digest(report, self.sentinel), oom, peak

    def close(self) -> None:
        for fd in (self.key_read, self.report_read, self.report_write):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.cgroup is not None:
            self.cgroup.remove()  # a no-op after finish(); here for runs that failed to start


def _memfd(name: str, text: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, _encode(text))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_bwrap(bwrap: str, code: str, tests: str | None, stdin: str, timeout_s: float,
               memory_mb: int, max_output_bytes: int, max_processes: int) -> SandboxResult:
    as_root = os.geteuid() == 0
    uid = _UIDS.acquire() if as_root else -1
    setup = None
    to_close: list[int] = []
    try:
        # Without root, bwrap's init runs as the caller inside the user namespace and counts
        # against the sandbox's process limit.
        setup = _RunSetup(memory_mb, max_processes, 0 if as_root else 1, fallback=True)
        files = {_MAIN_PATH: _memfd("r1lab-sandbox-program", code)}
        to_close += files.values()
        if tests is not None:
            files[_TESTS_PATH] = _memfd("r1lab-sandbox-tests", tests)
            to_close.append(files[_TESTS_PATH])
        info_read, info_write = os.pipe()  # (_execute closes info_write once bwrap has it)
        to_close.append(info_read)
        seccomp_fd = None
        bpf = limits.seccomp_filter()
        if bpf is not None:
            seccomp_fd, seccomp_write = os.pipe()
            to_close.append(seccomp_fd)
            os.write(seccomp_write, bpf)  # a few hundred bytes: fits the pipe buffer
            os.close(seccomp_write)
        argv = (setup.launcher()
                + _bwrap_command(bwrap, files, info_write, seccomp_fd, as_root)
                + setup.harness_argv(_runtime().python, _MAIN_PATH,
                                     _TESTS_PATH if tests is not None else "", timeout_s, uid,
                                     undumpable=not as_root))
        fds = (*files.values(), info_write, setup.key_read, setup.report_write,
               *([seccomp_fd] if seccomp_fd is not None else []))
        return _execute(argv, stdin, timeout_s, max_output_bytes, setup, pass_fds=fds,
                        cwd=None, env={"PATH": "/usr/bin:/bin"}, sandboxed=True,
                        info_fds=(info_read, info_write))
    finally:
        for fd in to_close:
            os.close(fd)
        if setup is not None:
            setup.close()
        if as_root:
            _UIDS.release(uid)


def _run_unsafe(code: str, tests: str | None, stdin: str, timeout_s: float, memory_mb: int,
                max_output_bytes: int, max_processes: int) -> SandboxResult:
    # Without bwrap the program shares the caller's uid, whose process count includes every
    # process the caller has: the one-process fallback cannot be expressed, so only a cgroup
    # bounds the whole program here.
    setup = _RunSetup(memory_mb, max_processes, 0, fallback=False)
    try:
        with tempfile.TemporaryDirectory(prefix="r1lab-unsafe-") as workdir:
            paths = {"main.py": code, **({"tests.py": tests} if tests is not None else {})}
            for name, text in paths.items():
                with open(os.path.join(workdir, name), "wb") as f:
                    f.write(_encode(text))
            argv = setup.launcher() + setup.harness_argv(
                os.path.realpath(sys.executable), os.path.join(workdir, "main.py"),
                os.path.join(workdir, "tests.py") if tests is not None else "", timeout_s, -1,
                undumpable=True)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
            return _execute(argv, stdin, timeout_s, max_output_bytes, setup,
                            pass_fds=(setup.key_read, setup.report_write), cwd=workdir, env=env,
                            sandboxed=False)
    finally:
        setup.close()


def _execute(argv: list[str], stdin: str, timeout_s: float, max_output_bytes: int,
             setup: _RunSetup, *, pass_fds: tuple[int, ...], cwd: str | None,
             env: dict[str, str], sandboxed: bool,
             info_fds: tuple[int, int] | None = None) -> SandboxResult:
    start = time.monotonic()
    deadline = start + timeout_s
    stdin_bytes = stdin.encode("utf-8", errors="replace")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_bytes else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own process group, so the whole group can be killed
        )
    finally:
        if info_fds is not None:
            os.close(info_fds[1])  # bwrap has its own copy; EOF comes once it has written
        os.close(setup.report_write)  # only the sandbox may hold the write end from now on
        setup.report_write = -1
    sandbox_init = None
    try:
        if info_fds is not None:
            sandbox_init = _SandboxInit.from_info_fd(info_fds[0], deadline)
        out, err, timed_out, truncated = _collect(proc, stdin_bytes, deadline, max_output_bytes)
        if not (timed_out or truncated):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()
        if sandbox_init is not None:
            # bwrap returns as soon as the program exits (or dies when killed); the namespace is
            # torn down a moment later. Return only once every process in it is gone.
            sandbox_init.wait_gone(timeout_s=5.0)
    completed, memory_exceeded, peak = setup.finish()
    return SandboxResult(
        returncode=proc.returncode,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        output_truncated=truncated,
        sandboxed=sandboxed,
        duration_s=time.monotonic() - start,
        completed=completed,
        memory_exceeded=memory_exceeded,
        memory_peak_bytes=peak,
    )


class _SandboxInit:
    """The sandbox's pid-namespace init: when it has exited, the kernel has killed (and reaped)
    every other process of the namespace."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:  # a pidfd pins this very process (no pid-reuse race) and polls readable on exit
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    @classmethod
    def from_info_fd(cls, fd: int, deadline: float) -> "_SandboxInit | None":
        """Read bwrap's ``--info-fd`` report (``{"child-pid": N, ...}``)."""
        data = b""
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        try:
            return cls(int(json.loads(data)["child-pid"]))
        except (ValueError, KeyError, TypeError):
            return None  # bwrap failed before starting the sandbox: nothing to wait for

    def wait_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            if self.pidfd is not None:
                select.select([self.pidfd], [], [], timeout_s)
                return
            while time.monotonic() < deadline:  # no pidfd (old kernel): poll /proc
                try:
                    with open(f"/proc/{self.pid}/stat") as f:
                        if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                            return
                except (OSError, IndexError):
                    return
                time.sleep(0.002)
        finally:
            if self.pidfd is not None:
                os.close(self.pidfd)


def _collect(proc: subprocess.Popen, stdin_bytes: bytes, deadline: float,
             cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read stdout/stderr until EOF, the deadline, or the output cap."""
    buffers: dict[int, bytearray] = {proc.stdout.fileno(): bytearray(),
                                     proc.stderr.fileno(): bytearray()}
    pending = memoryview(stdin_bytes)
    timed_out = truncated = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        while sel.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd not in buffers:  # stdin is writable
                    try:
                        written = os.write(fd, pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as exc:
                        written = -1 if isinstance(exc, BrokenPipeError) else 0
                    if written < 0 or written >= len(pending):
                        sel.unregister(fd)
                        proc.stdin.close()
                    else:
                        pending = pending[written:]
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = buffers[fd]
                room = cap - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    truncated = True
                    break
    return (bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]),
            timed_out, truncated)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# Many programs at once
# --------------------------------------------------------------------------------------------


class SandboxPool:
    """Runs many programs in parallel, each in its own sandbox.

    Most of a check's time is process start-up and waiting, so a few threads per core (each
    launching one sandboxed process at a time) keep the cores busy.

    >>> with SandboxPool(workers=4) as pool:
    ...     results = pool.map(["print(1)", "print(2)"])
    """

    def __init__(self, workers: int = 4, **run_kwargs) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.run_kwargs = run_kwargs
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1lab-sandbox")

    def submit(self, code: str, **run_kwargs) -> Future:
        """Schedule one run; keyword arguments override the pool's defaults."""
        return self._executor.submit(run_python, code, **{**self.run_kwargs, **run_kwargs})

    def map(self, codes: Iterable[str], stdins: Iterable[str] | None = None) -> list[SandboxResult]:
        """Run every program; results come back in input order."""
        codes = list(codes)
        stdin_list = list(stdins) if stdins is not None else [""] * len(codes)
        if len(stdin_list) != len(codes):
            raise ValueError(f"{len(codes)} programs but {len(stdin_list)} stdins")
        futures = [self.submit(c, stdin=s) for c, s in zip(codes, stdin_list)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_many(codes: Sequence[str], tests: Sequence[str] | None = None, *, workers: int = 4,
             **run_kwargs) -> list[SandboxResult]:
    """Run each program (followed by its tests, when given) in its own sandbox, in parallel."""
    if tests is not None and len(tests) != len(codes):
        raise ValueError(f"{len(codes)} programs but {len(tests)} test blocks")
    with SandboxPool(workers=workers, **run_kwargs) as pool:
        futures = [pool.submit(code, tests=None if tests is None else tests[i])
                   for i, code in enumerate(codes)]
        return [f.result() for f in futures]
