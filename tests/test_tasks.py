"""Tasks: reasoning-gym sources and splits, JSONL/parquet files, HumanEval, CHAMP, templates."""

from __future__ import annotations

import importlib.util
import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from r1lab.rewards import code_reward
from r1lab.sandbox import sandbox_available
from r1lab.tasks import (
    MATH_INSTRUCTION,
    R1_ZERO_TEMPLATE,
    Problem,
    Task,
    TaskDataError,
    chat_prompt,
    gold_from_text,
    load_task,
    render_prompt,
)

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap sandbox unavailable")


def answer(text: str) -> str:
    return f"<think>thinking</think> <answer>{text}</answer>"


# ----------------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize("name", ["countdown", "chain_sum", "basic_arithmetic", "gsm_symbolic",
                                  "simple_equations"])
def test_reasoning_gym_tasks_load_and_score_their_gold(name):
    task = load_task(name, "train", size=6, seed=1)
    assert task.name == name and len(task) == 6
    for problem in task:
        assert isinstance(problem, Problem) and problem.question and problem.gold
        assert task.score(problem, answer(problem.gold)) == 1.0
        assert task.score(problem, "no answer at all") == 0.0


def test_reasoning_gym_train_and_test_are_disjoint():
    train = load_task("chain_sum", "train", size=400, seed=0, min_terms=2, max_terms=2, min_digits=1,
                      max_digits=1)
    test = load_task("chain_sum", "test", size=400, seed=0, min_terms=2, max_terms=2, min_digits=1,
                     max_digits=1)
    # one-digit two-term sums have only a few hundred distinct questions, so unrelated draws
    # would overlap heavily; the hash partition keeps the splits apart
    assert not {p.question for p in train} & {p.question for p in test}
    # ... also across different seeds
    other_seed = load_task("chain_sum", "test", size=200, seed=7, min_terms=2, max_terms=2,
                           min_digits=1, max_digits=1)
    assert not {p.question for p in train} & {p.question for p in other_seed}


def test_reasoning_gym_is_deterministic_per_seed():
    a = load_task("basic_arithmetic", "train", size=20, seed=5)
    b = load_task("basic_arithmetic", "train", size=20, seed=5)
    c = load_task("basic_arithmetic", "train", size=20, seed=6)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_reasoning_gym_options_are_passed_through():
    task = load_task("chain_sum", "train", size=30, seed=0, min_terms=4, max_terms=4)
    assert all(p.meta["entry"]["metadata"]["num_terms"] == 4 for p in task)
    with pytest.raises(ValueError, match="bad option"):
        load_task("chain_sum", "train", size=3, seed=0, no_such_option=1)


def test_reasoning_gym_uses_its_own_scorer_not_string_match():
    task = load_task("countdown", "train", size=3, seed=2)
    problem = task[0]
    numbers = problem.meta["entry"]["metadata"]["numbers"]
    target = problem.meta["entry"]["metadata"]["target"]
    gold_expr = problem.gold
    # the same expression with whitespace removed is a different string but a correct answer
    alternative = gold_expr.replace(" ", "")
    assert alternative != gold_expr or " " not in gold_expr
    assert eval(alternative) == target and numbers  # noqa: S307 - our own test data
    assert task.score(problem, answer(alternative)) == 1.0
    assert task.score(problem, f"\\boxed{{{alternative}}}") == 1.0
    assert task.score(problem, answer("1+1")) < 1.0


def test_unknown_task_name_suggests_close_matches():
    with pytest.raises(ValueError, match="chain_sum"):
        load_task("chain_summ", "train", size=3)
    with pytest.raises(ValueError):
        load_task("chain_sum", "validation", size=3)
    with pytest.raises(ValueError):
        load_task("chain_sum", "train", size=None)


def test_tasks_pickle_for_worker_processes():
    task = load_task("chain_sum", "train", size=4, seed=0)
    clone = pickle.loads(pickle.dumps(task))
    assert clone.score(clone[0], answer(clone[0].gold)) == 1.0


