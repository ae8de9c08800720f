"""Limits on a whole sandboxed program, not on each of its processes.

Per-process rlimits multiply: eight children under a 512 MB address-space limit hold 4 GB. So a
program gets one memory budget and one process budget for everything it starts:

* **cgroups** (preferred): each run gets its own cgroup below the caller's, with ``memory.max`` /
  ``memory.limit_in_bytes`` = the budget (tmpfs files, page cache and kernel memory it causes are
  charged too) and ``pids.max``. cgroup v2 is used when the caller's cgroup delegates the memory
  and pids controllers; else the v1 ``memory`` and ``pids`` hierarchies when they are mounted and
  writable (as on a root-run CI VM). The launcher joins the cgroup before it execs bwrap, so every
  process of the run is inside from its first instruction. An OOM kill inside the cgroup marks the
  run as over budget.
* **fallback** (no usable cgroup): one process with the whole budget as its address space --
  ``RLIMIT_NPROC`` leaves room for no child and no extra thread, so nothing can multiply it.
  Only the fixed-size ``/tmp`` tmpfs comes on top.

A seccomp filter (loaded by bwrap just before the program starts, in both bwrap modes) closes the
ways around both: new user namespaces (a private tmpfs mount outside every cap), ``memfd_create``
and SysV shared memory / message queues (memory held outside the address space).

Cost, measured on the 2-core CI-type VM (cgroup v1): a trivial program + tests takes ~60 ms with
its run cgroup against ~48 ms without; almost all of the difference is the kernel moving the
launcher into the v1 cgroups (creating, reading and removing them is well under 1 ms).
"""

from __future__ import annotations

import itertools
import os
import platform
import signal
import struct
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

MIB = 1 << 20

# --------------------------------------------------------------------------------------------
# cgroups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLayout:
    """Where this process may create child cgroups: one directory per controller (v1) or one
    shared directory (v2)."""

    version: int
    memory_dir: str
    pids_dir: str


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            found.append((fields[3], fields[4], rest[0], set(rest[2].split(","))))
    return found


def _join(mount_root: str, mount_point: str, path: str) -> str | None:
    if mount_root != "/" and not (path == mount_root or path.startswith(mount_root + "/")):
        return None
    rel = path[len(mount_root):] if mount_root != "/" else path
    return os.path.join(mount_point, rel.lstrip("/"))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@lru_cache(maxsize=1)
