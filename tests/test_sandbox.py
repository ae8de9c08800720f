"""The sandbox: normal runs, and an adversarial suite that must leave the host unharmed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from r1lab import sandbox
from r1lab.sandbox import (
    SandboxPool,
    SandboxUnavailable,
    run_many,
    run_python,
    sandbox_available,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap sandbox unavailable")


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) host processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def marked_sleeper(marker: str, seconds: int = 60) -> str:
    """Python source that execs a sleeping interpreter whose argv carries ``marker``."""
    return (f"os.execv(sys.executable, [sys.executable, '-S', '-c', "
            f"'import time; time.sleep({seconds})', {marker!r}])")


def host_is_fine() -> bool:
    return subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True,
                          timeout=30).stdout.strip() == b"1"


# ----------------------------------------------------------------------------- normal use


@needs_sandbox
def test_runs_a_program_with_stdin_and_reports_exit_status():
    result = run_python("import sys\nname = input()\nprint('hello', name)\nsys.exit(3)",
                        stdin="world\n")
    assert result.stdout == "hello world\n"
    assert result.returncode == 3 and not result.timed_out and result.sandboxed
    assert not result.passed
    exited = run_python("exit(0)\nprint('not reached')")  # exit() exists even though site is off
    assert exited.returncode == 0 and exited.stdout == "" and exited.stderr == ""
    assert not exited.completed and not exited.passed  # status 0, but it left before its end
    finished = run_python("print('end')")
    assert finished.completed and finished.passed
    failing = run_python("raise ValueError('boom')")
    assert failing.returncode == 1 and "ValueError: boom" in failing.stderr


@needs_sandbox
def test_stdlib_available_site_packages_not():
    result = run_python("import json, hashlib, math, collections, typing, re, itertools\n"
                        "import sys\nprint(any('site-packages' in p for p in sys.path))")
    assert result.passed and result.stdout.strip() == "False"
    assert not run_python("import math_verify").passed


@needs_sandbox
def test_pool_runs_in_parallel_and_keeps_order():
    codes = [f"print({i} * {i})" for i in range(24)]
    with SandboxPool(workers=4) as pool:
        results = pool.map(codes)
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(24)]
    results = run_many(["def f(x):\n    return x + 1"] * 2, ["assert f(1) == 2", "assert f(1) == 3"],
                       workers=2)
    assert [r.passed for r in results] == [True, False]


# ----------------------------------------------------------------------------- adversarial


@needs_sandbox
def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 5


@needs_sandbox
def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    marker = f"r1lab-forkbomb-{uuid.uuid4().hex}"
    bomb = ("import os, sys\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            f"            {marked_sleeper(marker)}\n"
            "    except OSError:\n"
            "        pass\n")
    start = time.monotonic()
    result = run_python(bomb, timeout_s=2.0, max_processes=32)
    assert result.timed_out
    assert time.monotonic() - start < 10
    assert host_is_fine()
    assert processes_with(marker) == []


@needs_sandbox
def test_process_count_is_limited():
    code = ("import os, time\nn = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(5)\n"
            "        os._exit(0)\n"
            "    n += 1\n"
            "print(n)\n")
    result = run_python(code, max_processes=16, timeout_s=10)
    assert result.passed
    assert int(result.stdout) < 16


@needs_sandbox
def test_memory_bomb_is_contained():
    start = time.monotonic()
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))",
                        memory_mb=256, timeout_s=10)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr
    assert time.monotonic() - start < 10
    assert host_is_fine()


@needs_sandbox
def test_writes_outside_the_sandbox_tmp_do_not_reach_the_host(tmp_path):
    marker = uuid.uuid4().hex
    targets = [PROJECT_ROOT / f"SANDBOX_ESCAPE_{marker}", Path("/root") / f"SANDBOX_ESCAPE_{marker}",
               Path("/tmp") / f"SANDBOX_ESCAPE_{marker}", tmp_path / f"SANDBOX_ESCAPE_{marker}"]
    code = "import os\n" + "".join(
        f"try:\n    os.makedirs(os.path.dirname({str(t)!r}), exist_ok=True)\n"
        f"    open({str(t)!r}, 'w').write('x')\n    print('wrote', {str(t)!r})\n"
        f"except OSError as e:\n    print('blocked', e)\n" for t in targets)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    for target in targets:
        assert not target.exists(), f"{target} was created on the host"


@needs_sandbox
def test_only_a_size_capped_tmp_is_writable():
    code = ("import os\n"
            "for path in ['/escape', '/usr/escape', '/proc/escape']:\n"
            "    try:\n"
            "        open(path, 'w').write('x')\n"
            "        print('wrote', path)\n"
            "    except OSError:\n"
            "        pass\n"
            "open('/tmp/ok', 'w').write('fine')\n"
            "written = 0\n"
            "try:\n"
            "    for i in range(20):\n"  # 20 x 8 MiB = 160 MiB > the 64 MiB tmpfs
            "        with open(f'/tmp/fill{i}', 'wb') as f:\n"
            "            f.write(b'0' * (8 << 20))\n"
            "        written += 8\n"
            "except OSError as e:\n"
            "    print('full after', written, 'MiB:', e.strerror)\n")
    result = run_python(code, timeout_s=10)
    assert result.returncode == 0, result.stderr
    assert "wrote" not in result.stdout
    assert "full after" in result.stdout and int(result.stdout.split()[2]) <= 64


@needs_sandbox
def test_project_and_data_files_cannot_be_read():
    pyproject = PROJECT_ROOT / "pyproject.toml"
    assert pyproject.exists()
    secret_line = pyproject.read_text().splitlines()[0]
    code = ("import os\n"
            f"for path in [{str(pyproject)!r}, '/root', '/home', {str(PROJECT_ROOT)!r}, '/etc/passwd']:\n"
            "    try:\n"
            "        print(open(path).read() if os.path.isfile(path) else os.listdir(path))\n"
            "    except OSError as e:\n"
            "        print('blocked', path, type(e).__name__)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert f"blocked {pyproject} FileNotFoundError" in result.stdout
    assert secret_line not in result.stdout
    assert "root:" not in result.stdout  # no /etc/passwd either
    assert "pyproject" not in result.stdout.replace(str(pyproject), "")


@needs_sandbox
def test_host_environment_is_not_visible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("R1LAB_TEST_SECRET", secret)
    code = ("import os, glob\nprint(dict(os.environ))\n"
            "for path in glob.glob('/proc/*/environ'):\n"
            "    try:\n"
            "        print(open(path, 'rb').read())\n"
            "    except OSError:\n"
            "        pass\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout and "R1LAB_TEST_SECRET" not in result.stdout
    assert "'HOME': '/tmp'" in result.stdout


@needs_sandbox
def test_no_network_to_a_listener_on_the_host():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    received: list = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            received.append(conn.recv(1024))
            conn.close()

    thread = threading.Thread(target=accept_loop)
    thread.start()
    try:
        code = ("import socket\n"
                f"for host in ['127.0.0.1', 'localhost', {socket.gethostname()!r}]:\n"
                "    try:\n"
                f"        s = socket.create_connection((host, {port}), timeout=2)\n"
                "        s.sendall(b'leak')\n"
                "        print('connected', host)\n"
                "    except OSError as e:\n"
                "        print('blocked', host, type(e).__name__)\n")
        result = run_python(code, timeout_s=10)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert result.returncode == 0, result.stderr
    assert "connected" not in result.stdout
    assert received == []


@needs_sandbox
def test_output_flood_is_capped_and_returns_quickly():
    start = time.monotonic()
    result = run_python("while True:\n    print('x' * 1000)", max_output_bytes=64 * 1024,
                        timeout_s=10)
    assert result.output_truncated and not result.passed
    assert len(result.stdout) <= 64 * 1024
    assert time.monotonic() - start < 5


@needs_sandbox
def test_daemonized_child_does_not_outlive_the_run():
    marker = f"r1lab-daemon-{uuid.uuid4().hex}"
    code = ("import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.close(1); os.close(2)\n"
            f"        {marked_sleeper(marker)}\n"
            "    os._exit(0)\n"
            "import time\ntime.sleep(0.3)\n"
            "print('parent done')\n")
    start = time.monotonic()
    result = run_python(code, timeout_s=10)
    assert result.passed and result.stdout == "parent done\n"
    assert time.monotonic() - start < 5
    assert processes_with(marker) == []


@needs_sandbox
def test_killed_run_leaves_nothing_behind():
    marker = f"r1lab-timeout-{uuid.uuid4().hex}"
    code = f"import os, sys\nif os.fork() == 0:\n    {marked_sleeper(marker)}\nwhile True:\n    pass\n"
    result = run_python(code, timeout_s=1.0)
    assert result.timed_out
    assert processes_with(marker) == []


# ----------------------------------------------------------------------------- no isolation


@pytest.fixture
def no_bwrap(monkeypatch):
    """Pretend bubblewrap is not installed (and forget the cached self-check afterwards)."""
    monkeypatch.setattr(sandbox, "_check_result", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv(sandbox.ENV_ALLOW_UNSANDBOXED, raising=False)
    yield
    sandbox._check_result = None


def test_refuses_without_isolation(no_bwrap):
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_python("print(1)")
    assert not sandbox_available()


def test_unsafe_opt_in_still_applies_limits(no_bwrap, monkeypatch):
    with pytest.warns(RuntimeWarning):
        sandbox._warned_unsafe = False
        result = run_python("import os\nprint(os.environ.get('R1LAB_TEST_SECRET'))",
                            allow_unsafe=True)
    assert result.passed and not result.sandboxed and result.stdout.strip() == "None"
    monkeypatch.setenv(sandbox.ENV_ALLOW_UNSANDBOXED, "1")
    assert run_python("while True:\n    pass", timeout_s=1.0).timed_out
    assert "MemoryError" in run_python("x = bytearray(2**31)", memory_mb=256).stderr
