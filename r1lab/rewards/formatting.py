"""Format reward: the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``."""

from __future__ import annotations

import re

__all__ = ["format_reward"]

# Text that contains none of the four tags (so nothing is nested or repeated).
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT = re.compile(
    rf"\s*<think>({_NO_TAG})</think>\s*<answer>({_NO_TAG})</answer>\s*",
    re.DOTALL,
)


def format_reward(completion: str) -> float:
    """1.0 for exactly one ``<think>`` block followed by exactly one ``<answer>`` block, else 0.0.

    Whitespace and newlines around and between the blocks are allowed (the R1-Zero prompt ends
    with ``Assistant:``, so completions often start with a space). Both blocks must hold some
    non-blank text: an empty ``<think></think>`` is the "skipped thinking" failure the R1 authors
    warn about, and an empty answer is no answer. Anything else -- text before, between or after
    the blocks, a repeated or nested tag, a missing tag -- scores 0.0. When the caller forced the
    completion to start with ``<think>\\n``, those characters must be part of ``completion``.
    """
    if not isinstance(completion, str):
        return 0.0
    match = _FORMAT.fullmatch(completion)
    if match is None:
        return 0.0
    think, answer = match.groups()
    return 1.0 if think.strip() and answer.strip() else 0.0
