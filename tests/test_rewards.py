"""Rewards: extraction, accuracy (math-verify), format, language, code, overlong, composition."""

from __future__ import annotations

import threading
import time

import pytest

from r1lab.rewards import (
    RewardSpec,
    accuracy_reward,
    available_rewards,
    code_reward,
    compose_rewards,
    count_words_by_script,
    extract_answer,
    extract_boxed,
    extract_code,
    extract_think,
    format_reward,
    get_reward,
    is_mixed_language,
    language_consistency_reward,
    math_equal,
    overlong_penalty,
    register_reward,
    score_batch,
    strip_think,
)
from r1lab.rewards.judge_pool import JudgePool
from r1lab.sandbox import sandbox_available
from r1lab.tasks import Problem, load_task

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap sandbox unavailable")


def in_thread(fn, *args):
    """Run fn(*args) on a non-main thread; return its result or re-raise its exception."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------- extraction


def test_extract_answer_takes_last_answer_block():
    text = "<think>maybe <answer>1</answer></think> <answer> 2 </answer> then <answer>3</answer>"
    assert extract_answer(text) == "3"


def test_extract_answer_prefers_boxed_inside_answer_block():
    assert extract_answer("<answer>So \\boxed{\\frac{1}{2}}.</answer>") == "\\frac{1}{2}"


def test_extract_answer_falls_back_to_last_boxed_with_nested_braces():
    text = "first \\boxed{1} then \\boxed{\\frac{\\sqrt{2}}{2}} done"
    assert extract_answer(text) == "\\frac{\\sqrt{2}}{2}"


@pytest.mark.parametrize("text", ["", "no tags at all", "<answer></answer>", "<answer>   </answer>",
                                  "<answer>unterminated", "\\boxed{unbalanced", None, 42])
def test_extract_answer_none_when_missing_or_malformed(text):
    assert extract_answer(text) is None


def test_extract_boxed_variants():
    assert extract_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("\\boxed 5 is it") == "5"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{1} and broken \\boxed{2") == "1"  # last *well-formed* one
    assert extract_boxed("nothing") is None


def test_extract_think_and_strip_think():
    assert extract_think("<think> a </think><answer>b</answer>") == " a "
    assert extract_think("forced start </think> answer") == "forced start "
    assert extract_think("no thought") is None
    assert strip_think("<think>x</think> final") == "final"
    assert strip_think("just text") == "just text"


def test_extract_code_takes_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```py\ny = 2\n```\n```\nz = 3\n```"
    assert extract_code(text) == "z = 3\n"
    assert extract_code("```python\nprint(1)\n```") == "print(1)\n"
    assert extract_code("no code") is None
    assert extract_code("```python\nnot closed") is None


@pytest.mark.parametrize("text", ["<answer>x " * 20000, "<think>x " * 20000, "\\( x " * 20000,
                                  "\\[ x " * 20000, "\\boxed{" * 20000, "</answer>" * 20000,
                                  "<answer>\\boxed{" * 10000 + "</answer>"])
def test_degenerate_repetitive_output_is_scored_in_linear_time(text):
    start = time.monotonic()
    extract_answer(text)
    extract_think(text)
    extract_boxed(text)
    extract_code(text)
    format_reward(text)
    language_consistency_reward(text)
    assert accuracy_reward(text, "3") == 0.0
    assert time.monotonic() - start < 2.0  # the quadratic versions took 10-80 s


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("<answer>0.5</answer>", "1/2"),  # fraction vs decimal
        ("<answer>1/2</answer>", "0.5"),
        ("<answer>\\frac{1}{2}</answer>", "0.5"),
        ("<answer>1,000</answer>", "1000"),  # thousands separator
        ("<answer>1000</answer>", "1,000"),
        ("<answer>1,234,567</answer>", "1234567"),
        ("The answer is \\boxed{42}.", "42"),  # boxed, no answer tags
        ("<answer>\\boxed{42}</answer>", "42"),
        ("<answer>42</answer>", "\\boxed{42}"),
        ("<answer>\\frac{1}{\\sqrt{2}}</answer>", "\\frac{\\sqrt{2}}{2}"),  # radicals
        ("<answer>1/\\sqrt{2}</answer>", "\\sqrt{2}/2"),
        ("<answer>x = 3</answer>", "3"),  # equation vs value
        ("<answer>3</answer>", "x = 3"),
        ("<answer>The answer is 5 apples.</answer>", "5"),
        ("<answer>$-7$</answer>", "-7"),
        ("<answer>\\{2, 1\\}</answer>", "\\{1, 2\\}"),
        ("<answer>(x+1)^2</answer>", "x^2+2x+1"),
    ],
)
def test_accuracy_equivalent_forms_score_one(completion, gold):
    assert accuracy_reward(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("<answer>4</answer>", "3"),
        ("<answer>0.51</answer>", "1/2"),
        ("<answer>100</answer>", "1,000"),
        ("<answer>\\sqrt{3}/2</answer>", "\\sqrt{2}/2"),
        ("<answer>x = 4</answer>", "3"),
        ("no answer here, although 3 is the result", "3"),  # no extraction: no fishing
        ("", "3"),
        ("<answer></answer>", "3"),
        ("<answer>@@@</answer>", "3"),
        ("<answer>\\frac{1}{</answer>", "3"),
        ("<answer>" + "(" * 500 + "</answer>", "3"),
    ],
)
def test_accuracy_wrong_empty_or_malformed_answers_score_zero(completion, gold):
    assert accuracy_reward(completion, gold) == 0.0


@pytest.mark.parametrize("completion", [None, 3, b"<answer>3</answer>", ["<answer>3</answer>"]])
def test_accuracy_non_text_completion_scores_zero(completion):
    assert accuracy_reward(completion, "3") == 0.0


@pytest.mark.parametrize("gold", ["", "   ", "\n", "@@@", "???", None])
def test_unparseable_gold_raises_value_error(gold):
    with pytest.raises(ValueError):
        accuracy_reward("<answer>@@@</answer>", gold)
    with pytest.raises(ValueError):
        accuracy_reward("<answer>3</answer>", gold)


def test_gold_is_the_first_argument_of_verify():
    # math-verify compares a relation with an interval only when the *prediction* is the
    # interval. These two cases flip if gold and answer are swapped in verify().
    assert accuracy_reward("<answer>(1,2)</answer>", "1 < x < 2") == 1.0
    assert accuracy_reward("<answer>1 < x < 2</answer>", "(1,2)") == 0.0


def test_math_equal_works_the_same_off_the_main_thread():
    cases = [("1/2", "0.5", True), ("1,000", "1000", True), ("3", "x = 3", True), ("3", "4", False),
             ("3", None, False)]
    for gold, answer, expected in cases:
        assert math_equal(gold, answer) is expected
        assert in_thread(math_equal, gold, answer) is expected
    with pytest.raises(ValueError):
        in_thread(accuracy_reward, "<answer>1</answer>", "@@@")


def test_pathological_answer_is_time_bounded_on_and_off_the_main_thread():
    huge = "<answer>9^{9^{9^{9}}}</answer>"
    start = time.monotonic()
    assert accuracy_reward(huge, "3") == 0.0
    assert in_thread(accuracy_reward, huge, "3") == 0.0
    assert time.monotonic() - start < 20


def test_judge_pool_kills_a_helper_that_overruns():
    pool = JudgePool(max_processes=1, timeout_s=30, request_timeout_s=1.0)
    try:
        start = time.monotonic()
        assert pool.judge("3", "9^{9^{9^{9}}}") is False  # math-verify would take 30 s here
        assert time.monotonic() - start < 10
        assert pool.judge("1/2", "0.5") is True  # a fresh helper took over
    finally:
        pool.close()


def test_judge_pool_does_not_count_a_new_helpers_start_up_against_the_request():
    """Importing math-verify and sympy takes a new helper far longer than 0.3 s (more on a loaded machine);
    a correct answer must not count as wrong because the helper was still starting."""
    pool = JudgePool(max_processes=1, timeout_s=2, request_timeout_s=0.3)
    try:
        assert pool.judge("1/2", "0.5") is True
        assert pool.judge("2", "3") is False
    finally:
        pool.close()


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion",
    [
        "<think>reasoning</think><answer>42</answer>",
        " <think>\nreasoning\n</think>\n<answer>\n42\n</answer>\n",
        "<think>\nforced prefix is part of the completion</think> <answer>7</answer>",
    ],
)
def test_format_reward_accepts_exactly_think_then_answer(completion):
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "42",
        "<answer>42</answer>",
        "<think>only thinking</think>",
        "<answer>42</answer><think>wrong order</think>",
        "preamble <think>r</think><answer>42</answer>",
        "<think>r</think> between <answer>42</answer>",
        "<think>r</think><answer>42</answer> trailing",
        "<think>r</think><answer>42</answer><answer>43</answer>",
        "<think>a</think><think>b</think><answer>42</answer>",
        "<think>outer <think>nested</think></think><answer>42</answer>",
        "<think>r <answer>1</answer></think><answer>42</answer>",
        "<think>   </think><answer>42</answer>",
        "<think>r</think><answer>  </answer>",
        "<think>r</think><answer>42",
        None,
    ],
)
def test_format_reward_rejects_everything_else(completion):
    assert format_reward(completion) == 0.0


# ----------------------------------------------------------------------------- language


def test_language_reward_english_and_chinese():
    assert language_consistency_reward("<think>We add the two numbers.</think>", "en") == 1.0
    assert language_consistency_reward("<think>我们把两个数相加</think>", "zh") == 1.0
    assert language_consistency_reward("<think>我们把两个数相加</think>", "en") == 0.0
    # 4 English words + 4 Han characters -> half each
    mixed = "<think>we add them all 我们相加</think><answer>3</answer>"
    assert language_consistency_reward(mixed, "en") == pytest.approx(0.5)
    assert language_consistency_reward(mixed, "zh") == pytest.approx(0.5)


def test_language_reward_ignores_numbers_punctuation_math_and_variables():
    text = "<think>设 $x^2 + \\frac{1}{2} = 3$，则 x = 5, y = 12.5 !!! \\sqrt{2}</think>"
    assert count_words_by_script(text) == {"han": 2}
    assert language_consistency_reward(text, "zh") == 1.0


def test_language_reward_uses_think_block_only_when_present():
    text = "<think>纯中文思考</think><answer>The final answer in English</answer>"
    assert language_consistency_reward(text, "zh") == 1.0
    assert language_consistency_reward("No think tags, plain English.", "en") == 1.0


def test_language_reward_empty_and_wordless_text_is_consistent():
    assert language_consistency_reward("", "en") == 1.0
    assert language_consistency_reward("<think>1 + 2 = 3</think>", "zh") == 1.0
    assert language_consistency_reward(None, "en") == 1.0


def test_language_reward_range_and_unknown_language():
    for text in ["abc def 中文", "Привет мир and hello", "x"]:
        assert 0.0 <= language_consistency_reward(text, "en") <= 1.0
    with pytest.raises(ValueError):
        language_consistency_reward("text", "klingon")


def test_is_mixed_language():
    assert not is_mixed_language("<think>all english words here</think>", 0.9)
    assert not is_mixed_language("<think>全部是中文</think>", 0.9)
    assert is_mixed_language("<think>half english 一半中文</think>", 0.9)
    assert is_mixed_language("<think>all english words here</think>", 0.9, language="zh")
    assert not is_mixed_language("", 0.9)


# ----------------------------------------------------------------------------- code


@needs_sandbox
def test_code_reward_pass_fail_and_missing_program():
    tests = "assert add(2, 3) == 5\n"
    assert code_reward("def add(a, b):\n    return a + b\n", tests) == 1.0
    assert code_reward("def add(a, b):\n    return a - b\n", tests) == 0.0
    completion = "<think>easy</think>\n```python\ndef add(a, b):\n    return a + b\n```"
    assert code_reward(completion, tests) == 1.0
    assert code_reward("```python\nbroken", tests) == 0.0
    assert code_reward("", tests) == 0.0
    assert code_reward(None, tests) == 0.0
    assert code_reward("def add(a, b):\n    while True: pass\n", tests, timeout_s=1.0) == 0.0


# ----------------------------------------------------------------------------- overlong


def test_overlong_penalty_dapo_shape():
    assert overlong_penalty(100, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(800, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(900, max_len=1000, cache_len=200) == pytest.approx(-0.5)
    assert overlong_penalty(1000, max_len=1000, cache_len=200) == pytest.approx(-1.0)
    assert overlong_penalty(1001, max_len=1000, cache_len=200) == -1.0
    assert overlong_penalty(1000, max_len=1000, cache_len=0) == 0.0
    assert overlong_penalty(1001, max_len=1000, cache_len=0) == -1.0
    with pytest.raises(ValueError):
        overlong_penalty(10, max_len=100, cache_len=200)


# ----------------------------------------------------------------------------- composition


PROBLEM = Problem(question="What is 1+2?", gold="3")


def test_compose_rewards_components_and_weighted_total():
    reward = compose_rewards({"accuracy": 1.0, "format": 0.5, "language": 0.1})
    good = reward("<think>one plus two</think><answer>3</answer>", PROBLEM)
    assert good == pytest.approx({"accuracy": 1.0, "format": 1.0, "language": 1.0, "total": 1.6})
    bad = reward("<answer>4</answer>", PROBLEM)
    assert bad["accuracy"] == 0.0 and bad["format"] == 0.0 and bad["total"] == pytest.approx(0.1)


def test_compose_rewards_params_and_overlong_length():
    spec = {"accuracy": 1.0,
            "overlong": {"weight": 1.0, "max_len": 100, "cache_len": 20},
            "language": {"weight": 0.5, "language": "zh"}}
    reward = compose_rewards(spec)
    out = reward("<think>想</think><answer>3</answer>", PROBLEM, length=90)
    assert out["overlong"] == pytest.approx(-0.5)
    assert out["language"] == 1.0
    assert out["total"] == pytest.approx(1.0 - 0.5 + 0.5)
    with pytest.raises(ValueError):
        reward("<answer>3</answer>", PROBLEM)  # overlong needs a token length


def test_registry_and_spec_errors():
    assert {"accuracy", "format", "language", "code", "overlong"} <= set(available_rewards())
    assert get_reward("format")("<think>a</think><answer>b</answer>", None) == 1.0

    @register_reward("test_length_chars")
    def length_chars(completion, problem, *, scale=1.0):
        return scale * len(completion)

    assert compose_rewards({"test_length_chars": {"weight": 2.0, "scale": 0.5}})("abcd", PROBLEM)[
        "total"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown reward"):
        compose_rewards({"nope": 1.0})
    with pytest.raises(ValueError):
        RewardSpec.from_dict({"accuracy": "heavy"})
    with pytest.raises(ValueError):
        RewardSpec.from_dict({})


class CountingRM:
    """A fake learned reward model that records how it was called."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [float(len(r)) for r in responses]


