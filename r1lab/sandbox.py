"""Run untrusted, model-written Python in an isolated, resource-limited child process.

Isolation comes from bubblewrap (``bwrap``): the child gets its own pid, ipc, uts and network
namespaces (no network at all), a root filesystem made only of read-only binds of what the Python
runtime needs (``/usr``, the ``/lib*`` links, the interpreter's install prefix), a private size-capped
tmpfs ``/tmp`` as working directory, a minimal ``/proc`` and ``/dev``, and an empty environment. The
project, the data and ``/home`` are simply not there.

Inside, a tiny bootstrap (trusted code that runs before the untrusted code) applies rlimits -- CPU
seconds, address space, process count, file size, no core dumps -- and then executes the program as
``__main__``. The interpreter runs with ``-I -S``: isolated mode and no ``site``, so nothing from the
host's site-packages or environment leaks in; programs get the standard library only.

Two ways of dropping privileges, because ``RLIMIT_NPROC`` (the fork-bomb guard) is ignored by the
kernel for processes whose host uid is 0:

* caller is not root: ``--unshare-all`` with a user namespace (the sandbox maps to the caller's uid),
  ``--disable-userns`` and ``--cap-drop ALL``. Since Linux 5.14 the process limit counts only the
  processes of that user namespace, i.e. of this one sandbox.
* caller is root: a user namespace would map the sandbox onto host uid 0, where the process limit
  does not apply. So bwrap runs privileged *without* a user namespace, and the bootstrap switches to
  an unprivileged uid (one per concurrently running sandbox, so their process budgets are separate)
  before the program starts; that switch drops every capability. bwrap always sets no_new_privs and
  mounts its binds nosuid.

The parent enforces a wall-clock timeout and an output cap. A run ends when the program exits or
when the outer bwrap is killed (then, with ``--die-with-parent``, the sandbox's pid-namespace init
dies with it); either way the kernel kills every process left in the namespace, daemonized
grandchildren included. :func:`run_python` returns only once that init is gone (its pid comes from
bwrap's ``--info-fd``), so nothing of the run is left behind.

Known limit of the root mode: the program may still create a user namespace of its own (it gains
nothing on the host from it, but could mount a tmpfs there that is not counted by the rlimits).

Without bwrap (or when bwrap fails its self-check) :func:`run_python` refuses with
:class:`SandboxUnavailable` unless the caller opts in with ``allow_unsafe=True`` or the environment
variable ``R1LAB_ALLOW_UNSANDBOXED=1``; then the program runs as a plain child process that still
gets the rlimits, the timeout, the output cap, a scratch working directory and a cleared
environment -- but no filesystem or network isolation (and, run as root, no process limit).
"""

from __future__ import annotations

import json
import math
import os
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
from typing import Iterable, Sequence

__all__ = [
    "ENV_ALLOW_UNSANDBOXED",
    "SandboxPool",
    "SandboxResult",
    "SandboxUnavailable",
    "check_sandbox",
    "run_many",
    "run_python",
    "sandbox_available",
]

ENV_ALLOW_UNSANDBOXED = "R1LAB_ALLOW_UNSANDBOXED"

# Where the program lives inside the sandbox (a file on the private tmpfs).
_MAIN_PATH = "/tmp/main.py"
_TMPFS_BYTES = 64 * 1024 * 1024
_FILE_SIZE_BYTES = 16 * 1024 * 1024
# Unprivileged uids used when the caller is root: one block of 64 per host process, one uid per
# concurrently running sandbox. Far above any uid a distribution hands out.
_UID_BASE = 2_000_000_000
_UIDS_PER_PROCESS = 64

# The bootstrap reads its parameters from argv so that it is a constant string (no code built by
# string formatting). With -S there are no exit()/quit() builtins; programs commonly call them.
# The program runs in a fresh __main__ module, as `python main.py` would run it.
_BOOTSTRAP = """\
import builtins, resource, sys
path, cpu, mem, nproc, fsize, uid = sys.argv[1:7]
cpu = int(cpu)
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_NPROC, nproc),
                 (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, '0')):
    resource.setrlimit(res, (int(val), int(val)))
uid = int(uid)
if uid >= 0:
    import os
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
builtins.exit = builtins.quit = sys.exit
sys.argv = [path]
with open(path, 'rb') as f:
    source = f.read()
main = type(sys)('__main__')
main.__file__ = path
sys.modules['__main__'] = main
exec(compile(source, path, 'exec'), main.__dict__)
"""


