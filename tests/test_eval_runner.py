"""The evaluation runner: R1-protocol metrics from scripted completions, the benchmark runner's files, and a
smoke run through the real rollout engine."""

from __future__ import annotations

import json

import pytest

import r1lab.rollout as rollout
from r1lab.eval.metrics import pass_at_k
from r1lab.config import ConfigError
from r1lab.eval.runner import BenchSpec, evaluate, evaluate_benchmarks, parse_bench
from r1lab.rollout import Completion
from r1lab.model import load_model_and_tokenizer
from r1lab.testing import build_random_checkpoint
from r1lab.tasks import Problem, Task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model_and_tokenizer(build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model"))


# question → the k completions the scripted engine returns (None: truncated, no EOS)
SCRIPTS = {
    "What is 1 + 1?": [  # gold 2: two right (vote together as 2 and 2.0), majority right
        ("<think> one and one </think> <answer>2</answer>", "stop"),
        ("<think> add </think> <answer>2.0</answer>", "stop"),
        ("<answer>3</answer>", "stop"),
        ("<think> rambling without end", "length"),
    ],
    "What is 2 + 3?": [  # gold 5: one right, the majority (4) wrong
        ("<think> hmm </think> <answer>4</answer>", "stop"),
        ("<think> hmm </think> <answer>4</answer>", "stop"),
        ("<think> 二加三等于五, so five </think> <answer>5</answer>", "stop"),  # mixed-language thought
        ("no tags, final \\boxed{4}", "stop"),
    ],
}
GOLDS = {"What is 1 + 1?": "2", "What is 2 + 3?": "5"}


@pytest.fixture
def scripted_generate(monkeypatch, tiny):
    tokenizer = tiny[1]
    calls = []

    def generate(model, prompts, params, **_):
        calls.append(params)
        out = []
        for index, prompt in enumerate(prompts):
            text = tokenizer.decode(prompt)
            question = next(q for q in SCRIPTS if q in text)
            assert params.n == len(SCRIPTS[question])
            for sample, (completion, reason) in enumerate(SCRIPTS[question]):
                ids = tokenizer.encode(completion) + ([tokenizer.eos_id] if reason == "stop" else [])
                out.append(Completion(index, sample, ids, [0.0] * len(ids), reason))
        return out

    monkeypatch.setattr(rollout, "generate", generate)
    return calls


def _problems():
    return [Problem(q, GOLDS[q]) for q in SCRIPTS]


def test_metrics_follow_the_r1_protocol(tiny, scripted_generate, tmp_path):
    model, tokenizer = tiny
    summary, items = evaluate(model, tokenizer, _problems(), k=4, max_new_tokens=64, progress=False,
                              out_path=tmp_path / "items.jsonl")
    first, second = items
    assert first["correct"] == [True, True, False, False]
    assert second["correct"] == [False, False, True, False]
    assert first["cons_correct"] is True and second["cons_correct"] is False
    assert first["answer_classes"] == 2  # "2" and "2.0" are one class (math-verify), "3" another
    assert second["answers"] == ["4", "4", "5", "4"]
    assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert summary["pass@k"] == pytest.approx((pass_at_k(4, 2, 4) + pass_at_k(4, 1, 4)) / 2) == 1.0
    assert summary["cons@k"] == 0.5 and summary["k"] == 4 and summary["n_questions"] == 2
    assert first["format_ok"] == [True, True, False, False]
    assert summary["format_rate"] == pytest.approx(5 / 8)
    assert second["mixed_language"] == [False, False, True, False]
    assert summary["mixed_language_rate"] == pytest.approx(1 / 8)
    assert summary["truncated_rate"] == pytest.approx(1 / 8)
    lengths = [len(tokenizer.encode(c)) + (r == "stop") for q in SCRIPTS for c, r in SCRIPTS[q]]
    assert first["lengths"] + second["lengths"] == lengths  # response tokens, the EOS included
    assert summary["response_length"] == pytest.approx(sum(lengths) / 8)
    assert first["completions"][0] == SCRIPTS["What is 1 + 1?"][0][0]  # the EOS is not in the text
    params = scripted_generate[0]
    assert (params.temperature, params.top_p, params.n) == (0.6, 0.95, 4)  # R1's sampling settings
    written = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [w["correct"] for w in written] == [first["correct"], second["correct"]]
    assert set(written[0]) >= {"question", "gold", "completions", "correct", "answers", "lengths"}


def test_task_scorer_partial_credit_is_not_a_pass(tiny, scripted_generate):
    model, tokenizer = tiny
    task = Task("half", _problems(), scorer=lambda problem, completion: 0.5)
    summary, items = evaluate(model, tokenizer, task, k=4, max_new_tokens=16, progress=False)
    assert summary["pass@1"] == 0.0 and summary["mean_score"] == 0.5
    assert items[0]["scores"] == [0.5] * 4


def test_forced_think_prefix_is_scored_as_part_of_the_completion(tiny, scripted_generate, monkeypatch):
    model, tokenizer = tiny
    SCRIPTS["What is 4 + 4?"] = [(" eight </think> <answer>8</answer>", "stop")]
    GOLDS["What is 4 + 4?"] = "8"
    try:
        summary, items = evaluate(model, tokenizer, [Problem("What is 4 + 4?", "8")], k=1, max_new_tokens=8,
                                  force_think=True, progress=False)
    finally:
        del SCRIPTS["What is 4 + 4?"], GOLDS["What is 4 + 4?"]
    assert items[0]["completions"][0] == "<think> eight </think> <answer>8</answer>"
    assert summary["format_rate"] == 1.0 and summary["pass@1"] == 1.0


def test_evaluate_benchmarks_writes_run_files(tiny, scripted_generate, tmp_path):
    model, tokenizer = tiny
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "solution": g}) + "\n" for q, g in GOLDS.items()))
    out = tmp_path / "run"
    summaries = evaluate_benchmarks(model, [f"jsonl:{data},question_field=problem,answer_field=solution"], out,
                                    tokenizer=tokenizer, k=4, max_new_tokens=32, progress=False)
    assert summaries["arith"]["pass@1"] == pytest.approx(3 / 8)
    assert len((out / "eval" / "arith.jsonl").read_text().splitlines()) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["arith"]["cons@k"] == 0.5 and summary["arith/pass@1"] == pytest.approx(3 / 8)
    assert (out / "report.html").is_file() and (out / "config.yaml").is_file()
    # an instruction given poses every benchmark's chat prompts with it instead of the task's own
    evaluate_benchmarks(model, [f"jsonl:{data},question_field=problem,answer_field=solution"], tmp_path / "tags",
                        tokenizer=tokenizer, template="chat", instruction="Answer in <answer> tags.", k=4,
                        max_new_tokens=32, progress=False)
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "tags" / "eval" / "arith.jsonl").read_text().splitlines()]
    assert len(prompts) == 2 and all("Answer in <answer> tags." in p and "boxed" not in p for p in prompts)
    default = (out / "eval" / "arith.jsonl").read_text()
    assert "Answer in <answer> tags." not in default


