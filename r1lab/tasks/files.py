"""Tasks read from JSONL or parquet files, with a field mapping and gold-answer extraction."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from ..rewards.extract import extract_boxed
from .base import Problem, TaskDataError

__all__ = ["ANSWER_FORMATS", "gold_from_text", "read_jsonl_problems", "read_parquet_problems", "write_jsonl_problems"]

ANSWER_FORMATS = ("auto", "gsm8k", "boxed", "raw")


def gold_from_text(text: str, answer_format: str = "auto") -> str | None:
    """The gold answer inside a reference answer/solution text, or None when it has none.

    ``gsm8k``: what follows the last ``####``; ``boxed``: the content of the last ``\\boxed{}``
    (MATH-style solutions; nested braces kept); ``raw``: the text itself; ``auto``: gsm8k when the
    text has ``####``, boxed when it has ``\\boxed``, raw otherwise.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if answer_format == "auto":
        if "####" in text:
            answer_format = "gsm8k"
        elif "\\boxed" in text or "\\fbox" in text:
            answer_format = "boxed"
        else:
            answer_format = "raw"
    if answer_format == "gsm8k":
        gold = text.rsplit("####", 1)[1].strip() if "####" in text else None
    elif answer_format == "boxed":
        gold = extract_boxed(text)
    else:
        gold = text.strip()
    return gold or None


def _field(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise TaskDataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    return record[name]


def _to_problem(record: Any, where: str, *, question_field: str, answer_field: str,
                tests_field: str | None, answer_format: str) -> Problem:
    question = _field(record, question_field, where)
    if not isinstance(question, str) or not question.strip():
        raise TaskDataError(f"{where}: field {question_field!r} must be non-empty text")
    meta = {"where": where}
    if tests_field is not None:
        tests = _field(record, tests_field, where)
        if not isinstance(tests, str) or not tests.strip():
            raise TaskDataError(f"{where}: field {tests_field!r} must be non-empty test code")
        answer = record.get(answer_field)
        meta["reference"] = answer
        return Problem(question=question, gold=tests, tests=tests, meta=meta)
    answer = _field(record, answer_field, where)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskDataError(f"{where}: field {answer_field!r} must be text or a number, "
                            f"got {type(answer).__name__}")
    gold = gold_from_text(str(answer), answer_format)
    if gold is None:
        expected = {"gsm8k": "a '#### answer' line", "boxed": "a \\boxed{...} answer"}.get(
            answer_format, "an answer")
        raise TaskDataError(f"{where}: field {answer_field!r} has no gold answer "
                            f"(format {answer_format!r} expects {expected}): {str(answer)[:200]!r}")
    meta["reference"] = answer
    return Problem(question=question, gold=gold, meta=meta)


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def read_jsonl_problems(path: str, *, question_field: str = "question", answer_field: str = "answer",
                        tests_field: str | None = None, answer_format: str = "auto") -> list[Problem]:
    """Problems from a JSON-lines file (one object per line; blank lines skipped).

    Errors name the file, the line and the field. With ``tests_field`` the rows are code problems
    (gold = tests); otherwise the gold is taken from ``answer_field`` by ``answer_format``.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path}")
    problems = [_to_problem(record, where, question_field=question_field, answer_field=answer_field,
                            tests_field=tests_field, answer_format=answer_format)
                for where, record in _jsonl_records(path)]
    if not problems:
        raise TaskDataError(f"{path}: no records")
    return problems


def read_parquet_problems(path: str, *, question_field: str = "question", answer_field: str = "answer",
                          tests_field: str | None = None, answer_format: str = "auto") -> list[Problem]:
    """Problems from a parquet file (needs pyarrow); errors name the file, the row and the field."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs the 'pyarrow' package, which is not installed "
                          f"(pip install pyarrow)") from exc
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path}")
    rows = pq.read_table(path).to_pylist()
    problems = [_to_problem(row, f"{path} row {i}", question_field=question_field,
                            answer_field=answer_field, tests_field=tests_field,
                            answer_format=answer_format)
                for i, row in enumerate(rows)]
    if not problems:
        raise TaskDataError(f"{path}: no rows")
    return problems


def write_jsonl_problems(problems: list[Problem], path: str) -> int:
    """Write math problems as {"question", "answer"} lines that `jsonl:PATH` reads back (answer_format raw),
    e.g. to train on a machine without reasoning-gym. Returns the number of lines written."""
    from r1lab.fsutil import atomic_write_text

    lines = []
    for i, p in enumerate(problems):
        if p.tests is not None:
            raise TaskDataError(f"problem {i} is a code problem: only math problems can be exported")
        lines.append(json.dumps({"question": p.question, "answer": p.gold}, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))
    return len(lines)
