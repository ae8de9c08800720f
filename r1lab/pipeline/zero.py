"""`r1lab zero`: R1-Zero — pure RL (GRPO with rule rewards) from a base model, with a before/after table.

With no arguments: the embedded tiny DeepSeek-V3-architecture base (r1lab/assets/r1-tiny, pretrained by
`r1lab pretrain --recipe recipes/pretrain-tiny.yaml`), reasoning-gym chain_sum, the R1-Zero template.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1lab import distributed as D
from r1lab.eval.runner import PLAIN_EVERY_S, EvalConfig, evaluate, is_live_console
from r1lab.model import load_model_and_tokenizer
from r1lab.run_dir import RunDir
from r1lab.tasks import Task
from r1lab.train.checkpoint import publish_checkpoint_model
from r1lab.train.grpo import GRPOConfig, train_grpo
from r1lab.train.parallel import gathered_for_rollout


@dataclass
class ZeroConfig:
    model: str | None = None
    """HF model folder with its tokenizer; None = the embedded default (r1lab/assets/r1-tiny)."""
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(lr=5e-4, steps=60, max_new_tokens=96))
    """The RL run (task, rewards, objective, batch shape, optimizer)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation before and after RL (R1 protocol)."""


# the rows of the final table (the README's table), in its order
REPORTED = ("pass@1", "cons@k", "response_length", "format_rate", "mixed_language_rate")
SUMMARY_EVERY_S = 10.0
"""During GRPO summary.json's seconds are brought up to date at least this often (what a kill can lose)."""


def evaluate_held_out(model, tokenizer, held_out: Task, cfg: EvalConfig, template: str | None, info: D.DistInfo,
                      out_path: Path, name: str, *, progress: bool = False, console=None, tool=None) -> dict:
    """The R1-protocol summary of `model` on a held-out task, during a training run: on the gathered weights
    when the model is FSDP-sharded, each rank sampling its share of the questions. Every rank calls it.
    progress: evaluate's live bar over the questions on `console` (rank 0), never its table. tool: the tool the
    model was trained with (r1lab.tools.PythonTool), or None."""
    with gathered_for_rollout(model, info) as policy:  # the model itself unless it is sharded
        summary, _ = evaluate(policy, tokenizer, held_out, template=template, progress=progress, console=console,
                              print_table=False, out_path=out_path, name=name, dist=info, tool=tool,
                              **cfg.sampling())
    return summary


def run_zero(cfg: ZeroConfig, run_dir: RunDir, *, resume: bool = False, progress: bool = True,
             dist: D.DistInfo | None = None, console=None) -> dict:
    """Evaluate the base, run GRPO, evaluate again; writes summary.json and report.html. Returns the summary.

    dist (from `init_distributed()` under torchrun): GRPO runs sharded with FSDP2, each rank evaluates its
    share of the held-out questions; rank 0 alone writes the summary, the report and the final model.
    progress (rank 0, on `console`, default stdout): live bars on a terminal, plain flushed lines otherwise.

    summary.json's `seconds` is the wall-clock time of the whole run, model loading, both evaluations and GRPO,
    summed over the invocations that made it (a run and its resumes: `seconds_parts`, one entry each). An
    interrupted invocation counts up to its last update of summary.json (after the before evaluation, then
    at the end of the first GRPO step SUMMARY_EVERY_S after the previous update), so the work it did after
    its last checkpoint is counted, and counted again when the resume redoes it."""
    from r1lab.eval.report import write_report
    from r1lab.train.checkpoint import load_latest_checkpoint

    t0 = time.monotonic()
    g = cfg.grpo
    info = dist or D.single_process(g.device)
    show = _Progress(console) if progress and info.is_main else None
    earlier = _earlier_seconds(run_dir) if resume and info.is_main else []

    def timing() -> dict:
        parts = [*earlier, round(time.monotonic() - t0, 1)]
        return {"seconds": round(sum(parts), 1), "seconds_parts": parts}

    # every rank loads onto its own GPU (cuda:LOCAL_RANK under torchrun)
    model, tok = load_model_and_tokenizer(cfg.model, device=str(info.device), dtype=g.dtype)
    t = g.task
    held_out = t.load("test")

    def measure(tag: str, what: str) -> dict:
        path = run_dir.path / "eval" / f"{tag}.jsonl"
        args = (model, tok, held_out, cfg.eval, t.template, info, path, tag)
        if show is None:
            return evaluate_held_out(*args, tool=g.tool)
        with show.evaluation(tag, what, len(held_out.problems), cfg.eval.k) as bar:
            summary = evaluate_held_out(*args, tool=g.tool, **bar)
        show.evaluated(tag, summary)
        return summary

    before = _load_before(run_dir) if resume else None
    if before is None:
        before = measure("before", "the base model, before RL")
        if info.is_main:
            run_dir.write_summary({"before": before, **timing()})
    elif show is not None:
        show.line("before: from summary.json of the run being resumed")
    if resume and info.is_main and load_latest_checkpoint(run_dir.path) is None:
        # GRPO starts over at step 0, so the steps the interrupted part logged must go, not be logged twice
        run_dir = RunDir(run_dir.path, resume_step=-1)
        if show is not None:
            show.line(f"--resume: no checkpoint in {run_dir.path}; GRPO starts over at step 0")

    last_write = time.monotonic()

    def on_step(step: int, metrics: dict) -> None:
        nonlocal last_write
        if show is not None:
            show.grpo_step(step, g.steps, metrics)
        if time.monotonic() - last_write >= SUMMARY_EVERY_S:
            run_dir.write_summary({"before": before, **timing()})
            last_write = time.monotonic()

    try:
        trainer = train_grpo(g, run_dir, model, tok, resume=resume, on_step=on_step if info.is_main else None,
                             dist=info)
    finally:
        if show is not None:
            show.grpo_done()
    after = measure("after", "the trained policy, after RL")
    publish_checkpoint_model(trainer.last_checkpoint, run_dir.path / "model", info)  # the final weights, linked
    summary = {"before": before, "after": after, "task": t.name, "steps": g.steps, **timing(),
               "world_size": info.world_size}
    if info.is_main:
        run_dir.write_summary(summary)
        write_report(run_dir.path)
    return summary