def cgroup_layout() -> CgroupLayout | None:
    """The cgroup directories this process can create run cgroups in, or None."""
    try:
        return find_layout(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
    except (OSError, ValueError):
        return None


def find_layout(proc_cgroup: str, mountinfo: str) -> CgroupLayout | None:
    """The layout described by the texts of /proc/self/cgroup and /proc/self/mountinfo."""
    own = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else ["<v2>"]:
            own[name] = path
    mounts = _mounts(mountinfo)
    # v2 first: one directory for both controllers, when they are delegated to us.
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2" and "<v2>" in own:
            base = _join(root, point, own["<v2>"])
            if base and _v2_delegates(base):
                return CgroupLayout(2, base, base)
    dirs = {}
    for controller in ("memory", "pids"):
        for root, point, fstype, options in mounts:
            if fstype == "cgroup" and controller in options and controller in own:
                base = _join(root, point, own[controller])
                if base and os.access(base, os.W_OK | os.X_OK):
                    dirs[controller] = base
                    break
    if len(dirs) == 2:
        return CgroupLayout(1, dirs["memory"], dirs["pids"])
    return None


def _v2_delegates(base: str) -> bool:
    try:
        if not {"memory", "pids"} <= set(_read(os.path.join(base, "cgroup.controllers")).split()):
            return False
        enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
        if not {"memory", "pids"} <= enabled:
            # Refused (EBUSY) when our cgroup holds processes itself, unless it is the root.
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
        return os.access(base, os.W_OK | os.X_OK)
    except OSError:
        return False


_names = itertools.count()
_stale_lock = threading.Lock()
_stale: set[str] = set()  # run cgroups that could not be removed yet (processes still exiting)


class RunCgroup:
    """The cgroup(s) of one run: created with its limits, joined by the launcher, removed after."""

    def __init__(self, layout: CgroupLayout, memory_bytes: int, max_pids: int) -> None:
        _remove_stale()
        name = f"r1lab-sandbox-{os.getpid()}-{next(_names)}"
        self.version = layout.version
        self.dirs = [os.path.join(layout.memory_dir, name)]
        if layout.pids_dir != layout.memory_dir:
            self.dirs.append(os.path.join(layout.pids_dir, name))
        for path in self.dirs:
            os.mkdir(path)
        try:
            mem, pids = self.dirs[0], self.dirs[-1]
            if self.version == 2:
                _write(f"{mem}/memory.max", str(memory_bytes))
                _write_if_present(f"{mem}/memory.swap.max", "0")
                _write_if_present(f"{mem}/memory.oom.group", "1")  # an OOM ends the whole run
            else:
                _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
                _write_if_present(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(f"{pids}/pids.max", str(max_pids))
        except OSError:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for path in self.dirs]

    def usage(self) -> tuple[int | None, bool]:
        """(peak memory in bytes or None where the kernel does not say, OOM kill happened)."""
        mem = self.dirs[0]
        peak_file, events_file = (("memory.peak", "memory.events") if self.version == 2 else
                                  ("memory.max_usage_in_bytes", "memory.oom_control"))
        try:
            peak: int | None = int(_read(f"{mem}/{peak_file}"))
        except (OSError, ValueError):
            peak = None
        oom = False
        try:
            for line in _read(f"{mem}/{events_file}").splitlines():
                key, _, value = line.partition(" ")
                if key in ("oom_kill", "oom_group_kill") and int(value) > 0:
                    oom = True
        except (OSError, ValueError):
            pass
        return peak, oom

    def kill_all(self) -> None:
        """SIGKILL whatever is still in the cgroup (without bwrap there is no pid namespace)."""
        if self.version == 2 and os.path.exists(f"{self.dirs[0]}/cgroup.kill"):
            try:
                _write(f"{self.dirs[0]}/cgroup.kill", "1")
                return
            except OSError:
                pass
        for _ in range(100):
            try:
                pids = [int(p) for p in _read(self.procs_files[-1]).split()]
            except (OSError, ValueError):
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for path in reversed(self.dirs):
            if not _rmdir_soon(path):
                with _stale_lock:
                    _stale.add(path)


def _write_if_present(path: str, value: str) -> None:
    if os.path.exists(path):
        try:
            _write(path, value)
        except OSError:
            pass  # e.g. swap accounting compiled in but disabled


def _rmdir_soon(path: str, timeout_s: float = 2.0) -> bool:
    """rmdir, retried while the last processes of the run finish exiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _remove_stale() -> None:
    with _stale_lock:
        stale = list(_stale)
    for path in stale:
        if _rmdir_soon(path, timeout_s=0.0):
            with _stale_lock:
                _stale.discard(path)


def launcher_prefix(procs_files: list[str]) -> list[str]:
    """argv prefix that moves the launching shell into the cgroups, then execs the rest."""
    script = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
              'exec "$@"')
    return ["/bin/sh", "-c", script, "r1lab-sandbox", *procs_files, "--"]


# --------------------------------------------------------------------------------------------
# The fallback without cgroups
# --------------------------------------------------------------------------------------------


def fallback_limits(memory_mb: int, extra_tasks: int) -> tuple[int, int]:
    """(address-space bytes, RLIMIT_NPROC) when no cgroup bounds the run: one process holding
    the whole budget. Its task count is the harness's two threads plus ``extra_tasks`` that share
    the uid's count (bwrap's init, in a user namespace); any more would multiply the budget."""
    return memory_mb * MIB, 2 + extra_tasks


# --------------------------------------------------------------------------------------------
# seccomp
# --------------------------------------------------------------------------------------------

_CLONE_NEWUSER = 0x10000000
_EPERM, _ENOSYS = 1, 38
# Syscall numbers: clone, clone3, unshare, memfd_create, shmget, msgget.
_ARCHES = {
    "x86_64": (0xC000003E, dict(clone=56, clone3=435, unshare=272, memfd_create=319, shmget=29,
                                msgget=68)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, unshare=97, memfd_create=279, shmget=194,
                                 msgget=186)),
}
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


@lru_cache(maxsize=1)
def seccomp_filter() -> bytes | None:
    """The classic-BPF program bwrap loads with ``--seccomp`` (None on an architecture this
    module does not know; then only the cgroup / rlimit bounds apply)."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr = arch
    prog = [
        _insn(_LD_ABS, 0, 0, 4),                       # seccomp_data.arch
        _insn(_JEQ, 1, 0, audit_arch),
        _insn(_RET, 0, 0, _KILL),                      # another ABI (i386 on x86_64): no
        _insn(_LD_ABS, 0, 0, 0),                       # seccomp_data.nr
    ]
    if audit_arch == 0xC000003E:                       # x32 syscalls have bit 30 set
        prog += [_insn(_JGE, 0, 1, 0x40000000), _insn(_RET, 0, 0, _ERRNO | _ENOSYS)]
    # clone3's flags live in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    denied = [(nr["clone3"], _ENOSYS), (nr["memfd_create"], _EPERM), (nr["shmget"], _EPERM),
              (nr["msgget"], _EPERM)]
    for number, errno in denied:
        prog += [_insn(_JEQ, 0, 1, number), _insn(_RET, 0, 0, _ERRNO | errno)]
    prog += [
        _insn(_JEQ, 2, 0, nr["unshare"]),
        _insn(_JEQ, 1, 0, nr["clone"]),
        _insn(_RET, 0, 0, _ALLOW),
        _insn(_LD_ABS, 0, 0, 16),                      # low word of args[0]: the flags
        _insn(_JSET, 0, 1, _CLONE_NEWUSER),
        _insn(_RET, 0, 0, _ERRNO | _EPERM),
        _insn(_RET, 0, 0, _ALLOW),
    ]
    return b"".join(prog)
