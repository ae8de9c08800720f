"""`r1lab pipeline zero|r1`: R1's recipe as a table of resumable stages (R1 §2.3-2.4).

    stage            kind  starts from     trains on / with
    zero             RL    base            rule rewards (R1-Zero, the reference point)
    cold_start       SFT   base            readable zero-stage traces + written long-CoT demonstrations → Dev1
    reasoning_rl     RL    cold_start      rule rewards + language consistency                        → Dev2
    rejection_sft    SFT   base            rejection-sampled reasoning_rl traces + demonstrations     → Dev3
    final_rl         RL    rejection_sft   rule rewards + a learned reward model on the summary       → R1
    distill_student  SFT   student_base    the final model's filtered traces (distillation)
    rl_student       RL    student_base    R1-Zero RL instead (the control)

`STAGES` is that table; `PIPELINES` names which stages a pipeline runs. Every stage writes OUT/stages/<name>/
with its HF checkpoint (model/), its metrics and, last, done.json (its held-out numbers). A rerun of the same
command skips stages with done.json and resumes an interrupted stage from its last checkpoint (GRPO and SFT
checkpoint as they go); the rejection-sampled traces are cached in OUT/data/<consuming stage>.jsonl.

Adding a stage is one row in STAGES (and its settings in PipelineConfig when it has new ones).

Under torchrun (`Pipeline(..., dist=info)`) every stage runs on all ranks: RL and SFT sharded with FSDP2,
evaluation and rejection sampling on each rank's share of the questions / prompts (gathered), the reward
model data-parallel. Rank 0 takes every decision that reads the run directory (stage done? data cached?)
and broadcasts it, and alone writes done.json, summary.json, data/ and the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from r1lab import distributed as D
from r1lab.config import ConfigError, check_ranges
from r1lab.eval.runner import EvalConfig
from r1lab.fsutil import atomic_write_text
from r1lab.model import DEFAULT_MODEL_DIR, DEFAULT_STUDENT_DIR, load_model_and_tokenizer
from r1lab.run_dir import RunDir
from r1lab.train.grpo import GRPOConfig, TaskConfig, train_grpo
from r1lab.pipeline.zero import evaluate_held_out

METRICS = ("pass@1", "cons@k", "response_length", "format_rate", "mixed_language_rate")


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: what a stage trains, from which model, on what."""

    name: str
    kind: Literal["rl", "sft"]
    init: str
    """The model it starts from: "base", "student_base" or an earlier stage's name."""
    rl: str | None = None
    """RL: the PipelineConfig field holding its GRPOConfig."""
    traces_of: str | None = None
    """SFT: the stage whose rejection-sampled, filtered traces it trains on."""
    demonstrations: bool = False
    """SFT: plus the written long-CoT demonstrations (cold_start_examples of them)."""
    student: bool = False
    """SFT of the student (distillation): sft.distill_epochs epochs instead of sft.epochs."""
    reward_model: str | None = None
    """RL: the name of the learned reward term (trained once, bounded to (0, 1)) its rewards refer to."""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("zero", "rl", init="base", rl="zero"),
    # R1 §2.3.1: readable R1-Zero outputs (here the zero stage's correct, English-only, well-formed samples)
    # plus a smaller set of written long-CoT demonstrations
    Stage("cold_start", "sft", init="base", traces_of="zero", demonstrations=True),
    Stage("reasoning_rl", "rl", init="cold_start", rl="reasoning_rl"),
    Stage("rejection_sft", "sft", init="base", traces_of="reasoning_rl", demonstrations=True),
    Stage("final_rl", "rl", init="rejection_sft", rl="final_rl", reward_model="helpful"),
    Stage("distill_student", "sft", init="student_base", traces_of="final_rl", student=True),
    Stage("rl_student", "rl", init="student_base", rl="zero"),
)}
PIPELINES: dict[str, tuple[str, ...]] = {"zero": ("zero",), "r1": tuple(STAGES)}


def _rl(**overrides) -> GRPOConfig:
    base = dict(lr=5e-4, steps=40, max_new_tokens=96, save_every=10)
    return GRPOConfig(**{**base, **overrides})


