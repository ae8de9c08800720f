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

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1lab.config import ConfigError
from r1lab.eval.metrics import group_answers, majority_index, summarize
from r1lab.rewards import accuracy_reward, extract_answer, extract_code, format_reward, is_mixed_language
from r1lab.tasks import MATH_INSTRUCTION, Problem, Task, load_task, render_prompt

__all__ = ["BenchSpec", "evaluate", "evaluate_benchmarks", "parse_bench", "print_summary"]

# Prefix that opens the thought when force_think is on, and how it reads as part of the completion.
_FORCED_PREFIX = {"chat": "<think>\n", "r1_zero": " <think>"}
DEFAULT_PROCEDURAL_SIZE = 100
MAX_EVAL_NEW_TOKENS = 32768  # R1's generation limit for every benchmark (reference §1.8)

Scorer = Callable[[Problem, str], float]


# --------------------------------------------------------------------------------------------------------
# One problem set
# --------------------------------------------------------------------------------------------------------


def _default_scorer(problem: Problem, completion: str) -> float:
    return accuracy_reward(completion, problem.gold)


def _render(template: str, question: str, tokenizer: Any, instruction: str | None,
            force_think: bool) -> tuple[str, str]:
    """(prompt text, forced prefix of the completion: "" unless force_think)."""
    prompt = render_prompt(template, question, apply_chat_template=tokenizer.apply_chat_template,
                           instruction=instruction)
    if not force_think:
        return prompt, ""
    prefix = _FORCED_PREFIX.get(template, "<think>\n")
    return prompt + prefix, prefix.lstrip()


def _vote_key(problem: Problem, completion: str) -> str | None:
    """What a sample votes for: its final answer, or for code tasks its program."""
    if problem.tests is not None:
        code = extract_code(completion)
        return code.strip() if code and code.strip() else None
    return extract_answer(completion)


