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
    """1.0 when ``program`` followed by ``tests`` runs to a clean exit in the sandbox, else 0.0.

    ``program`` may be a whole completion (the last ```python block is used). Failing tests,
    exceptions, timeouts, too much output and a missing program all score 0.0. A machine without
    a working sandbox raises :class:`r1lab.sandbox.SandboxUnavailable` (unless ``allow_unsafe``):
    that is an environment problem, not something to hide as a zero reward.
    """
    code = program_from_completion(program)
    if not code or not code.strip() or not isinstance(tests, str):
        return 0.0
    result = run_python(f"{code}\n\n{tests}\n", timeout_s=timeout_s, memory_mb=memory_mb,
                        allow_unsafe=allow_unsafe)
    return 1.0 if result.passed else 0.0