@dataclass
class SFTStageConfig:
    """Settings of the SFT stages (cold_start, rejection_sft, distill_student)."""

    epochs: int = 2
    """Epochs of cold_start and rejection_sft (R1 stage 3: 2)."""
    distill_epochs: int = 3
    """Epochs of distill_student."""
    lr: float = 2e-4
    """Peak learning rate."""
    tokens_per_step: int = 1024
    """Tokens per optimizer step (and per micro-batch); benchmarks/RESULTS.md has the ablation that chose it."""
    max_len: int = 384
    """Longest example in tokens (longer ones are dropped)."""
    warmup_steps: int = 5
    save_every: int = 20
    log_every: int = 5

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"epochs": 1, "distill_epochs": 1, "tokens_per_step": 1, "max_len": 2,
                                     "warmup_steps": 0, "save_every": 0, "log_every": 1}, positive=("lr",))


@dataclass
class TraceConfig:
    """Rejection sampling of a stage's model on training prompts (the data of the SFT stages)."""

    prompts: int = 400
    """Training prompts sampled."""
    k: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    max_new_tokens: int = 128
    language: str = "en"
    """The language a kept chain of thought must be written in."""
    max_per_prompt: int = 1
    """Most samples kept per prompt."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"prompts": 1, "k": 1, "max_new_tokens": 1, "temperature": 0,
                                     "max_per_prompt": 1})


@dataclass
class RewardModelStageConfig:
    """The helpfulness reward model of final_rl, trained once on procedural preference pairs."""

    pairs: int = 1500
    lr: float = 1e-3
    epochs: int = 1

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"pairs": 2, "epochs": 1}, positive=("lr",))


@dataclass
class PipelineConfig:
    base: str | None = None
    """Base model folder (with tokenizer); None = the embedded r1-tiny."""
    student: str | None = None
    """Student base folder (dense, smaller); None = the embedded r1-tiny-student (Qwen2 architecture)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Task for every RL stage, rejection sampling and the held-out evaluation."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(seed=0))
    """Held-out evaluation of the base and of every stage."""
    zero: GRPOConfig = field(default_factory=_rl)
    """R1-Zero stage (and the rl_student control)."""
    reasoning_rl: GRPOConfig = field(default_factory=lambda: _rl(
        lr=1e-4, rewards={"accuracy": 1.0, "format": 1.0, "language": 1.0}))
    """Reasoning-oriented RL: rule rewards + the language-consistency reward (R1 §2.3.2). RL after SFT needs a
    lower lr than R1-Zero (benchmarks/RESULTS.md, pipeline ablations)."""
    final_rl: GRPOConfig = field(default_factory=lambda: _rl(
        steps=30, lr=1e-4, temperature=0.7, rewards={"accuracy": 1.0, "format": 1.0, "language": 1.0,
                                                     "helpful": {"weight": 0.5, "on": "summary"}}))
    """All-scenario RL: rule rewards + a learned reward model on the summary; R1 used T = 0.7 here."""
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    traces: TraceConfig = field(default_factory=TraceConfig)
    reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig)
    cold_start_examples: int = 100
    """Written long-CoT demonstrations added to the readable zero-stage samples for cold start and to the
    rejection-sampled data (R1: thousands of cold-start examples)."""
    device: str = "cpu"
    """Where every stage runs ("cuda" on a GPU); it overrides the RL stages' own `device`."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"cold_start_examples": 1})


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path, log=print, dist: D.DistInfo | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.info = dist or D.single_process(cfg.device)
        self.log = D.rank0_log(log, self.info)
        # every model of every stage loads onto this rank's own device (cuda:LOCAL_RANK under torchrun)
        self.device = str(self.info.device)
        for g in (cfg.zero, cfg.reasoning_rl, cfg.final_rl):
            g.task, g.device = cfg.task, cfg.device
        self.base_dir = Path(cfg.base) if cfg.base else DEFAULT_MODEL_DIR
        self.student_dir = Path(cfg.student) if cfg.student else DEFAULT_STUDENT_DIR
        self._held_out = None

    # ------------------------------------------------------------------ plumbing
    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name

    def _from_rank0(self, read):
        """read() evaluated on rank 0 and broadcast (a collective under torchrun): every rank then takes
        the same decision about what the run directory holds."""
        return D.broadcast_object(read() if self.info.is_main else None, self.info)

    def _read_json(self, path: Path) -> dict | None:
        return self._from_rank0(lambda: json.loads(path.read_text()) if path.is_file() else None)

    def done(self, name: str) -> dict | None:
        return self._read_json(self.stage_dir(name) / "done.json")

    def model_dir(self, name: str) -> Path:
        return {"base": self.base_dir, "student_base": self.student_dir}.get(name) or self.stage_dir(name) / "model"

    def load(self, name: str):
        return load_model_and_tokenizer(self.model_dir(name), device=self.device, dtype="float32")

    def evaluate(self, model, tok, name: str) -> dict:
        """Held-out numbers (every rank calls it; rank 0 writes eval/<name>.jsonl)."""
        if self._held_out is None:
            self._held_out = self.cfg.task.load("test")
        summary = evaluate_held_out(model, tok, self._held_out, self.cfg.eval, self.cfg.task.template, self.info,
                                    self.out / "eval" / f"{name}.jsonl", name)
        return {k: summary[k] for k in METRICS if k in summary}

    def finish(self, name: str, model, tok, extra: dict | None = None) -> dict:
        from r1lab.rollout import release_engines
        from r1lab.train.checkpoint import save_model_folder
        from r1lab.train.parallel import release_rollout_replica

        d = self.stage_dir(name)
        if not self._from_rank0(lambda: (d / "model" / "config.json").is_file()):
            save_model_folder(model, tok, self.info, d / "model")  # every rank; rank 0 writes
        result = {**self.evaluate(model, tok, name), **(extra or {})}
        if self.info.is_main:
            atomic_write_text(d / "done.json", json.dumps(result, indent=2))
        if release_rollout_replica(model):  # a later stage's model must never find this one's replica
            release_engines()
        D.barrier(self.info)
        return result

    # ------------------------------------------------------------------ stages
    def run_stage(self, stage: Stage) -> dict:
        if stage.kind == "rl":
            reward_models = {stage.reward_model: self.reward_model()} if stage.reward_model else None
            return self.rl_stage(stage.name, stage.init, getattr(self.cfg, stage.rl), reward_models)
        records = list(self.traces(stage.traces_of, stage.name)) if stage.traces_of else []
        if stage.demonstrations:
            records += self.demonstrations()
        epochs = self.cfg.sft.distill_epochs if stage.student else self.cfg.sft.epochs
        return self.sft_stage(stage.name, stage.init, _pairs(records), epochs)

    def rl_stage(self, name: str, init: str, cfg: GRPOConfig, reward_models=None) -> dict:
        model, tok = self.load(init)
        from r1lab.train.checkpoint import publish_checkpoint_model

        t0 = time.time()
        trainer = train_grpo(cfg, RunDir(self.stage_dir(name)), model, tok, resume=True, reward_models=reward_models,
                             dist=self.info)
        publish_checkpoint_model(trainer.last_checkpoint, self.stage_dir(name) / "model", self.info)
        return self.finish(name, model, tok, {"train_seconds": round(time.time() - t0, 1), "init": init})

    def sft_stage(self, name: str, init: str, records: list[dict], epochs: int) -> dict:
        from r1lab.train.sft import SFTConfig, train_sft

        s = self.cfg.sft
        model, tok = self.load(init)
        cfg = SFTConfig(model=str(self.model_dir(init)), data=records, epochs=epochs, lr=s.lr, max_len=s.max_len,
                        micro_batch_tokens=s.tokens_per_step, tokens_per_step=s.tokens_per_step,
                        warmup_steps=s.warmup_steps, save_every=s.save_every, seed=self.cfg.seed,
                        log_every=s.log_every, device=self.cfg.device)
        t0 = time.time()
        model = train_sft(cfg, RunDir(self.stage_dir(name)), model=model, tokenizer=tok, log=lambda s: None,
                          dist=self.info)
        return self.finish(name, model, tok, {"train_seconds": round(time.time() - t0, 1), "init": init,
                                              "examples": len(records)})

    def traces(self, source: str, tag: str) -> list[dict]:
        """Rejection-sampled, filtered traces of a stage's model on training prompts (cached as JSONL).
        Under torchrun every rank samples its share of the prompts on its own copy of the model; the
        filters (dedup and cap included) run on the gathered samples; rank 0 writes the files."""
        from r1lab.pipeline.rejection import FilterConfig, rejection_sample, write_jsonl
        from r1lab.tasks import Task

        path = self.out / "data" / f"{tag}.jsonl"
        cached = self._from_rank0(
            lambda: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.is_file() else None)
        if cached is not None:
            return cached
        t = self.cfg.traces
        model, tok = self.load(source)
        train = self.cfg.task.load("train")
        prompts = Task(train.name, train.problems[: t.prompts], train.scorer, train.instruction, train.template)
        result = rejection_sample(model, tok, prompts, k=t.k, temperature=t.temperature,
                                  max_new_tokens=t.max_new_tokens, template=self.cfg.task.template,
                                  filters=FilterConfig(language=t.language, max_per_prompt=t.max_per_prompt),
                                  seed=self.cfg.seed, model_name=source, dist=self.info)
        if self.info.is_main:
            write_jsonl(result.records, path)
            atomic_write_text(self.out / "data" / f"{tag}.stats.json", json.dumps(result.stats, indent=2))
        D.barrier(self.info)
        return result.records

    def demonstrations(self) -> list[dict]:
        """Written clean long-CoT demonstrations (the corpus's cold-start generator)."""
        from r1lab.tasks.corpus import generate_cold_start

        return generate_cold_start(self.cfg.cold_start_examples, seed=self.cfg.seed + 7)

    def reward_model(self):
        """Train (once) the helpfulness reward model on procedural preference pairs; returns a RewardModel.
        Under torchrun it trains data-parallel on plain replicas (train_reward_model(dist=...)), then every
        rank loads the saved folder onto its own device (each rank scores its own completions)."""
        from r1lab.rewards import BoundedReward
        from r1lab.train.reward_model import LearnedReward, RewardModelConfig, train_reward_model

        folder = self.out / "reward_model"
        if not self._from_rank0(lambda: (folder / "reward_model").is_dir()):
            r = self.cfg.reward_model
            cfg = RewardModelConfig(model=str(self.student_dir), synthetic_pairs=r.pairs, epochs=r.epochs, lr=r.lr,
                                    seed=self.cfg.seed, save_every=0, device=self.cfg.device)
            net = train_reward_model(cfg, RunDir(folder), log=lambda s: None, dist=self.info)
            del net  # the saved folder is what every stage reads (returns once rank 0 has written it)
        return BoundedReward(LearnedReward.load(folder / "reward_model", device=self.device))

    def run(self, kind: str) -> dict:
        if kind not in PIPELINES:
            hint = " (distillation from a given teacher is `r1lab distill`)" if kind == "distill" else ""
            raise ConfigError(f"unknown pipeline {kind!r}; expected one of {sorted(PIPELINES)}{hint}")
        main = self.info.is_main
        summary_path = self.out / "summary.json"
        stages: dict[str, dict] = {}
        base = self._read_json(self.out / "eval" / "base.json")
        if base is None:
            model, tok = self.load("base")
            base = self.evaluate(model, tok, "base")
            if main:
                (self.out / "eval").mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.out / "eval" / "base.json", json.dumps(base))
            del model
        stages["base"] = base
        for name in PIPELINES[kind]:
            result = self.done(name)
            if result is None:
                self.log(f"[stage {name}] running")
                t0 = time.time()
                result = self.run_stage(STAGES[name])
                self.log(f"[stage {name}] done in {time.time() - t0:.0f}s: " +
                         ", ".join(f"{k} {result[k]:.3f}" for k in METRICS if k in result))
            else:
                self.log(f"[stage {name}] already done, skipped")
            stages[name] = result
            if main:
                atomic_write_text(summary_path, json.dumps({"pipeline": kind, "stages": stages}, indent=2))
        from r1lab.eval.report import write_report

        if main:
            write_report(self.out)
        D.barrier(self.info)
        return {"pipeline": kind, "stages": stages}


def _pairs(records: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]


def print_stage_table(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"r1lab pipeline {summary['pipeline']}: held-out, R1 protocol")
    table.add_column("stage")
    for m in METRICS:
        table.add_column(m, justify="right")
    for name, r in summary["stages"].items():
        table.add_row(name, *[f"{r[m]:.3f}" if m in r else "-" for m in METRICS])
    console.print(table)
