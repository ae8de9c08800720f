"""The R1 evaluation protocol over a set of problems: k samples per question, scored by the task's verifier.

    summary, items = evaluate(model, tokenizer, load_task("chain_sum", "test", size=100), k=4)

R1 samples k responses per question at temperature 0.6 and top-p 0.95 (no greedy decoding) and reports
pass@1 = mean correctness of the k samples, averaged over questions, and cons@k, the majority vote
(reference §1.8). `evaluate` reports those plus the unbiased pass@k, the mean response length in tokens,
the format rate (exactly <think>…</think><answer>…</answer>), the mixed-language rate of the chains of
thought and the share of truncated responses. A sample is *correct* when the scorer gives it full credit
(score 1.0); partial credit (some reasoning-gym tasks give 0.01 for a well-formed wrong answer) is kept in
the per-item `scores` and in `mean_score`, never counted as a pass.

cons@k: the final answers of the k samples are grouped by math-verify equivalence ("1/2", "0.5" and
"\\frac{1}{2}" vote together; code tasks vote on identical programs); the largest class wins (ties: the
class seen first), and the vote is correct iff the scorer accepts the completion that represents the
winning class (its first member). No answer in any sample → 0.

`evaluate_benchmarks` is what `r1lab eval` runs: several task specs against one model, writing
out_dir/eval/<bench>.jsonl, out_dir/summary.json and out_dir/report.html.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1lab import distributed as D
from r1lab.config import ConfigError, check_ranges
from r1lab.eval.metrics import group_answers, majority_index, summarize
from r1lab.eval.sampling import SampledProblem, Scorer, sample_and_score, sampled_tokens
from r1lab.rewards import extract_answer, extract_code, format_reward, is_mixed_language
from r1lab.tasks import Problem, Task, as_task, available_tasks, load_task

__all__ = ["BenchSpec", "EvalConfig", "evaluate", "evaluate_benchmarks", "parse_bench", "print_summary"]

DEFAULT_PROCEDURAL_SIZE = 100
MAX_EVAL_NEW_TOKENS = 32768  # R1's generation limit for every benchmark (reference §1.8)


@dataclass
class EvalConfig:
    """How a held-out set is evaluated during training runs (`r1lab zero`, every pipeline stage): R1's protocol."""

    k: int = 8
    """Samples per held-out question (pass@1 is their mean; R1 uses 4-64)."""
    temperature: float = 0.6
    """R1's evaluation temperature."""
    top_p: float = 0.95
    """R1's evaluation nucleus."""
    max_new_tokens: int = 160
    """Completion limit at evaluation."""
    seed: int = 1234
    """Question i is sampled with seed + i."""
    stop_strings: list[str] = field(default_factory=list)
    """Text that ends an answer (e.g. "</answer>" for instruct models that keep talking after it)."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"k": 1, "max_new_tokens": 1, "temperature": 0}, unit=("top_p",))

    def sampling(self) -> dict[str, Any]:
        """evaluate()'s keyword arguments for these settings."""
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "stop_strings": list(self.stop_strings)}


# --------------------------------------------------------------------------------------------------------
# One problem set
# --------------------------------------------------------------------------------------------------------


def _vote_key(problem: Problem, completion: str) -> str | None:
    """What a sample votes for: its final answer, or for code tasks its program."""
    if problem.tests is not None:
        code = extract_code(completion)
        return code.strip() if code and code.strip() else None
    return extract_answer(completion)