def test_parse_bench():
    assert parse_bench("chain_sum@200") == BenchSpec("chain_sum", 200, {}, "chain_sum")
    spec = parse_bench("jsonl:data/aime24.jsonl@30,question_field=problem,answer_field=answer")
    assert (spec.task, spec.size, spec.name) == ("jsonl:data/aime24.jsonl", 30, "aime24")
    assert spec.options == {"question_field": "problem", "answer_field": "answer"}
    assert parse_bench("chain_sum,min_terms=2").options == {"min_terms": 2}
    assert parse_bench({"task": "humaneval", "size": 5}).name == "humaneval"
    with pytest.raises(ConfigError, match="key=value"):
        parse_bench("chain_sum,oops")
    for bad in ("chain_sum@abc", "chain_sum@0", "chain_sum@"):
        with pytest.raises(ConfigError, match=f"benchmark '{bad}': the size after '@' must be a whole number"):
            parse_bench(bad)
    assert parse_bench("jsonl:runs/a@b.jsonl").task == "jsonl:runs/a@b.jsonl"  # a file name's @ is no size
    assert parse_bench("jsonl:runs/a@b.jsonl@7").size == 7


def test_sampled_items_do_not_depend_on_the_batch_size(tiny):
    """Question i is sampled with seed + i whatever batch it falls in (and, under torchrun, whatever rank)."""
    model, tokenizer = tiny
    problems = [Problem(f"What is {a} + 2?", str(a + 2)) for a in range(7)]
    runs = [evaluate(model, tokenizer, problems, k=3, max_new_tokens=8, progress=False, seed=5, batch=b)[1]
            for b in (2, 7)]
    assert [i["completions"] for i in runs[0]] == [i["completions"] for i in runs[1]]
    assert any(len(set(i["completions"])) > 1 for i in runs[0])  # really sampled
    other_seed = evaluate(model, tokenizer, problems, k=3, max_new_tokens=8, progress=False, seed=6, batch=7)[1]
    assert [i["completions"] for i in other_seed] != [i["completions"] for i in runs[0]]


def test_real_engine_smoke(tiny):
    model, tokenizer = tiny
    problems = [Problem(f"What is {a} + 1?", str(a + 1)) for a in range(3)]
    summary, items = evaluate(model, tokenizer, problems, k=2, max_new_tokens=6, progress=False, seed=1)
    assert summary["n_questions"] == 3 and summary["k"] == 2
    assert all(len(item["completions"]) == 2 and all(1 <= n <= 6 for n in item["lengths"]) for item in items)
    assert 0.0 <= summary["pass@1"] <= 1.0
    with pytest.raises(ValueError, match="does not fit"):
        evaluate(model, tokenizer, problems, k=1, max_new_tokens=10_000, progress=False)


def test_progress_without_a_terminal_is_plain_lines(tiny, scripted_generate):
    """Writing to a file or pipe, rich's live bar shows nothing until the end; evaluate prints plain lines."""
    import io

    from rich.console import Console

    model, tokenizer = tiny
    out = io.StringIO()
    evaluate(model, tokenizer, _problems(), k=4, max_new_tokens=16, progress=True, print_table=False,
             console=Console(file=out, force_terminal=False), name="scripted")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval scripted: 0/2 questions")
    assert lines[-1].startswith("eval scripted: 2/2 questions")
    assert "━" not in out.getvalue()  # no bar characters in a log