# ----------------------------------------------------------------------------- files


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_gold_from_text_formats():
    assert gold_from_text("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert gold_from_text("lots of work\n#### 1,000") == "1,000"
    assert gold_from_text("so $\\boxed{\\frac{\\sqrt{2}}{2}}$.") == "\\frac{\\sqrt{2}}{2}"
    assert gold_from_text("\\boxed{\\{1, \\{2\\}\\}}", "boxed") == "\\{1, \\{2\\}\\}"
    assert gold_from_text("  42 ") == "42"
    assert gold_from_text("no marker", "gsm8k") is None
    assert gold_from_text("no box", "boxed") is None
    with pytest.raises(ValueError):
        gold_from_text("x", "latex")


def test_jsonl_gsm8k_style(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        "",  # blank lines are skipped
        {"question": "A big sum?", "answer": "...\n#### 1,000"},
    ])
    task = load_task(f"jsonl:{path}", "train")
    assert [p.gold for p in task] == ["7", "1,000"]
    assert task.score(task[0], answer("7")) == 1.0
    assert task.score(task[1], answer("1000")) == 1.0
    assert task.score(task[1], answer("100")) == 0.0


def test_jsonl_math_style_boxed_with_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Simplify 1/sqrt(2).", "solution": "Rationalize: $\\boxed{\\frac{\\sqrt{2}}{2}}$"},
        {"problem": "Half?", "solution": "It is \\boxed{\\frac{1}{2}}."},
    ])
    task = load_task(f"jsonl:{path}", "test", question_field="problem", answer_field="solution",
                     answer_format="boxed")
    assert [p.gold for p in task] == ["\\frac{\\sqrt{2}}{2}", "\\frac{1}{2}"]
    assert task.score(task[0], answer("1/\\sqrt{2}")) == 1.0
    assert task.score(task[1], "\\boxed{0.5}") == 1.0


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "#### 1"},
        {"question": "no answer here"},
    ])
    with pytest.raises(TaskDataError) as err:
        load_task(f"jsonl:{path}")
    assert f"{path}:2" in str(err.value) and "'answer'" in str(err.value)

    path = write_jsonl(tmp_path / "broken.jsonl", [{"question": "a", "answer": "1"}, "{not json"])
    with pytest.raises(TaskDataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_task(f"jsonl:{path}")

    path = write_jsonl(tmp_path / "nomarker.jsonl", [{"question": "a", "answer": "7"}])
    with pytest.raises(TaskDataError, match=r"nomarker\.jsonl:1.*####"):
        load_task(f"jsonl:{path}", answer_format="gsm8k")

    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(TaskDataError, match="JSON object"):
        load_task(f"jsonl:{path}")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskDataError, match="no records"):
        load_task(f"jsonl:{empty}")
    with pytest.raises(FileNotFoundError):
        load_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(TypeError, match="unknown option"):
        load_task(f"jsonl:{path}", questionfield="q")


def test_jsonl_holdout_fraction_makes_disjoint_splits(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(200)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    train = load_task(f"jsonl:{path}", "train", holdout_fraction=0.25)
    test = load_task(f"jsonl:{path}", "test", holdout_fraction=0.25)
    assert len(train) + len(test) == 200 and 20 < len(test) < 80
    assert not {p.question for p in train} & {p.question for p in test}
    subset = load_task(f"jsonl:{path}", "train", size=10, seed=3)
    assert len(subset) == 10
    assert [p.question for p in subset] == [p.question for p in load_task(f"jsonl:{path}", size=10, seed=3)]


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ImportError, match="pyarrow"):
            load_task(f"parquet:{tmp_path / 'x.parquet'}")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"q": ["1+1?", "2+2?"], "a": ["#### 2", "#### 4"]}), path)
    task = load_task(f"parquet:{path}", question_field="q", answer_field="a")
    assert [p.gold for p in task] == ["2", "4"]
    pq.write_table(pa.table({"q": ["1+1?"]}), path)
    with pytest.raises(TaskDataError, match="row 0.*'a'"):
        load_task(f"parquet:{path}", question_field="q", answer_field="a")


# ----------------------------------------------------------------------------- HumanEval


def check_all(programs, problems, workers=4):
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: code_reward(pair[0], pair[1].tests), zip(programs, problems)))


def test_humaneval_problems():
    task = load_task("humaneval", "test")
    assert len(task) == 164
    first = task[0]
    assert first.meta["task_id"] == "HumanEval/0" and first.tests.rstrip().endswith(
        f"check({first.meta['entry_point']})")
    assert first.gold == first.tests
    with pytest.raises(ValueError, match="evaluation set"):
        load_task("humaneval", "train")