class SandboxUnavailable(RuntimeError):
    """No working isolation on this machine and the caller did not opt in to running without it."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    ``returncode`` is the program's exit status (negative or >128 when it was killed by a signal);
    ``timed_out`` means the wall-clock limit was hit and the run was killed; ``output_truncated``
    means it wrote more than the output cap and was killed.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool = False
    sandboxed: bool = True
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        """True when the program ran to completion and exited with status 0."""
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


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


def _bwrap_command(bwrap: str, memfd: int, info_fd: int, as_root: bool) -> list[str]:
    if as_root:
        # See the module docstring: no user namespace under root, the bootstrap drops to a uid.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    return [
        bwrap,
        *namespaces,
        "--die-with-parent",
        "--new-session",
        "--info-fd", str(info_fd),  # bwrap reports the pid of the namespace's init here
        *_runtime().bind_args,
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(_TMPFS_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
        "--perms", "0644", "--file", str(memfd), _MAIN_PATH,
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
        result = _run_bwrap(bwrap, "print(6 * 7)", "", 10.0, 256, 64 * 1024, 16)
    except OSError as exc:
        return False, f"bwrap could not be started: {exc}"
    if result.returncode != 0 or result.stdout.strip() != "42":
        detail = (result.stderr or result.stdout).strip()[-500:]
        return False, f"bwrap self-check failed (exit {result.returncode}): {detail}"
    return True, ""


def _unsafe_allowed(allow_unsafe: bool | None) -> bool:
    if allow_unsafe is not None:
        return allow_unsafe
    return os.environ.get(ENV_ALLOW_UNSANDBOXED, "").strip().lower() in {"1", "true", "yes"}


_warned_unsafe = False


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_python(
    code: str,
    *,
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
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; the CPU-time rlimit is set just above it.
        memory_mb: address-space limit per process.
        max_output_bytes: at most this many bytes of stdout and of stderr are kept; a program
            that writes more is killed (``output_truncated``).
        max_processes: process/thread limit inside the sandbox (fork bombs hit it).
        allow_unsafe: run without isolation when bwrap is unavailable (None: read the
            ``R1LAB_ALLOW_UNSANDBOXED`` environment variable).

    Raises:
        SandboxUnavailable: no isolation here and running without it was not allowed.
    """
    global _warned_unsafe
    try:
        check_sandbox()
    except SandboxUnavailable:
        if not _unsafe_allowed(allow_unsafe):
            raise
        if not _warned_unsafe:
            _warned_unsafe = True
            warnings.warn("r1lab.sandbox: running model-written code WITHOUT isolation "
                          "(rlimits and a timeout only)", RuntimeWarning, stacklevel=2)
        return _run_unsafe(code, stdin, timeout_s, memory_mb, max_output_bytes, max_processes)
    return _run_bwrap(shutil.which("bwrap") or "bwrap", code, stdin, timeout_s, memory_mb,
                      max_output_bytes, max_processes)


def _bootstrap_argv(python: str, path: str, timeout_s: float, memory_mb: int,
                    max_processes: int, uid: int) -> list[str]:
    cpu_s = max(1, math.ceil(timeout_s)) + 1
    return [python, "-I", "-S", "-c", _BOOTSTRAP, path, str(cpu_s),
            str(int(memory_mb) * 1024 * 1024), str(max_processes), str(_FILE_SIZE_BYTES), str(uid)]


def _run_bwrap(bwrap: str, code: str, stdin: str, timeout_s: float, memory_mb: int,
               max_output_bytes: int, max_processes: int) -> SandboxResult:
    as_root = os.geteuid() == 0
    uid = _UIDS.acquire() if as_root else -1
    memfd = os.memfd_create("r1lab-sandbox-program", os.MFD_CLOEXEC)
    info_read, info_write = os.pipe()
    try:
        os.write(memfd, code.encode("utf-8", errors="surrogatepass"))
        os.lseek(memfd, 0, os.SEEK_SET)
        argv = _bwrap_command(bwrap, memfd, info_write, as_root) + _bootstrap_argv(
            _runtime().python, _MAIN_PATH, timeout_s, memory_mb, max_processes, uid)
        return _execute(argv, stdin, timeout_s, max_output_bytes, pass_fds=(memfd, info_write),
                        cwd=None, env={"PATH": "/usr/bin:/bin"}, sandboxed=True,
                        info_fds=(info_read, info_write))
    finally:
        os.close(memfd)
        os.close(info_read)  # (_execute closes info_write as soon as bwrap has inherited it)
        if as_root:
            _UIDS.release(uid)


def _run_unsafe(code: str, stdin: str, timeout_s: float, memory_mb: int,
                max_output_bytes: int, max_processes: int) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="r1lab-unsafe-") as workdir:
        path = os.path.join(workdir, "main.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        argv = _bootstrap_argv(os.path.realpath(sys.executable), path, timeout_s, memory_mb,
                               max_processes, -1)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        return _execute(argv, stdin, timeout_s, max_output_bytes, pass_fds=(), cwd=workdir,
                        env=env, sandboxed=False)


def _execute(argv: list[str], stdin: str, timeout_s: float, max_output_bytes: int, *,
             pass_fds: tuple[int, ...], cwd: str | None, env: dict[str, str], sandboxed: bool,
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
    return SandboxResult(
        returncode=proc.returncode,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        output_truncated=truncated,
        sandboxed=sandboxed,
        duration_s=time.monotonic() - start,
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
    if tests is not None:
        if len(tests) != len(codes):
            raise ValueError(f"{len(codes)} programs but {len(tests)} test blocks")
        codes = [f"{code}\n\n{test}\n" for code, test in zip(codes, tests)]
    with SandboxPool(workers=workers, **run_kwargs) as pool:
        return pool.map(codes)
