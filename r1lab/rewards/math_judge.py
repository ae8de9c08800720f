"""Answer equivalence through math-verify, plus the loop of the helper process that runs it.

This module imports nothing from r1lab so that it can run as a script (``python -I math_judge.py``)
in helper processes started by :mod:`r1lab.rewards.judge_pool` without importing the package.

math-verify bounds its work with ``signal.alarm``, which only works on a process's main thread;
``timeout_s=None`` switches the bound off. Callers on a main thread pass a timeout; others send the
question to a helper process whose main thread runs it with the timeout.
"""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache

from math_verify import parse, verify
from sympy import Basic, MatrixBase

# A word of at least three letters that is not a LaTeX command: the text is prose ("The answer is
# 5 apples"), which math-verify's anchored extraction reads best as-is. Bare math ("\sqrt{2}/2")
# is read best wrapped in \boxed{}, which makes math-verify treat the whole string as LaTeX.
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_BOXED_PREFIX = re.compile(r"^\s*\\boxed\s*\{(.*)\}\s*$", re.DOTALL)
# A final answer longer than this is not an answer but runaway output; parsing it would only
# burn the time budget (math-verify's regexes cannot be interrupted by its timeout).
MAX_ANSWER_CHARS = 1000


def _is_math(value: object) -> bool:
    return isinstance(value, (Basic, MatrixBase))


def parse_math(text: str, timeout_s: int | None) -> list:
    """math-verify's parse of ``text`` (the answer alone, not a whole completion); [] if none."""
    text = text.strip().rstrip(".").strip()
    if not text:
        return []
    boxed = text if _BOXED_PREFIX.match(text) else "\\boxed{" + text + "}"
    order = (text, boxed) if _PROSE_WORD.search(text) else (boxed, text)
    first_nonempty: list = []
    for candidate in order:
        try:
            parsed = parse(candidate, parsing_timeout=timeout_s)
        except ValueError as exc:  # math-verify's "signal only works in main thread" complaint
            raise RuntimeError(f"math-verify cannot time-bound here: {exc}") from exc
        if any(_is_math(p) for p in parsed):
            return parsed
        first_nonempty = first_nonempty or parsed
    return first_nonempty


@lru_cache(maxsize=4096)
def parse_gold(gold: str, timeout_s: int | None = None) -> tuple:
    """Parse a gold answer; raise ValueError when it is not math that math-verify understands.

    A gold that parses only to a raw string (``"@@@"``) is rejected: comparing a model's answer
    with it would be a string match at best and it must never make a wrong answer score 1.0.
    """
    if not isinstance(gold, str):
        raise ValueError(f"gold answer must be a string, got {type(gold).__name__}")
    if not gold.strip():
        raise ValueError("gold answer is empty")
    parsed = parse_math(gold, timeout_s)
    if not any(_is_math(p) for p in parsed):
        raise ValueError(f"gold answer {gold!r} cannot be parsed as math by math-verify")
    return tuple(parsed)


def judge(gold: str, answer: str, timeout_s: int | None) -> bool:
    """True when ``answer`` is mathematically equivalent to ``gold``.

    Raises ValueError for a gold that cannot be parsed; any failure on the answer side (including
    an answer longer than ``MAX_ANSWER_CHARS``) is False.
    """
    gold_parsed = list(parse_gold(gold, timeout_s))
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        return False
    try:
        answer_parsed = parse_math(answer, timeout_s)
        if not answer_parsed:
            return False
        # Argument order matters: math-verify's verify is not symmetric and takes the gold first.
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout_s))
    except Exception:  # noqa: BLE001 - model output must never raise
        return False
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def serve(timeout_s: int) -> None:
    """Helper-process loop: one JSON request per line on stdin, one JSON reply per line on stdout.

    Request ``{"gold": str, "answer": str}``; reply ``{"equal": bool}`` or ``{"bad_gold": message}``.
    The first line out is ``{"ready": true}``, once the imports and a warm-up judgement are done, so that the
    parent's per-request clock does not include start-up. Ends when stdin closes (the parent went away).
    """
    try:  # the first judgement also loads math-verify's parsers lazily: do it before saying ready
        judge("1/2", "0.5", timeout_s)
    except Exception:  # noqa: BLE001 - a broken install shows on the first real request
        pass
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold, answer = str(request["gold"]), str(request["answer"])
        except (ValueError, KeyError, TypeError):
            reply = {"equal": False}
        else:
            try:
                reply = {"equal": judge(gold, answer, timeout_s)}
            except ValueError as exc:
                reply = {"bad_gold": str(exc)}
            except BaseException:  # noqa: BLE001 - keep serving; a crash would cost a restart
                reply = {"equal": False}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
