"""`r1lab pipeline zero|r1|distill`: R1's recipes as ordered, resumable stages (R1 §2.3-2.4).

r1:   zero (R1-Zero from the base, the reference point)
      cold_start      SFT of the base on readable zero-stage samples + written long CoT     → Dev1
      reasoning_rl    GRPO from Dev1 with rule rewards + language consistency             → Dev2
      rejection_sft   sample Dev2, keep correct, single-language, clean; SFT of the BASE   → Dev3
      final_rl        GRPO from Dev3 with rule rewards + a learned reward model (summary)  → R1
      distill_student SFT of a small dense student on the final model's filtered traces
      rl_student      the same student trained with R1-Zero RL instead (the control)
zero: the zero stage alone;  distill: the r1 stages through distill_student and rl_student.

Every stage writes OUT/stages/<name>/ with its HF checkpoint (model/), its metrics and, last, done.json
(its held-out numbers). A rerun of the same command skips stages with done.json and resumes an
interrupted stage from its last checkpoint (GRPO and SFT checkpoint as they go).

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

from r1lab.config import ConfigError, check_ranges
from r1lab.fsutil import atomic_write_text
from r1lab.train import distributed as D
from r1lab.train.grpo import GRPOConfig, TaskConfig, train_grpo
from r1lab.train.run_dir import RunDir

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STAGES = {
    "zero": ["zero"],
    "r1": ["zero", "cold_start", "reasoning_rl", "rejection_sft", "final_rl", "distill_student", "rl_student"],
    "distill": ["zero", "cold_start", "reasoning_rl", "rejection_sft", "final_rl", "distill_student", "rl_student"],
}
METRICS = ("pass@1", "cons@k", "response_length", "format_rate", "mixed_language_rate")


def _rl(**overrides) -> GRPOConfig:
    base = dict(lr=5e-4, steps=40, max_new_tokens=96, save_every=10)
    return GRPOConfig(**{**base, **overrides})


@dataclass
class PipelineConfig:
    base: str | None = None
    """Base model folder (with tokenizer); None = the embedded r1-tiny."""
    student: str | None = None
    """Student base folder (dense, smaller); None = the embedded r1-tiny-student (Qwen2 architecture)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Task for every RL stage, rejection sampling and the held-out evaluation."""
    zero: GRPOConfig = field(default_factory=_rl)
    """R1-Zero stage (and the rl_student control)."""
    cold_start_examples: int = 100
    """Written long-CoT demonstrations added to the readable zero-stage samples for cold start and to the
    rejection-sampled data (R1: thousands of cold-start examples)."""
    sft_epochs: int = 2
    """Epochs of each SFT stage (R1 stage 3: 2)."""
    sft_lr: float = 2e-4
    """Peak learning rate of the SFT stages."""
    reasoning_rl: GRPOConfig = field(default_factory=lambda: _rl(
        lr=1e-4, rewards={"accuracy": 1.0, "format": 1.0, "language": 1.0}))
    """Reasoning-oriented RL: rule rewards + the language-consistency reward (R1 §2.3.2). lr 1e-4, as for
    final_rl: RL from an SFT'd model (CPU: cold_start 0.605 → 0.598 at 5e-4, → 0.757 at 1e-4)."""
    rejection_k: int = 4
    """Samples per training prompt in rejection sampling."""
    rejection_prompts: int = 400
    """Training prompts sampled for rejection SFT (and for distillation traces)."""
    final_rl: GRPOConfig = field(default_factory=lambda: _rl(
        steps=30, lr=1e-4, temperature=0.7, rewards={"accuracy": 1.0, "format": 1.0, "language": 1.0,
                                                     "helpful": {"weight": 0.5, "on": "summary"}}))
    """All-scenario RL: rule rewards + a learned reward model on the summary; R1 used T = 0.7 here. lr 1e-4:
    at the R1-Zero lr (5e-4) this stage undid the rejection-SFT model (CPU: 0.730 → 0.505, at 1e-4 → 0.786)."""
    reward_model_pairs: int = 1500
    """Procedural preference pairs for the reward model of the final stage."""
    eval_k: int = 8
    """Held-out samples per question (pass@1 is their mean)."""
    eval_max_new_tokens: int = 160
    sft_tokens_per_step: int = 1024
    """Tokens per optimizer step of the SFT stages (and per micro-batch). The SFT sets are a few hundred
    examples of ~175 tokens: at 4,096 a stage took ~22 optimizer steps and cold_start reached 0.355, at 1,024
    ~90 steps and 0.605 (CPU, same data)."""
    device: str = "cpu"
    """Where every stage runs ("cuda" on a GPU); it overrides the RL stages' own `device`."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"cold_start_examples": 1, "sft_epochs": 1, "rejection_k": 1,
                                     "rejection_prompts": 1, "reward_model_pairs": 2, "eval_k": 1,
                                     "eval_max_new_tokens": 1, "sft_tokens_per_step": 1}, positive=("sft_lr",))


class Pipeline:
    def __init__(self, cfg: PipelineConfig, out: Path, log=print, dist: D.DistInfo | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.info = dist or D.single_process(cfg.device)
        self.log = D.rank0_log(log, self.info)
        # every model of every stage loads onto this rank's own device (cuda:LOCAL_RANK under torchrun)
        self.device = str(self.info.device)
        for g in (cfg.zero, cfg.reasoning_rl, cfg.final_rl):
            g.task, g.device = cfg.task, cfg.device
        self.base_dir = Path(cfg.base) if cfg.base else ASSETS / "r1-tiny"
        self.student_dir = Path(cfg.student) if cfg.student else ASSETS / "r1-tiny-student"
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
        from r1lab.model import load_model_and_tokenizer

        return load_model_and_tokenizer(self.model_dir(name), device=self.device, dtype="float32")

    def evaluate(self, model, tok, name: str) -> dict:
        """Held-out numbers; under torchrun each rank samples its share of the questions on the gathered
        weights (the model itself when unsharded), rank 0 writes eval/<name>.jsonl. Every rank calls it."""
        from r1lab.eval.runner import evaluate

        if self._held_out is None:
            self._held_out = self.cfg.task.load("test")
        with D.gathered_for_rollout(model, self.info) as policy:
            summary, _ = evaluate(policy, tok, self._held_out, template=self.cfg.task.template, k=self.cfg.eval_k,
                                  max_new_tokens=self.cfg.eval_max_new_tokens, seed=self.cfg.seed, progress=False,
                                  out_path=self.out / "eval" / f"{name}.jsonl", name=name, dist=self.info)
        return {k: summary[k] for k in METRICS if k in summary}

    def finish(self, name: str, model, tok, extra: dict | None = None) -> dict:
        d = self.stage_dir(name)
        if not self._from_rank0(lambda: (d / "model" / "config.json").is_file()):
            D.save_model_folder(model, tok, self.info, d / "model")  # every rank; rank 0 writes
        result = {**self.evaluate(model, tok, name), **(extra or {})}
        if self.info.is_main:
            atomic_write_text(d / "done.json", json.dumps(result, indent=2))
        D.release_rollout_replica(model)  # a later stage's model must never find this one's replica
        D.barrier(self.info)
        return result

    # ------------------------------------------------------------------ stages
    def rl_stage(self, name: str, init: str, cfg: GRPOConfig, reward_models=None) -> dict:
        model, tok = self.load(init)
        run = RunDir(self.stage_dir(name))
        t0 = time.time()
        train_grpo(cfg, run, model, tok, resume=True, reward_models=reward_models, dist=self.info)
        return self.finish(name, model, tok, {"train_seconds": round(time.time() - t0, 1), "init": init})

    def sft_stage(self, name: str, init: str, records: list[dict], epochs: int | None = None) -> dict:
        from r1lab.train.sft import SFTConfig, train_sft

        model, tok = self.load(init)
        cfg = SFTConfig(model=str(self.model_dir(init)), data=records, epochs=epochs or self.cfg.sft_epochs,
                        lr=self.cfg.sft_lr, max_len=384, micro_batch_tokens=self.cfg.sft_tokens_per_step,
                        tokens_per_step=self.cfg.sft_tokens_per_step, warmup_steps=5, save_every=20,
                        seed=self.cfg.seed, log_every=5, device=self.cfg.device)
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

        path = self.out / "data" / f"{tag}.jsonl"
        cached = self._from_rank0(
            lambda: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.is_file() else None)
        if cached is not None:
            return cached
        model, tok = self.load(source)
        train = self.cfg.task.load("train")
        problems = train.problems[: self.cfg.rejection_prompts]
        result = rejection_sample(model, tok, problems, k=self.cfg.rejection_k, temperature=1.0, max_new_tokens=128,
                                  template=self.cfg.task.template, scorer=train.score, seed=self.cfg.seed,
                                  filters=FilterConfig(language="en", max_per_prompt=1), model_name=source,
                                  dist=self.info)
        if self.info.is_main:
            write_jsonl(result.records, path)
            atomic_write_text(self.out / "data" / f"{tag}.stats.json", json.dumps(result.stats, indent=2))
        D.barrier(self.info)
        return result.records

    def demonstrations(self) -> list[dict]:
        """Written clean long-CoT demonstrations (the corpus's cold-start generator)."""
        from r1lab.corpus import generate_cold_start

        return generate_cold_start(self.cfg.cold_start_examples, seed=self.cfg.seed + 7)

    def reward_model(self):
        """Train (once) the helpfulness reward model on procedural preference pairs; returns a RewardModel.
        Under torchrun it trains data-parallel on plain replicas (train_reward_model(dist=...)), then every
        rank loads the saved folder onto its own device (each rank scores its own completions)."""
        from r1lab.train.reward_model import LearnedReward, RewardModelConfig, train_reward_model

        folder = self.out / "reward_model"
        if not self._from_rank0(lambda: (folder / "reward_model").is_dir()):
            cfg = RewardModelConfig(model=str(self.student_dir), synthetic_pairs=self.cfg.reward_model_pairs,
                                    epochs=1, lr=1e-3, seed=self.cfg.seed, save_every=0, device=self.cfg.device)
            net = train_reward_model(cfg, RunDir(folder), log=lambda s: None, dist=self.info)
            del net  # the saved folder is what every stage reads (returns once rank 0 has written it)
        return BoundedReward(LearnedReward.load(folder / "reward_model", device=self.device))

    def run_stage(self, name: str) -> dict:
        c = self.cfg
        if name == "zero":
            return self.rl_stage("zero", "base", c.zero)
        if name == "cold_start":
            # R1 §2.3.1: readable R1-Zero outputs (here: the zero stage's correct, English-only, well-formed
            # samples) plus a smaller set of written long-CoT demonstrations.
            readable = self.traces("zero", "cold_start")
            return self.sft_stage("cold_start", "base", _pairs(list(readable) + self.demonstrations()))
        if name == "reasoning_rl":
            return self.rl_stage("reasoning_rl", "cold_start", c.reasoning_rl)
        if name == "rejection_sft":
            kept = self.traces("reasoning_rl", "rejection_sft")
            return self.sft_stage("rejection_sft", "base", _pairs(list(kept) + self.demonstrations()))
        if name == "final_rl":
            return self.rl_stage("final_rl", "rejection_sft", c.final_rl, reward_models={"helpful": self.reward_model()})
        if name == "distill_student":
            return self.sft_stage("distill_student", "student_base", _pairs(self.traces("final_rl", "distill")), epochs=3)
        if name == "rl_student":
            return self.rl_stage("rl_student", "student_base", c.zero)
        raise ValueError(f"unknown stage {name!r}")

    def run(self, kind: str) -> dict:
        if kind not in STAGES:
            raise ConfigError(f"unknown pipeline {kind!r}; expected one of {sorted(STAGES)}")
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
        for name in STAGES[kind]:
            result = self.done(name)
            if result is None:
                self.log(f"[stage {name}] running")
                t0 = time.time()
                result = self.run_stage(name)
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


class BoundedReward:
    """A learned reward squashed to (0, 1) by a sigmoid of its Bradley-Terry logit.

    Unbounded RM scores invite reward hacking: in our first full run the policy dropped </think> because the
    reward model liked the resulting "summary" by more than the format reward it lost (format rate fell to 0).
    Bounded, an RM term of weight w can never outweigh a rule reward of weight > w."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import math

        return [1.0 / (1.0 + math.exp(-s)) for s in self.inner.score(prompts, responses)]


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
