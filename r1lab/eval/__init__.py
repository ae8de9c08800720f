"""R1-protocol evaluation: pass@1 over k samples, unbiased pass@k, cons@k (majority vote), and the HTML
run report. ``write_report`` imports matplotlib only when it draws, so importing this package is cheap."""

from r1lab.eval.metrics import (
    MathVerifyEquivalence,
    cons_at_k,
    group_answers,
    majority_index,
    majority_vote,
    pass_at_1,
    pass_at_k,
    summarize,
)
from r1lab.eval.report import reflection_word_frequency, write_report

__all__ = [
    "MathVerifyEquivalence",
    "cons_at_k",
    "group_answers",
    "majority_index",
    "majority_vote",
    "pass_at_1",
    "pass_at_k",
    "reflection_word_frequency",
    "summarize",
    "write_report",
]