def _exact(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def _score_item(index: int, problem: Problem, texts: list[str], lengths: list[int], reasons: list[str],
                scorer: Scorer) -> dict:
    """The per-question record: completions, scores, correctness, answers, lengths, format, language, vote."""
    scores = []
    for text in texts:
        try:
            scores.append(float(scorer(problem, text)))
        except ValueError as error:  # a malformed gold: name the problem instead of failing deep inside
            raise ValueError(f"problem {index} ({problem.question[:60]!r}): {error}") from error
    correct = [s >= 1.0 for s in scores]
    votes = [_vote_key(problem, t) for t in texts]
    equivalent = _exact if problem.tests is not None else None
    winner = majority_index(votes, equivalent)
    return {
        "index": index,
        "question": problem.question,
        "gold": problem.gold,
        "completions": texts,
        "scores": scores,
        "correct": correct,
        "answers": votes,
        "answer_classes": len(group_answers(votes, equivalent)),
        "lengths": lengths,
        "finish_reasons": reasons,
        "format_ok": [format_reward(t) == 1.0 for t in texts],
        "mixed_language": [is_mixed_language(t) for t in texts],
        "cons_answer": None if winner is None else votes[winner],
        "cons_correct": winner is not None and correct[winner],
    }


def evaluate(model: Any, tokenizer: Any, problems: Task | Sequence[Problem], *, template: str = "r1_zero",
             k: int = 4, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int | None = None,
             seed: int = 0, scorer: Scorer | None = None, batch: int | None = None, progress: bool = True,
             force_think: bool = False, instruction: str | None = None, out_path: str | Path | None = None,
             name: str | None = None, console: Any = None, print_table: bool | None = None,
             dist: Any = None) -> tuple[dict[str, Any], list[dict]]:
    """Sample k completions of every problem and score them; returns (summary, per-item records).

    problems: a Task (its scorer and answer instruction are used) or a list of Problems (scored with
        math-verify accuracy against `gold` unless `scorer` is given).
    template: "r1_zero", "chat" (the tokenizer's chat template, user turn = question + instruction),
        "plain" or a string with {question}. force_think ends the prompt with an open <think> block
        (DeepSeek's advice for released R1 models); the opening tag is then scored as part of the completion.
    max_new_tokens: None → what the context leaves after the longest prompt, at most 32768 (R1's limit).
    batch: questions per generate() call (None: enough for ~512 samples on CUDA, ~64 on CPU); the rollout
        engine batches continuously inside a call, batches only pace the progress bar.
    out_path: write the per-item records there as JSONL. print_table (default: = progress) prints a table.
    dist: a r1lab.train.distributed.DistInfo under torchrun: each rank samples its contiguous share of the
        problems on its own (unsharded) `model`, the items are gathered, and every rank returns the same
        summary and records; only rank 0 writes out_path, prints and shows progress. Every rank must call it.

    The summary has pass@1, pass@k (unbiased, k = samples per question), cons@k, k, n_questions,
    response_length, format_rate, mixed_language_rate, truncated_rate, mean_score, answered_rate and timing.
    """
    from r1lab.rollout import SamplingParams, generate

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(problems, Task):
        scorer = scorer or problems.score
        instruction = instruction if instruction is not None else problems.instruction
        name = name or problems.name
        problems = problems.problems
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    scorer = scorer or _default_scorer
    instruction = instruction if instruction is not None else MATH_INSTRUCTION
    name = name or "eval"

    rendered = [_render(template, p.question, tokenizer, instruction, force_think) for p in problems]
    add_bos = template != "chat"  # chat templates place their own BOS
    prompt_ids = [tokenizer.encode(text, add_bos=add_bos) for text, _ in rendered]
    room = model.args.max_position_embeddings - max(len(ids) for ids in prompt_ids)
    if max_new_tokens is None:
        max_new_tokens = min(MAX_EVAL_NEW_TOKENS, room)
    if max_new_tokens < 1 or max_new_tokens > room:
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the longest prompt has "
                         f"{max(map(len, prompt_ids))} tokens and the model {model.args.max_position_embeddings} "
                         "positions")
    stop = sorted(set(tokenizer.stop_ids) | set(model.args.stop_token_ids))
    cuda = model.lm_head.weight.is_cuda
    batch = batch or max(1, (512 if cuda else 64) // k)

    from r1lab.train import distributed as D

    info = dist or D.single_process()
    lo, hi = D.share_bounds(len(problems), info)  # all of them in one process
    progress = progress and info.is_main
    print_table = (print_table if print_table is not None else progress) and info.is_main
    items: list[dict] = []
    generated_tokens, start = 0, time.perf_counter()
    with _progress_bar(progress, console, name, hi - lo) as advance:
        for first in range(lo, hi, batch):
            chunk = prompt_ids[first:min(first + batch, hi)]
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    stop_token_ids=stop, n=k, seed=seed + first)
            completions = generate(model, chunk, params)
            for offset in range(len(chunk)):
                index = first + offset
                samples = completions[offset * k:(offset + 1) * k]
                texts, lengths, reasons = [], [], []
                for c in samples:
                    ids = c.token_ids[:-1] if c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in stop \
                        else c.token_ids
                    texts.append(rendered[index][1] + tokenizer.decode(ids, skip_special_tokens=True))
                    lengths.append(len(c.token_ids))
                    reasons.append(c.finish_reason)
                generated_tokens += sum(lengths)
                items.append(_score_item(index, problems[index], texts, lengths, reasons, scorer))
            advance(len(chunk))
    seconds = time.perf_counter() - start
    # every rank's items, in problem order (shares are contiguous and in rank order)
    shares = D.all_gather_objects((items, generated_tokens, seconds), info)
    items = [item for share, _, _ in shares for item in share]
    generated_tokens = sum(n for _, n, _ in shares)
    seconds = max(s for _, _, s in shares)

    summary: dict[str, Any] = dict(summarize(items))
    samples = [r for item in items for r in item["finish_reasons"]]
    summary["truncated_rate"] = sum(r == "length" for r in samples) / len(samples)
    summary["mean_score"] = sum(s for item in items for s in item["scores"]) / len(samples)
    summary["answered_rate"] = sum(a is not None for item in items for a in item["answers"]) / len(samples)
    summary["temperature"], summary["top_p"], summary["max_new_tokens"] = temperature, top_p, max_new_tokens
    summary["seconds"] = round(seconds, 3)
    summary["tokens_per_second"] = round(generated_tokens / max(seconds, 1e-9), 1)

    if out_path is not None and info.is_main:
        _write_jsonl(Path(out_path), items)
    if print_table:
        print_summary({name: summary}, console)
    return summary, items


