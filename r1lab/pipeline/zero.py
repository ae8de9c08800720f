"""`r1lab zero`: R1-Zero — pure RL (GRPO with rule rewards) from a base model, with a before/after table.

With no arguments: the embedded tiny DeepSeek-V3-architecture base (r1lab/assets/r1-tiny, pretrained by
`r1lab pretrain --recipe recipes/pretrain-tiny.yaml`), reasoning-gym chain_sum, the R1-Zero template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from r1lab import distributed as D
from r1lab.eval.runner import EvalConfig, evaluate
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


REPORTED = ("pass@1", "cons@k", "response_length", "format_rate")


def evaluate_held_out(model, tokenizer, held_out: Task, cfg: EvalConfig, template: str | None, info: D.DistInfo,
                      out_path: Path, name: str) -> dict:
    """The R1-protocol summary of `model` on a held-out task, during a training run: on the gathered weights
    when the model is FSDP-sharded, each rank sampling its share of the questions. Every rank calls it."""
    with gathered_for_rollout(model, info) as policy:  # the model itself unless it is sharded
        summary, _ = evaluate(policy, tokenizer, held_out, template=template, progress=False, out_path=out_path,
                              name=name, dist=info, **cfg.sampling())
    return summary


def run_zero(cfg: ZeroConfig, run_dir: RunDir, *, resume: bool = False, progress: bool = True,
             dist: D.DistInfo | None = None) -> dict:
    """Evaluate the base, run GRPO, evaluate again; writes summary.json and report.html. Returns the summary.

    dist (from `init_distributed()` under torchrun): GRPO runs sharded with FSDP2, each rank evaluates its
    share of the held-out questions; rank 0 alone writes the summary, the report and the final model."""
    from r1lab.eval.report import write_report

    g = cfg.grpo
    info = dist or D.single_process(g.device)
    # every rank loads onto its own GPU (cuda:LOCAL_RANK under torchrun)
    model, tok = load_model_and_tokenizer(cfg.model, device=str(info.device), dtype=g.dtype)
    t = g.task
    held_out = t.load("test")

    def measure(tag: str) -> dict:
        return evaluate_held_out(model, tok, held_out, cfg.eval, t.template, info,
                                 run_dir.path / "eval" / f"{tag}.jsonl", tag)

    t0 = time.time()
    before = _load_before(run_dir) if resume else None
    if before is None:
        before = measure("before")
        if info.is_main:
            run_dir.write_summary({"before": before})
    trainer = train_grpo(g, run_dir, model, tok, resume=resume,
                         on_step=_progress(g.steps) if progress and info.is_main else None, dist=info)
    after = measure("after")
    publish_checkpoint_model(trainer.last_checkpoint, run_dir.path / "model", info)  # the final weights, linked
    summary = {"before": before, "after": after, "task": t.name, "steps": g.steps, "seconds": round(time.time() - t0, 1),
               "world_size": info.world_size}
    if info.is_main:
        run_dir.write_summary(summary)
        write_report(run_dir.path)
    return summary


def _load_before(run_dir: RunDir) -> dict | None:
    import json

    path = run_dir.path / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("before")


def _progress(total: int):
    """A live rich progress bar whose description carries the latest reward, accuracy and length."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"))
    task = bar.add_task("", total=total)
    bar.start()

    def on_step(step: int, m: dict) -> None:
        desc = (f"reward {m.get('reward', 0):.2f}  acc {m.get('accuracy', 0):.2f}  fmt {m.get('format_rate', 0):.2f}  "
                f"len {m.get('response_length', 0):.0f}  {m.get('time/step', 0):.1f}s/step")
        bar.update(task, completed=step + 1, description=desc)
        if step + 1 >= total:
            bar.stop()

    return on_step


def print_table(summary: dict, console=None) -> None:
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