def _read_summary(run_dir: RunDir) -> dict:
    import json

    path = run_dir.path / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_before(run_dir: RunDir) -> dict | None:
    return _read_summary(run_dir).get("before")


def _earlier_seconds(run_dir: RunDir) -> list[float]:
    """The seconds of the invocations before this one (a summary written before seconds_parts existed
    holds its total alone)."""
    summary = _read_summary(run_dir)
    parts = summary.get("seconds_parts")
    if isinstance(parts, list):
        return [float(p) for p in parts]
    return [float(summary["seconds"])] if isinstance(summary.get("seconds"), (int, float)) else []


class _Progress:
    """What `r1lab zero` shows while it works. On a terminal: evaluate's bar over the held-out questions and a
    GRPO bar carrying the latest reward, accuracy and length. Elsewhere (a log file, a pipe: rich's live bars
    print nothing there until they finish): plain lines, flushed, at least every PLAIN_EVERY_S seconds."""

    def __init__(self, console=None, every_s: float = PLAIN_EVERY_S):
        from rich.console import Console

        self.console = console or Console()
        self.live = is_live_console(self.console)
        self.every_s = every_s
        self._bar = None
        self._last_line = None

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    @contextlib.contextmanager
    def evaluation(self, tag: str, what: str, n_questions: int, k: int):
        """Around one held-out evaluation; yields evaluate_held_out's progress arguments."""
        self.line(f"eval {tag}: {what}, {n_questions} held-out questions x {k} samples")
        if self.live:
            yield {"progress": True, "console": self.console}
            return
        stop = threading.Event()
        started = time.monotonic()

        def heartbeat() -> None:  # evaluate reports no counts to a caller, only to its own live bar
            while not stop.wait(self.every_s):
                self.line(f"eval {tag}: sampling, {time.monotonic() - started:.0f} s")

        beat = threading.Thread(target=heartbeat, name=f"eval-{tag}-progress", daemon=True)
        beat.start()
        try:
            yield {}
        finally:
            stop.set()
            beat.join()

    def evaluated(self, tag: str, s: dict) -> None:
        self.line(f"eval {tag}: pass@1 {s.get('pass@1', 0):.3f}  cons@k {s.get('cons@k', 0):.3f}  "
                  f"format {s.get('format_rate', 0):.3f}  len {s.get('response_length', 0):.1f}  "
                  f"({s.get('seconds', 0):.1f} s)")

    def grpo_step(self, step: int, total: int, m: dict) -> None:
        desc = (f"reward {m.get('reward', 0):.2f}  acc {m.get('accuracy', 0):.2f}  fmt {m.get('format_rate', 0):.2f}  "
                f"len {m.get('response_length', 0):.0f}  {m.get('time/step', 0):.1f}s/step")
        if self.live:
            self._grpo_bar(total).update(self._task, completed=step + 1, description=desc)
            if step + 1 >= total:
                self.grpo_done()
            return
        now = time.monotonic()
        if self._last_line is None or step + 1 >= total or now - self._last_line >= self.every_s:
            self.line(f"GRPO step {step + 1}/{total}  {desc}")
            self._last_line = now

    def _grpo_bar(self, total: int):
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=self.console)
            self._task = self._bar.add_task("", total=total)
            self._bar.start()
        return self._bar

    def grpo_done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_table(summary: dict, console=None) -> None:
    """The before/after table of the held-out metrics in REPORTED (a metric missing from either side is left
    out)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"R1-Zero on {summary.get('task', '')}: held-out, R1 protocol")
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in REPORTED:
        b, a = summary["before"].get(key), summary["after"].get(key)
        if b is None or a is None:
            continue
        table.add_row(key, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}")
    console.print(table)
