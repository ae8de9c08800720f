"""Tests of r1lab.eval.metrics against hand-computed values and brute-force enumeration."""

import itertools
import math
import random
import threading

import pytest

from r1lab.eval.metrics import (
    MathVerifyEquivalence,
    cons_at_k,
    group_answers,
    majority_vote,
    pass_at_1,
    pass_at_k,
    summarize,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_hand_computed():
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # pass@1 is c/n
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: every pair holds a correct one
    assert pass_at_k(4, 4, 4) == 1.0


def test_pass_at_k_matches_brute_force_enumeration():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 10)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - math.comb(1000 - 7, 500) / math.comb(1000, 500)
    assert pass_at_k(1000, 7, 500) == pytest.approx(exact, rel=1e-12)
    assert 0.0 < pass_at_k(1000, 1, 1) < 0.0011


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_1_is_mean_correctness():
    assert pass_at_1([True, False, False, True]) == 0.5
    assert pass_at_1([False, False, True]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pass_at_1([])


def test_majority_vote_groups_equivalent_forms():
    # Three spellings of one half outvote two singletons, although "7" comes first.
    answers = ["7", "1/2", "0.5", "3", "\\frac{1}{2}"]
    assert majority_vote(answers) == "1/2"
    assert group_answers(answers) == [[0], [1, 2, 4], [3]]


def test_majority_vote_ignores_none():
    # Four None answers would "win" if None were a class.
    assert majority_vote([None, None, None, None, "4", "5", "4"]) == "4"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_tie_goes_to_first_occurrence():
    assert majority_vote(["5", "4", "4", "5"]) == "5"
    assert majority_vote(["4", "5", "5", "4"]) == "4"
    assert majority_vote([None, "9", "8"]) == "9"


def test_exact_string_fast_path_skips_the_equivalence_function():
    calls = []

    def counting_equal(a, b):
        calls.append((a, b))
        return a == b

    answers = ["a", "b", "a", "a", " b ", "c"]
    assert group_answers(answers, counting_equal) == [[0, 2, 3], [1, 4], [5]]
    # only genuinely new strings are compared, each against the representatives so far: b-a, c-a, c-b
    assert calls == [("a", "b"), ("a", "c"), ("b", "c")]


def test_math_verify_equivalence_caches_parses(monkeypatch):
    import r1lab.eval.metrics as metrics

    parsed = []
    real_parse = metrics._parse_answer
    monkeypatch.setattr(metrics, "_parse_answer", lambda s: parsed.append(s) or real_parse(s))
    answers = ["1/2", "2", "0.5", "3", "2.0", "\\frac{1}{2}", "3"]
    assert majority_vote(answers) == "1/2"
    assert sorted(parsed) == sorted(set(answers))  # each distinct string parsed exactly once


def test_math_verify_equivalence_distinguishes_values():
    equal = MathVerifyEquivalence()
    assert equal("1/2", "\\frac{1}{2}")
    assert equal("2^{1/2}", "\\sqrt{2}")
    assert not equal("1/2", "1/3")
    assert not equal("hello", "world")  # unparseable strings only match themselves
    assert equal("hello", " hello ")


def test_majority_vote_works_off_the_main_thread():
    # math-verify's default SIGALRM timeouts raise outside the main thread; ours are disabled.
    result = {}
    thread = threading.Thread(target=lambda: result.update(vote=majority_vote(["0.25", "1/4", "3"])))
    thread.start()
    thread.join()
    assert result == {"vote": "0.25"}


def test_cons_at_k_with_callable_and_with_list():
    answers = ["1/2", "3", "0.5", None, "3", "\\frac12"]
    assert cons_at_k(answers, lambda a: a == "1/2") == 1.0
    assert cons_at_k(answers, lambda a: a == "3") == 0.0
    # per-answer flags: the winning class is judged by its first member (index 0)
    assert cons_at_k(answers, [True, False, True, False, False, True]) == 1.0
    assert cons_at_k(answers, [False, True, False, False, True, False]) == 0.0
    assert cons_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError):
        cons_at_k(answers, [True])


def test_summarize_averages_over_questions():
    per_question = [
        {"correct": [True, False, False, False], "answers": ["1", "2", "2", "3"], "lengths": [10, 20, 30, 40],
         "format_ok": [True, True, False, True], "mixed_language": [False, False, False, True]},
        {"correct": [True, True, True, False], "cons_correct": True, "answers": ["x", "x", "x", "y"],
         "lengths": [5, 5, 5, 5], "format_ok": [True, True, True, True], "mixed_language": [False] * 4},
    ]
    summary = summarize(per_question)
    assert summary["pass@1"] == pytest.approx((0.25 + 0.75) / 2)
    assert summary["pass@k"] == pytest.approx(1.0)  # k = 4 = n: any correct sample counts
    assert summary["cons@k"] == pytest.approx(0.5)  # q0 majority "2" is wrong; q1 given as correct
    assert summary["response_length"] == pytest.approx((100 + 20) / 8)
    assert summary["format_rate"] == pytest.approx(7 / 8)
    assert summary["mixed_language_rate"] == pytest.approx(1 / 8)
    assert summary["n_questions"] == 2
    assert summary["k"] == 4


def test_summarize_uses_smallest_sample_count_for_pass_at_k_and_omits_absent_fields():
    summary = summarize([
        {"correct": [True, False], "cons_correct": False},
        {"correct": [False, False, True, False], "cons_correct": False},
    ])
    assert summary["k"] == 2
    assert summary["pass@k"] == pytest.approx((1.0 + pass_at_k(4, 1, 2)) / 2)
    assert summary["cons@k"] == 0.0
    assert "mixed_language_rate" not in summary and "response_length" not in summary


def test_summarize_rejects_bad_records():
    with pytest.raises(ValueError, match="question 1"):
        summarize([{"correct": [True], "cons_correct": True}, {"correct": []}])
    with pytest.raises(ValueError, match="lengths"):
        summarize([{"correct": [True, False], "lengths": [3], "cons_correct": True}])
    with pytest.raises(ValueError, match="cons_correct"):
        summarize([{"correct": [True]}])
    with pytest.raises(ValueError):
        summarize([])