class _progress_bar:
    """A rich progress bar over questions (a no-op when disabled); yields advance(n)."""

    def __init__(self, enabled: bool, console: Any, name: str, total: int) -> None:
        self.enabled, self.console, self.name, self.total = enabled, console, name, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(f"eval {self.name}", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
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
    fixed = kind in ("jsonl", "parquet") or bench.task in ("humaneval", "champ")
    size = bench.size if bench.size is not None or fixed else DEFAULT_PROCEDURAL_SIZE
    return load_task(bench.task, split="test", size=size, seed=seed, **bench.options)


def evaluate_benchmarks(model: Any, benches: Sequence[str | dict | BenchSpec], out_dir: str | Path, *,
                        tokenizer: Any = None, template: str = "r1_zero", k: int = 4, temperature: float = 0.6,
                        top_p: float = 0.95, max_new_tokens: int | None = None, seed: int = 0,
                        force_think: bool = False, device: str = "cpu", dtype: str = "auto",
                        progress: bool = True, console: Any = None, dist: Any = None) -> dict[str, dict]:
    """Evaluate one model on several benchmarks; returns {bench name: summary}.

    model: an HF folder path (None: the embedded default) or a loaded model (then pass `tokenizer`).
    Each bench is held out ("test" split): reasoning-gym tasks use their disjoint held-out split (size
    default 100), files and evaluation sets are used whole unless a size is given. HumanEval is prompted
    with the chat template and the code instruction and scored in the sandbox; the others use `template`.
    Writes out_dir/eval/<bench>.jsonl, out_dir/config.yaml, out_dir/summary.json ({"benchmarks": {...}}
    plus flat "<bench>/<metric>" numbers) and out_dir/report.html.
    dist (under torchrun): each rank loads the model on its own GPU and samples its share of every
    benchmark's questions; rank 0 writes the files and prints.
    """
    from r1lab.eval.report import write_report
    from r1lab.train import distributed as D
    from r1lab.train.run_dir import RunDir

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
    settings = {"model": model_label, "template": template, "k": k, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "force_think": force_think,
                "benchmarks": [{"name": s.name, "task": s.task, "size": s.size, "options": s.options}
                               for s in specs]}
    if main:
        run.write_config(settings)
    summaries: dict[str, dict] = {}
    for spec in specs:
        task = _load_bench(spec, seed)
        bench_template = "chat" if spec.task == "humaneval" else template
        summaries[spec.name], _ = evaluate(
            model, tokenizer, task, template=bench_template, k=k, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=seed, progress=progress, force_think=force_think,
            out_path=run.path / "eval" / f"{spec.name}.jsonl", name=spec.name, console=console,
            print_table=False, dist=info)
    if not main:
        return summaries
    flat = {f"{bench}/{metric}": value for bench, summary in summaries.items()
            for metric, value in summary.items() if isinstance(value, (int, float)) and metric in _TABLE_METRICS}
    run.write_summary({"model": model_label, "k": k, **flat, "benchmarks": summaries})
    write_report(run.path)
    if progress:
        print_summary(summaries, console)
    return summaries
