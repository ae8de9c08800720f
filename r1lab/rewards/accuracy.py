"""Rule-based accuracy reward: is the completion's final answer equivalent to the gold answer?

Equivalence is decided by math-verify (fractions vs decimals, thousands separators, radicals,
``x = 3`` vs ``3``, sets, intervals ...). On a main thread it runs in-process with its own
(signal-based) timeout; elsewhere it runs in a helper process (see :mod:`.judge_pool`), so a call
is time-bounded from any thread and model output can never make it raise.
"""

from __future__ import annotations

import threading

from .extract import extract_answer
from .judge_pool import default_pool
from .math_judge import judge, parse_gold

__all__ = ["accuracy_reward", "math_equal", "validate_gold", "MATH_TIMEOUT_S"]

MATH_TIMEOUT_S = 2  # math-verify's per-parse / per-comparison bound (whole seconds: signal.alarm)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def validate_gold(gold: str) -> None:
    """Raise ValueError when ``gold`` is not an answer math-verify can parse (empty, ``"@@@"``)."""
    if _on_main_thread():
        parse_gold(gold, MATH_TIMEOUT_S)
    else:
        default_pool().judge(gold, "")


def math_equal(gold: str, answer: str | None) -> bool:
    """True when ``answer`` (an answer string, not a whole completion) is equivalent to ``gold``.

    Raises ValueError for an unparseable gold -- even when the answer is missing, so that bad data
    is noticed the first time it is scored. Never raises because of the answer.
    """
    if answer is not None and not isinstance(answer, str):
        answer = None
    if _on_main_thread():
        # Gold first: verify(gold, answer) is not symmetric. judge() keeps that order.
        return judge(gold, answer or "", MATH_TIMEOUT_S)
    return default_pool().judge(gold, answer or "")


def accuracy_reward(completion: str, gold: str) -> float:
    """1.0 when the final answer of ``completion`` (see :func:`extract_answer`) equals ``gold``.

    A completion without an ``<answer>`` block or ``\\boxed{}`` scores 0.0 (we do not go fishing for
    the last number in free text). Raises ValueError when the gold cannot be parsed.
    """
    return 1.0 if math_equal(gold, extract_answer(completion)) else 0.0