def test_reward_model_term_is_batched_and_weighted():
    rm = CountingRM()
    reward = compose_rewards({"format": 1.0, "reward_model": {"weight": 0.5, "on": "summary"}},
                             reward_models=rm)
    problems = [PROBLEM, PROBLEM, PROBLEM]
    completions = ["<think>a</think><answer>3</answer>", "<think>b</think>xy", "plain"]
    results = reward.batch(problems, completions, workers=2)
    assert len(rm.calls) == 1  # one call for the whole batch
    prompts, responses = rm.calls[0]
    assert prompts == [PROBLEM.question] * 3
    assert responses == ["<answer>3</answer>", "xy", "plain"]  # summary = text after </think>
    assert [r["reward_model"] for r in results] == [18.0, 2.0, 5.0]
    assert results[0]["total"] == pytest.approx(1.0 + 9.0)


def test_score_batch_uses_the_task_scorer_in_worker_threads():
    task = load_task("chain_sum", "train", size=12, seed=3)
    completions = [f"<think>add</think><answer>{p.gold}</answer>" if i % 2 == 0
                   else "<think>add</think><answer>not a number</answer>"
                   for i, p in enumerate(task.problems)]
    results = score_batch(task, task.problems, completions, {"accuracy": 1.0, "format": 1.0},
                          workers=4)
    assert [r["accuracy"] for r in results] == [1.0 if i % 2 == 0 else 0.0 for i in range(12)]
    assert all(r["format"] == 1.0 for r in results)
    assert [r["total"] for r in results] == [2.0 if i % 2 == 0 else 1.0 for i in range(12)]


def test_score_batch_math_in_threads_matches_serial():
    problems = [Problem(question=f"q{i}", gold=g) for i, g in enumerate(["1/2", "1,000", "3", "7"])]
    completions = ["<answer>0.5</answer>", "<answer>1000</answer>", "<answer>x=3</answer>",
                   "<answer>8</answer>"]
    threaded = score_batch(None, problems, completions, {"accuracy": 1.0}, workers=4)
    serial = score_batch(None, problems, completions, {"accuracy": 1.0}, workers=1)
    assert [r["accuracy"] for r in threaded] == [r["accuracy"] for r in serial] == [1, 1, 1, 0]


@needs_sandbox
def test_score_batch_code_problems_go_through_the_sandbox():
    tests = "assert sq(3) == 9\n"
    problems = [Problem(question="square", gold=tests, tests=tests)] * 3
    completions = ["```python\ndef sq(x):\n    return x * x\n```",
                   "```python\ndef sq(x):\n    return x + x\n```",
                   "no code"]
    results = score_batch(None, problems, completions, {"accuracy": 1.0}, workers=3)
    assert [r["accuracy"] for r in results] == [1.0, 0.0, 0.0]
