"""Length shaping: DAPO's soft overlong punishment (DAPO §3.4)."""

from __future__ import annotations

__all__ = ["overlong_penalty"]


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """Penalty in [-1, 0] for a response of ``length`` tokens.

    0 while ``length <= max_len - cache_len``; then falls linearly, reaching -1 at ``max_len``;
    -1 beyond ``max_len``. ``cache_len`` is the width of the soft band (DAPO used 4,096 of 20,480).
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"cache_len must be in [0, max_len={max_len}], got {cache_len}")
    soft_start = max_len - cache_len
    if length <= soft_start:
        return 0.0
    if length > max_len:
        return -1.0
    return (soft_start - length) / cache_len
