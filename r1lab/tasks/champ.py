"""CHAMP (270 competition-style math problems) from the ``champ-dataset`` package.

CHAMP's reference answers are free-form ("0 is the only possible value", "C(10, 5), or
equivalently 252"); its authors graded them with an LLM. Only answers a rule can check are kept:
Yes/No answers (exact word match) and compact math (no prose, parseable by math-verify). That is
about 150 of the 270 problems; :func:`champ_problems` says which and why not.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from ..rewards.accuracy import validate_gold
from .base import Problem

__all__ = ["champ_answer_kind", "champ_problems"]

_YES_NO = {"yes", "no"}
# Words in an answer that make it prose rather than math (function names are fine).
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])(?!(?:sqrt|floor|ceil|log|ln|sin|cos|tan|exp|max|min|"
                         r"gcd|lcm|mod)(?![A-Za-z]))[A-Za-z]{3,}")


def champ_answer_kind(answer: str) -> str | None:
    """"choice" (Yes/No), "math" (rule-checkable expression) or None (free-form prose)."""
    text = answer.strip()
    if text.lower().rstrip(".") in _YES_NO:
        return "choice"
    if not text or _PROSE_WORD.search(text) or "..." in text:
        return None
    try:
        validate_gold(text)
    except ValueError:
        return None
    return "math"


def champ_problems() -> list[Problem]:
    """The rule-checkable CHAMP problems, in dataset order (``meta`` has identifier, category,
    answer_type)."""
    try:
        root = resources.files("champ_dataset")
    except ModuleNotFoundError as exc:
        raise ImportError("the 'champ' task needs the 'champ-dataset' package "
                          "(pip install champ-dataset==1.0.0)") from exc
    data = json.loads((root / "dataset_files" / "v0.json").read_text(encoding="utf-8"))
    problems = []
    for identifier, item in data["problems"].items():
        kind = champ_answer_kind(item["_answer"])
        if kind is None:
            continue
        gold = item["_answer"].strip().rstrip(".") if kind == "choice" else item["_answer"].strip()
        problems.append(Problem(
            question=item["_text"],
            gold=gold,
            meta={"identifier": identifier, "category": item["category"], "answer_type": kind},
        ))
    return problems