@needs_sandbox
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail_fast_subset():
    task = load_task("humaneval", "test", size=20, seed=0)
    canonical = [p.meta["canonical_solution"] for p in task]
    assert check_all(canonical, task.problems) == [1.0] * 20
    # body replaced by `return None`
    stubbed = [p.meta["code_prefix"] + "    return None\n" for p in task]
    assert check_all(stubbed, task.problems) == [0.0] * 20
    # through the task's scorer, as a model completion would arrive
    for p in task.problems[:3]:
        assert task.score(p, f"<think>ok</think>\n```python\n{p.meta['canonical_solution']}\n```") == 1.0
        assert task.score(p, "```python\n" + p.meta["code_prefix"] + "    pass\n```") == 0.0


MUTATE = """

_original_solution = {entry}


def _wrong(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, (str, list, tuple)):
        return value + type(value)(["?"] if not isinstance(value, str) else "?")
    return "wrong"


def {entry}(*args, **kwargs):
    return _wrong(_original_solution(*args, **kwargs))
"""


@needs_sandbox
def test_all_164_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    task = load_task("humaneval", "test")
    canonical = [p.meta["canonical_solution"] for p in task]
    assert check_all(canonical, task.problems) == [1.0] * 164
    # the body replaced by `pass` (returns None)
    stubbed = [p.meta["code_prefix"] + "    pass\n" for p in task]
    assert sum(check_all(stubbed, task.problems)) == 0
    # mutants: the canonical solution, but every result is altered
    mutants = [p.meta["canonical_solution"] + MUTATE.format(entry=p.meta["entry_point"]) for p in task]
    assert sum(check_all(mutants, task.problems)) == 0


@needs_sandbox
def test_code_task_from_jsonl(tmp_path):
    tests = "assert double(4) == 8\n"
    path = write_jsonl(tmp_path / "code.jsonl", [{"prompt": "Write double(x).", "tests": tests}])
    task = load_task(f"jsonl:{path}", question_field="prompt", tests_field="tests")
    assert task[0].tests == tests
    assert task.score(task[0], "```python\ndef double(x):\n    return 2 * x\n```") == 1.0
    assert task.score(task[0], "```python\ndef double(x):\n    return x\n```") == 0.0


# ----------------------------------------------------------------------------- CHAMP


def test_champ_rule_checkable_problems():
    task = load_task("champ", "test")
    assert 100 < len(task) <= 270
    kinds = {p.meta["answer_type"] for p in task}
    assert kinds == {"math", "choice"}
    for problem in task.problems[:40]:
        assert task.score(problem, answer(problem.gold)) == 1.0
    yes_no = next(p for p in task if p.meta["answer_type"] == "choice")
    wrong = "Yes" if yes_no.gold.lower() == "no" else "No"
    assert task.score(yes_no, answer(yes_no.gold.lower() + ".")) == 1.0
    assert task.score(yes_no, answer(wrong)) == 0.0
    numeric = next(p for p in task if p.gold == "239")
    assert task.score(numeric, answer("240")) == 0.0
    with pytest.raises(ValueError, match="evaluation set"):
        load_task("champ", "train")
    train = load_task("champ", "train", holdout_fraction=0.3)
    test = load_task("champ", "test", holdout_fraction=0.3)
    assert not {p.question for p in train} & {p.question for p in test}
    assert len(train) + len(test) == len(task)


# ----------------------------------------------------------------------------- templates


def test_r1_zero_template_text():
    assert R1_ZERO_TEMPLATE == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>. User: {question}. Assistant:")
    prompt = R1_ZERO_TEMPLATE.format(question="What is 2+2?")
    assert prompt.endswith("User: What is 2+2?. Assistant:")
    assert render_prompt("r1_zero", "What is 2+2?") == prompt


def fake_chat_template(messages, tokenize=True, add_generation_prompt=False):
    assert tokenize is False and add_generation_prompt is True
    return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def test_chat_prompt_appends_the_math_instruction():
    text = render_prompt("chat", "What is 2+2?", apply_chat_template=fake_chat_template)
    assert text == ("<|user|>What is 2+2?\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.<|assistant|>")
    assert MATH_INSTRUCTION in text
    forced = render_prompt("chat", "Q", apply_chat_template=fake_chat_template, force_think=True)
    assert forced.endswith("<|assistant|><think>\n")
    assert render_prompt("r1_zero", "Q", force_think=True).endswith("Assistant: <think>")
    with pytest.raises(ValueError, match="apply_chat_template"):
        render_prompt("chat", "Q")


