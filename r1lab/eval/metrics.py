"""Evaluation metrics of the DeepSeek-R1 protocol: pass@1 over k samples, unbiased pass@k, cons@k.

R1 samples k responses per question (temperature 0.6, top-p 0.95) instead of decoding greedily and reports

    pass@1 = (1/k) * sum_i p_i                      (p_i = 1 if sample i is correct)
    cons@k = 1 if the majority-vote answer of the k samples is correct, else 0

averaged over questions. ``pass_at_k`` is the unbiased estimator of the probability that at least one of
k samples drawn without replacement from n generated samples (c of them correct) is correct.

Everything here is a pure function of its arguments; math-verify is imported lazily so importing this
module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Equivalence = Callable[[str, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c are correct.

        pass@k = 1 - C(n - c, k) / C(n, k)

    The binomial ratio is evaluated as the product  prod_{j=0}^{k-1} (n - c - j) / (n - j),  whose factors
    all lie in [0, 1], so it neither overflows (C(64, 32) is ~1.8e18) nor loses precision.

    Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if n < 0 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset must contain a correct sample
    all_wrong = 1.0
    for j in range(k):
        all_wrong *= (n - c - j) / (n - j)
    return 1.0 - all_wrong


def pass_at_1(correct: Sequence[bool]) -> float:
    """R1's pass@1 for one question: the mean correctness of its k samples, (1/k) * sum_i p_i."""
    if len(correct) == 0:
        raise ValueError("pass_at_1 needs at least one sample")
    return sum(1.0 for ok in correct if ok) / len(correct)


# ---------------------------------------------------------------------------------------------------------
# Majority vote with math-verify equivalence


def _quiet_math_verify() -> None:
    """math-verify warns on every call with timeouts off; we turn them off on purpose (see below)."""
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _parse_answer(answer: str) -> list:
    """Parse an already-extracted answer string with math-verify; [] when nothing parses.

    A bare answer is wrapped in $...$ first, because math-verify's plain-expression extractor takes the
    first number it sees ("2^{1/2}" would become 2), while the LaTeX extractor reads the whole string.
    Timeouts are disabled (parsing_timeout=None): math-verify implements them with SIGALRM, which raises
    off the main thread, and evaluation may run in worker threads.
    """
    from math_verify import parse

    _quiet_math_verify()
    text = answer.strip().rstrip(".").strip()
    if not text:
        return []
    if any(marker in text for marker in ("$", "\\boxed", "\\(", "\\[")):
        return parse(text, parsing_timeout=None)
    return parse(f"${text}$", parsing_timeout=None) or parse(text, parsing_timeout=None)


class MathVerifyEquivalence:
    """Callable ``(a, b) -> bool``: are two answer strings mathematically equal according to math-verify?

    Parses are cached per string, so grouping k answers into classes costs at most k parses. Identical
    strings (after stripping whitespace) are equal without parsing. ``a`` plays math-verify's "gold" role
    (verify is not symmetric for assignments such as "x=3" vs "3").
    """

    def __init__(self) -> None:
        self._parsed: dict[str, list] = {}

    def parsed(self, answer: str) -> list:
        if answer not in self._parsed:
            self._parsed[answer] = _parse_answer(answer)
        return self._parsed[answer]

    def __call__(self, a: str, b: str) -> bool:
        if a.strip() == b.strip():
            return True
        parsed_a, parsed_b = self.parsed(a), self.parsed(b)
        if not parsed_a or not parsed_b:
            return False  # an unparseable answer only matches itself, character for character
        from math_verify import verify

        return bool(verify(parsed_a, parsed_b, timeout_seconds=None))


