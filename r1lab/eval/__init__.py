"""R1-protocol evaluation: pass@1 over k samples, unbiased pass@k, cons@k (majority vote), and the HTML
run report, and the sample-and-score loop they and rejection sampling share. ``write_report`` imports matplotlib
only when it draws, so importing this package is cheap."""

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
from r1lab.eval.runner import EvalConfig, evaluate, evaluate_benchmarks
from r1lab.eval.sampling import SampledProblem, sample_and_score

__all__ = [
    "EvalConfig",
    "MathVerifyEquivalence",
    "SampledProblem",
    "cons_at_k",
    "evaluate",
    "evaluate_benchmarks",
    "group_answers",
    "majority_index",
    "majority_vote",
    "pass_at_1",
    "pass_at_k",
    "reflection_word_frequency",
    "sample_and_score",
    "summarize",
    "write_report",
]