def _exact(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def _item_record(sampled: SampledProblem) -> dict:
    """The per-question record: the prompt as posed, completions, scores, correctness, answers, lengths, format,
    language, vote."""
    problem, texts, scores = sampled.problem, sampled.texts, sampled.scores
    correct = [s >= 1.0 for s in scores]
    votes = [_vote_key(problem, t) for t in texts]
    equivalent = _exact if problem.tests is not None else None
    winner = majority_index(votes, equivalent)
    return {
        "index": sampled.index,
        "question": problem.question,
        "gold": problem.gold,
        "prompt": sampled.prompt.text,
        "completions": texts,
        "scores": scores,
        "correct": correct,
        "answers": votes,
        "answer_classes": len(group_answers(votes, equivalent)),
        "lengths": sampled.token_counts,
        "finish_reasons": sampled.finish_reasons,
        "format_ok": [format_reward(t) == 1.0 for t in texts],
        "mixed_language": [is_mixed_language(t) for t in texts],
        "cons_answer": None if winner is None else votes[winner],
        "cons_correct": winner is not None and correct[winner],
    } | ({} if sampled.tool_calls is None else {"tool_calls": sampled.tool_calls})


def evaluate(model: Any, tokenizer: Any, problems: Task | Sequence[Problem], *, template: str | None = None,
             k: int = 4, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int | None = None,
             seed: int = 0, scorer: Scorer | None = None, batch: int | None = None, progress: bool = True,
             force_think: bool = False, out_path: str | Path | None = None, name: str | None = None,
             console: Any = None, print_table: bool | None = None, stop_strings: Sequence[str] = (),
             tool: Any = None, dist: Any = None) -> tuple[dict[str, Any], list[dict]]:
    """Sample k completions of every problem and score them; returns (summary, per-item records).

    problems: a Task (its prompt template, answer instruction and verifier are used) or a list of Problems
        (scored with math-verify accuracy against `gold`, or their tests, unless `scorer` is given).
    template: None (the task's own: r1_zero for math tasks, chat for HumanEval), "r1_zero", "chat" (the
        tokenizer's chat template, user turn = question + instruction), "plain" or a string with {question}.
        force_think ends the prompt with an open <think> block (DeepSeek's advice for released R1 models);
        the opening tag is then scored as part of the completion.
    max_new_tokens: None → what the context leaves after the longest prompt, at most 32768 (R1's limit).
    batch: questions per generate() call (eval.sampling.sample_and_score). stop_strings: text that ends an
    answer (the completion is cut after it). tool: an r1lab.tools.PythonTool the model may call inside its
    reasoning (answers are scored without the tool's outputs; the summary adds tool_calls_per_answer).
    out_path: write the per-item records there as JSONL. print_table (default: = progress) prints a table.
    dist: a r1lab.distributed.DistInfo under torchrun: each rank samples its contiguous share of the
        problems on its own (unsharded) `model`, the items are gathered, and every rank returns the same
        summary and records; only rank 0 writes out_path, prints and shows progress. Every rank must call it.

    The summary has pass@1, pass@k (unbiased, k = samples per question), cons@k, k, n_questions,
    response_length, format_rate, mixed_language_rate, truncated_rate, mean_score, answered_rate and timing.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    task = as_task(problems, name=name or "eval")
    if not task.problems:
        raise ValueError("evaluate needs at least one problem")
    name = name or task.name
    info = dist or D.single_process()
    prompts = [task.prompt(p, tokenizer, template, force_think=force_think) for p in task.problems]
    prompt_lengths = [len(p.ids) for p in prompts]
    room = model.args.max_position_embeddings - max(prompt_lengths)
    if max_new_tokens is None:
        max_new_tokens = min(MAX_EVAL_NEW_TOKENS, room)
    if max_new_tokens < 1 or max_new_tokens > room:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the longest prompt has "
                         f"{max(prompt_lengths)} tokens and the model {model.args.max_position_embeddings} "
                         "positions")
    progress = progress and info.is_main
    print_table = (print_table if print_table is not None else progress) and info.is_main
    lo, hi = D.share_bounds(len(task.problems), info)
    start = time.perf_counter()
    with _progress_bar(progress, console, name, hi - lo) as advance:
        sampled = sample_and_score(model, tokenizer, task, k=k, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, template=template,
                                   force_think=force_think, scorer=scorer, batch=batch, dist=info,
                                   prompts=prompts, stop_strings=stop_strings, tool=tool, on_progress=advance)
    seconds = max(D.all_gather_objects(time.perf_counter() - start, info))
    items = [_item_record(s) for s in sampled]

    summary: dict[str, Any] = dict(summarize(items))
    samples = [r for item in items for r in item["finish_reasons"]]
    summary["truncated_rate"] = sum(r == "length" for r in samples) / len(samples)
    summary["mean_score"] = sum(s for item in items for s in item["scores"]) / len(samples)
    summary["answered_rate"] = sum(a is not None for item in items for a in item["answers"]) / len(samples)
    if tool is not None:
        summary["tool_calls_per_answer"] = sum(sum(item["tool_calls"]) for item in items) / len(samples)
    summary["temperature"], summary["top_p"], summary["max_new_tokens"] = temperature, top_p, max_new_tokens
    summary["seconds"] = round(seconds, 3)
    summary["tokens_per_second"] = round(sampled_tokens(sampled) / max(seconds, 1e-9), 1)

    if out_path is not None and info.is_main:
        _write_jsonl(Path(out_path), items)
    if print_table:
        print_summary({name: summary}, console)
    return summary, items


PLAIN_EVERY_S = 10.0
"""Without a terminal (a log file, a pipe), where rich's live bar prints nothing until it ends, progress is a
plain flushed line at most this often."""


def is_live_console(console: Any) -> bool:
    """Whether rich's live displays show on ``console`` as they go (a terminal or a notebook)."""
    return (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter


class _progress_bar:
    """Progress over questions (a no-op when disabled); yields advance(n). A rich live bar on a terminal, plain
    lines every PLAIN_EVERY_S seconds elsewhere."""

    def __init__(self, enabled: bool, console: Any, name: str, total: int) -> None:
        self.enabled, self.console, self.name, self.total = enabled, console, name, total
        self.bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console

        self.console = self.console or Console()
        if not is_live_console(self.console):
            return self._plain()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(f"eval {self.name}", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def _plain(self) -> Callable[[int], None]:
        start = last = time.monotonic()
        done = 0

        def line() -> None:
            self.console.print(f"eval {self.name}: {done}/{self.total} questions, {time.monotonic() - start:.0f} s",
                               markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            if done >= self.total or time.monotonic() - last >= PLAIN_EVERY_S:
                line()
                last = time.monotonic()

        line()
        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    import json

    from r1lab.fsutil import atomic_write_text

    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# summary key → short column header (the table must fit an 80-column terminal)
_TABLE_METRICS = {"pass@1": "pass@1", "pass@k": "pass@k", "cons@k": "cons@k", "response_length": "length",
                  "format_rate": "format", "mixed_language_rate": "mixed", "truncated_rate": "trunc",
                  "n_questions": "n"}


def print_summary(summaries: dict[str, dict], console: Any = None) -> None:
    """A rich table: one row per benchmark, the R1 metrics as columns (pass@k / cons@k named with their k)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ks = {s.get("k") for s in summaries.values()}
    k = ks.pop() if len(ks) == 1 else "k"
    table = Table(title="evaluation (pass/cons/format/mixed/trunc are rates; length in tokens)")
    table.add_column("benchmark")
    for header in _TABLE_METRICS.values():
        table.add_column(header.replace("@k", f"@{k}"), justify="right")
    for bench, summary in summaries.items():
        cells = []
        for metric in _TABLE_METRICS:
            value = summary.get(metric)
            cells.append("" if value is None else f"{value:.1f}" if metric == "response_length"
                         else str(value) if isinstance(value, int) else f"{value:.3f}")
        table.add_row(bench, *cells)
    console.print(table)


# --------------------------------------------------------------------------------------------------------
# Benchmarks (the `r1lab eval` command)
# --------------------------------------------------------------------------------------------------------


@dataclass
class BenchSpec:
    """One benchmark: a load_task spec, a size (None: all / the procedural default) and load_task options."""

    task: str
    size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            kind, sep, arg = self.task.partition(":")
            self.name = Path(arg).stem if sep and kind in ("jsonl", "parquet") else self.task
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)


def _option_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_bench(spec: str | dict | BenchSpec) -> BenchSpec:
    """A benchmark from "TASK[@SIZE][,key=value...]" (e.g. "chain_sum@200", "humaneval",
    "jsonl:data/aime24.jsonl,question_field=problem,answer_field=answer") or a dict of BenchSpec fields.
    Options go to load_task (a JSONL file's field mapping, a reasoning-gym dataset's settings)."""
    if isinstance(spec, BenchSpec):
        return spec
    if isinstance(spec, dict):
        return BenchSpec(**spec)
    head, *pairs = [part.strip() for part in spec.split(",")]
    task, size = head, None
    match = re.fullmatch(r"(.+)@([^/.]*)", head)  # not a file name's @ ("jsonl:runs/a@b.jsonl")
    if match:
        task, size_text = match.groups()
        if not size_text.isdigit() or int(size_text) < 1:
            raise ConfigError(f"benchmark {spec!r}: the size after '@' must be a whole number >= 1, "
                              f"got {size_text!r}")
        size = int(size_text)
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"benchmark {spec!r}: option {pair!r} is not key=value")
        options[key.strip()] = _option_value(value.strip())
    return BenchSpec(task, size, options)


def _load_bench(bench: BenchSpec, seed: int) -> Task:
    kind = bench.task.partition(":")[0]
    fixed = kind in ("jsonl", "parquet") or bench.task in available_tasks()  # whole sets unless sized
    size = bench.size if bench.size is not None or fixed else DEFAULT_PROCEDURAL_SIZE
    return load_task(bench.task, split="test", size=size, seed=seed, **bench.options)


def evaluate_benchmarks(model: Any, benches: Sequence[str | dict | BenchSpec], out_dir: str | Path, *,
                        tokenizer: Any = None, template: str | None = None, instruction: str | None = None,
                        k: int = 4, temperature: float = 0.6,
                        top_p: float = 0.95, max_new_tokens: int | None = None, seed: int = 0,
                        force_think: bool = False, device: str = "cpu", dtype: str = "auto",
                        stop_strings: Sequence[str] = (), tool: Any = None, progress: bool = True,
                        console: Any = None, dist: Any = None) -> dict[str, dict]:
    """Evaluate one model on several benchmarks; returns {bench name: summary}.

    model: an HF folder path (None: the embedded default) or a loaded model (then pass `tokenizer`).
    Each bench is held out ("test" split): reasoning-gym tasks use their disjoint held-out split (size
    default 100), files and evaluation sets are used whole unless a size is given. template None poses each
    benchmark its own way (HumanEval: the chat template and the code instruction, scored in the sandbox;
    math tasks: the R1-Zero template); a template given applies to every benchmark. instruction: what a chat
    prompt asks for after the question, for every benchmark (None: each task's own, e.g. math's \\boxed{}).
    Writes out_dir/eval/<bench>.jsonl, out_dir/config.yaml, out_dir/summary.json ({"benchmarks": {...}}
    plus flat "<bench>/<metric>" numbers) and out_dir/report.html.
    dist (under torchrun): each rank loads the model on its own GPU and samples its share of every
    benchmark's questions; rank 0 writes the files and prints.
    """
    from r1lab.eval.report import write_report
    from r1lab.run_dir import RunDir

    info = dist or D.single_process(device)
    model_label = "model"
    if model is None or isinstance(model, (str, Path)):
        from r1lab.model import DEFAULT_MODEL_DIR, load_model_and_tokenizer

        model_label = str(model or DEFAULT_MODEL_DIR)
        # the rank's own GPU under torchrun
        model, loaded_tokenizer = load_model_and_tokenizer(model, device=str(info.device), dtype=dtype)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("evaluate_benchmarks: pass tokenizer= with a loaded model")
    specs = [parse_bench(b) for b in benches]
    if not specs:
        raise ValueError("evaluate_benchmarks needs at least one benchmark")
    seen: dict[str, int] = {}
    for spec in specs:  # unique file names
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            spec.name = f"{spec.name}_{seen[spec.name]}"

    main = info.is_main
    progress = progress and main
    run = RunDir(out_dir)
    settings = {"model": model_label, "template": template, "instruction": instruction, "k": k,
                "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "force_think": force_think,
                "stop_strings": list(stop_strings), "tool": None if tool is None else dataclasses.asdict(tool),
                "benchmarks": [{"name": s.name, "task": s.task, "size": s.size, "options": s.options}
                               for s in specs]}
    if main:
        run.write_config(settings)
    summaries: dict[str, dict] = {}
    for spec in specs:
        task = _load_bench(spec, seed)
        if instruction is not None:
            task.instruction = instruction
        summaries[spec.name], _ = evaluate(
            model, tokenizer, task, template=template, k=k, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=seed, progress=progress, force_think=force_think,
            out_path=run.path / "eval" / f"{spec.name}.jsonl", name=spec.name, console=console,
            print_table=False, stop_strings=stop_strings, tool=tool, dist=info)
    if not main:
        return summaries
    flat = {f"{bench}/{metric}": value for bench, summary in summaries.items()
            for metric, value in summary.items() if isinstance(value, (int, float)) and metric in _TABLE_METRICS}
    run.write_summary({"model": model_label, "k": k, **flat, "benchmarks": summaries})
    write_report(run.path)
    if progress:
        print_summary(summaries, console)
    return summaries