def test_custom_templates():
    template = "Solve: {question}\nAnswer in \\boxed{} please. {\"json\": true}"
    assert render_prompt(template, "1+1") == "Solve: 1+1\nAnswer in \\boxed{} please. {\"json\": true}"
    assert render_prompt("plain", "1+1") == "1+1"
    with pytest.raises(ValueError, match="question"):
        render_prompt("no placeholder here", "1+1")


def test_export_task_round_trips_to_the_same_splits(tmp_path):
    """`r1lab export-task` writes train + held-out problems that jsonl:PATH splits back exactly."""
    from typer.testing import CliRunner

    from r1lab.cli import app
    from r1lab.train.grpo import TaskConfig

    out = tmp_path / "chain_sum.jsonl"
    result = CliRunner().invoke(app, ["export-task", "chain_sum", str(out), "--train-size", "40", "--test-size", "12"])
    assert result.exit_code == 0, result.output
    fraction = result.output.rsplit("holdout_fraction=", 1)[1].strip()
    native = TaskConfig(name="chain_sum", train_size=40, test_size=12)
    exported = TaskConfig(name=f"jsonl:{out}", train_size=40, test_size=12, options={"holdout_fraction": float(fraction)})
    for split in ("train", "test"):
        a, b = native.load(split).problems, exported.load(split).problems
        assert [(p.question, p.gold) for p in a] == [(p.question, p.gold) for p in b]
    problem = exported.load("test").problems[0]
    assert exported.load("test").score(problem, f"<think>x</think> <answer>{problem.gold}</answer>") == 1.0


class _InstructTokenizer:
    """A stand-in for an instruct model's tokenizer: a chat template of its own, ChatML-like."""

    has_own_chat_template = True
    stop_ids = [0]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"

    def encode_prompt(self, text, chat=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_an_instruct_model_is_asked_r1_zero_questions_as_chat_turns():
    from r1lab.model import DEFAULT_MODEL_DIR
    from r1lab.tokenizer import load_tokenizer

    task = load_task("chain_sum", "test", size=2, seed=0)
    assert task.default_template(load_tokenizer(DEFAULT_MODEL_DIR)) == "r1_zero"  # r1lab's own base model
    chat = task.prompt(task.problems[0], _InstructTokenizer())
    assert chat.text.startswith("<|user|>") and chat.text.endswith(MATH_INSTRUCTION + "<|assistant|>")
    assert task.prompt(task.problems[0], _InstructTokenizer(), "r1_zero").text.startswith("A conversation")


def test_humaneval_is_posed_with_the_published_evalplus_prompt_and_its_reply_opening_is_scored():
    task = load_task("humaneval", "test")
    problem = task.problems[0]
    prompt = task.prompt(problem, _InstructTokenizer())
    stub = problem.meta["code_prefix"].strip()
    assert prompt.text.startswith("<|user|>Please provide a self-contained Python script") and stub in prompt.text
    assert prompt.text.endswith("<|assistant|>" + prompt.completion_prefix)
    assert prompt.completion_prefix.endswith("```python\n") and "Please reason" not in prompt.text
    body = problem.meta["canonical_solution"] + "\n```\nThe function above passes the tests."
    text = Task.completion_text(_InstructTokenizer(), [ord(c) for c in body], prompt.completion_prefix)
    assert text.startswith(prompt.completion_prefix) and text.endswith(body)
    r1 = load_task("humaneval", "test", prompt="r1")
    assert r1.prompt(r1.problems[0], _InstructTokenizer()).completion_prefix == ""
    with pytest.raises(TaskDataError, match="prompt must be one of"):
        load_task("humaneval", "test", prompt="nope")


@needs_sandbox
def test_the_canonical_humaneval_solution_passes_under_the_evalplus_prompt():
    task = load_task("humaneval", "test", size=3, seed=1)
    for problem in task.problems:
        prompt = task.prompt(problem, _InstructTokenizer())
        text = prompt.completion_prefix + problem.meta["canonical_solution"] + "\n```\n"
        assert task.score(problem, text) == 1.0
        assert task.score(problem, prompt.completion_prefix + problem.meta["code_prefix"] + "    pass\n```\n") == 0.0
