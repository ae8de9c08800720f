"""Time-bounded math-verify judgements for callers that are not on a main thread.

math-verify's timeout is ``signal.alarm``, which only a process's main thread can use. Rewards are
computed in worker threads (batched scoring, trainer callbacks), where running math-verify without
its timeout would let one pathological answer (``9^{9^{9^9}}``) hang a worker forever. So those
calls go to small helper processes -- plain ``python`` running :mod:`r1lab.rewards.math_judge`,
never a fork of the caller -- whose main thread applies the timeout. A helper that still does not
answer in time is killed and replaced, and the answer counts as wrong.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["JudgePool", "default_pool"]

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_judge.py")
# Drop sys.path[0] (the working directory for -c) so no local file can shadow a library module.
_LAUNCH = ("import sys; del sys.path[0]; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
           "import logging; logging.getLogger('math_verify').setLevel(logging.CRITICAL); "
           "import runpy; runpy.run_path(path, run_name='__main__')")
# How long a new helper may take to import math-verify and sympy (seconds on an idle machine, far more on a
# loaded one); it is not counted against the first request's own time bound.
STARTUP_S = 300.0


class _Helper:
    """One helper process and its line-oriented pipe."""

    def __init__(self, timeout_s: int) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, _SCRIPT, str(timeout_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._pending = b""
        self.ready = False
        self.answered = 0

    def _read_line(self, wait_s: float) -> dict | None:
        deadline = time.monotonic() + wait_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def ask(self, request: dict, wait_s: float) -> dict | None:
        """Send one request; the reply, or None when the helper died or did not answer within ``wait_s`` (a
        new helper first gets STARTUP_S to be ready)."""
        if not self.ready:
            self.ready = self._read_line(STARTUP_S) == {"ready": True}
            if not self.ready:
                return None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        reply = self._read_line(wait_s)
        if reply is not None:
            self.answered += 1
        return reply

    def error_output(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode(errors="replace")

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


class JudgePool:
    """A small pool of math-verify helper processes, shared by all threads.

    Args:
        max_processes: helpers started at most (lazily, on demand); default: CPU count.
        timeout_s: math-verify's own timeout for each parse/comparison, in whole seconds.
        request_timeout_s: wall-clock bound on one judgement, after which the helper is killed.
    """

    def __init__(self, max_processes: int | None = None, timeout_s: int = 2,
                 request_timeout_s: float = 30.0) -> None:
        self.max_processes = max_processes or os.cpu_count() or 2
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._idle: list[_Helper] = []
        self._started = 0
        self._cond = threading.Condition()
        self._closed = False

    def judge(self, gold: str, answer: str) -> bool:
        """True when ``answer`` is equivalent to ``gold``; ValueError when the gold is unparseable."""
        helper = self._checkout()
        reply = helper.ask({"gold": gold, "answer": answer}, self.request_timeout_s)
        if reply is None:
            never_answered = helper.answered == 0 and helper.proc.poll() is not None
            detail = helper.error_output() if never_answered else ""
            self._discard(helper)
            if never_answered:
                raise RuntimeError(f"math-verify helper process failed to start:\n{detail}")
            return False  # it hung or crashed on this answer: wrong, and the helper is replaced
        self._checkin(helper)
        if "bad_gold" in reply:
            raise ValueError(reply["bad_gold"])
        return bool(reply.get("equal", False))

    def _checkout(self) -> _Helper:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("JudgePool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._started < self.max_processes:
                    self._started += 1
                    break
                self._cond.wait()
        try:
            return _Helper(self.timeout_s)
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise

    def _checkin(self, helper: _Helper) -> None:
        with self._cond:
            if self._closed:
                helper.close()
                return
            self._idle.append(helper)
            self._cond.notify()

    def _discard(self, helper: _Helper) -> None:
        helper.close()
        with self._cond:
            self._started -= 1
            self._cond.notify()

    def close(self) -> None:
        """Stop the idle helpers; busy ones stop when they are handed back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for helper in idle:
            helper.close()


_default: JudgePool | None = None
_default_lock = threading.Lock()


def default_pool() -> JudgePool:
    """The process-wide pool (created on first use, closed at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JudgePool()
            atexit.register(_default.close)
        return _default
