"""Code reward: does the program pass its tests when run in the sandbox?"""

from __future__ import annotations

from ..sandbox import run_python
from .extract import extract_code

__all__ = ["code_reward", "program_from_completion"]


def program_from_completion(text: str) -> str | None:
    """The program to run: the last fenced ```python block when ``text`` contains a fence (a full
    completion), else ``text`` itself (already a bare program). None when a fence is present but
    no complete code block is."""
    if not isinstance(text, str):
        return None
    if "```" in text:
        return extract_code(text)
    return text


def code_reward(program: str, tests: str, *, timeout_s: float = 10.0, memory_mb: int = 512,
                allow_unsafe: bool | None = None) -> float:
    """1.0 when ``program`` runs and then every line of ``tests`` runs, without an exception, in
    the sandbox; else 0.0.

    ``program`` may be a whole completion (the last ```python block is used). The tests run
    after the program in its namespace but are compiled on their own, and the pass is the
    sandbox's per-run sentinel that only the end of the tests releases
    (:attr:`r1lab.sandbox.SandboxResult.passed`): a program that exits first -- ``sys.exit(0)``,
    ``os._exit(0)``, an atexit handler, a thread, a signal -- scores 0.0 like failing tests,
    exceptions, timeouts, too much output, too much memory and a missing program. A machine
    without a working sandbox raises :class:`r1lab.sandbox.SandboxUnavailable` (unless
    ``allow_unsafe``): that is an environment problem, not something to hide as a zero reward.
    """
    code = program_from_completion(program)
    if not code or not code.strip() or not isinstance(tests, str):
        return 0.0
    result = run_python(code, tests=tests, timeout_s=timeout_s, memory_mb=memory_mb,
                        allow_unsafe=allow_unsafe)
    return 1.0 if result.passed else 0.0