def group_answers(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> list[list[int]]:
    """Group answer indices into equivalence classes, classes ordered by first occurrence.

    Each new answer is compared with the first member (the representative) of each existing class; the
    relation is not closed transitively, which keeps the cost at O(k * classes) comparisons. An exact string
    match is looked up in a dict before any comparison is made. None answers belong to no class.
    ``equivalent`` defaults to a fresh ``MathVerifyEquivalence`` (its parse cache lives for this call).
    """
    equivalent = equivalent or MathVerifyEquivalence()
    classes: list[list[int]] = []
    class_of_string: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        key = answer.strip()
        if key in class_of_string:
            classes[class_of_string[key]].append(index)
            continue
        for class_index, members in enumerate(classes):
            if equivalent(answers[members[0]], answer):
                break
        else:
            class_index = len(classes)
            classes.append([])
        classes[class_index].append(index)
        class_of_string[key] = class_index
    return classes


def majority_index(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> int | None:
    """Index of the representative (first occurrence) of the largest answer class; None if all are None.

    Ties go to the class whose first member appears earliest, so the vote is deterministic.
    """
    classes = group_answers(answers, equivalent)
    if not classes:
        return None
    # max() keeps the first of equal maxima; classes are already in first-occurrence order.
    return max(classes, key=len)[0]


def majority_vote(answers: Sequence[str | None], equivalent: Equivalence | None = None) -> str | None:
    """The majority answer among k samples (the first-occurring string of the winning class), or None.

    Answers are grouped by ``equivalent`` (default: math-verify equivalence, see ``group_answers``), so
    "1/2", "0.5" and "\\frac{1}{2}" vote together. None (no answer extracted) never wins.
    """
    winner = majority_index(answers, equivalent)
    return None if winner is None else answers[winner]


def cons_at_k(
    answers: Sequence[str | None],
    gold_correct: Callable[[str], bool] | Sequence[bool],
    equivalent: Equivalence | None = None,
) -> float:
    """cons@k for one question: 1.0 if the majority-vote answer is correct, else 0.0.

    ``gold_correct`` is either a function judging an answer string against the gold, or the per-answer
    correctness list aligned with ``answers`` (then the winning class is judged by its first member).
    A question where no sample produced an answer scores 0.
    """
    if not callable(gold_correct) and len(gold_correct) != len(answers):
        raise ValueError(f"cons_at_k: {len(answers)} answers but {len(gold_correct)} correctness flags")
    winner = majority_index(answers, equivalent)
    if winner is None:
        return 0.0
    if callable(gold_correct):
        return 1.0 if gold_correct(answers[winner]) else 0.0
    return 1.0 if gold_correct[winner] else 0.0


# ---------------------------------------------------------------------------------------------------------
# Aggregation over a benchmark


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _flat_field(per_question: Sequence[dict], field: str, sample_counts: list[int]) -> list[float] | None:
    """All per-sample values of ``field`` across the questions that have it; None if no question has it."""
    values: list[float] = []
    seen = False
    for index, (record, count) in enumerate(zip(per_question, sample_counts)):
        if field not in record:
            continue
        seen = True
        if len(record[field]) != count:
            raise ValueError(
                f"question {index}: field {field!r} has {len(record[field])} entries, "
                f"'correct' has {count}"
            )
        values.extend(float(v) for v in record[field])
    return values if seen else None


def _question_cons(record: dict, index: int) -> float:
    """cons@k of one question: the caller's "cons_correct" if given, else a math-verify majority vote."""
    if "cons_correct" in record:
        return 1.0 if record["cons_correct"] else 0.0
    if "answers" not in record:
        raise ValueError(f"question {index}: needs 'cons_correct' or 'answers' to compute cons@k")
    return cons_at_k(record["answers"], record["correct"])


def summarize(per_question: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Benchmark-level metrics from per-question records.

    Each record has "correct": list[bool] (one flag per sample) and optionally "answers", "lengths"
    (response tokens), "format_ok", "mixed_language" (lists aligned with "correct") and "cons_correct"
    (bool). Returns, averaged over questions unless noted:

        pass@1              mean_q (1/k_q) sum_i p_qi
        pass@k              mean_q pass_at_k(n_q, c_q, k), k = the smallest sample count of any question
        cons@k              mean_q cons_correct_q (a majority vote over "answers" when not given)
        response_length     mean over all samples        (only if "lengths" is present)
        format_rate         mean over all samples        (only if "format_ok" is present)
        mixed_language_rate mean over all samples        (only if "mixed_language" is present)
        n_questions, k
    """
    if not per_question:
        raise ValueError("summarize needs at least one question")
    sample_counts = []
    for index, record in enumerate(per_question):
        if not record.get("correct"):
            raise ValueError(f"question {index}: 'correct' must be a non-empty list of booleans")
        sample_counts.append(len(record["correct"]))
    k = min(sample_counts)

    summary: dict[str, float | int] = {
        "pass@1": _mean([pass_at_1(r["correct"]) for r in per_question]),
        "pass@k": _mean([pass_at_k(len(r["correct"]), sum(map(bool, r["correct"])), k) for r in per_question]),
        "cons@k": _mean([_question_cons(r, i) for i, r in enumerate(per_question)]),
    }
    for field, name in (("lengths", "response_length"), ("format_ok", "format_rate"),
                        ("mixed_language", "mixed_language_rate")):
        values = _flat_field(per_question, field, sample_counts)
        if values:
            summary[name] = _mean(values)
    summary["n_questions"] = len(per_question)
    summary["k"] = k
    return summary
