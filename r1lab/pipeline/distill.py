"""Distillation (R1 §2.4): fine-tune a small dense student on a reasoning teacher's traces, SFT only.

    teacher traces (rejection-sampled records, or sampled here from a teacher model on a prompt set)
      → text filters (the rejection-sampling filters: format, language, paragraphs, code, dedup, cap)
      → SFT of a student of another size or architecture (e.g. a MoE+MLA teacher → a Qwen2/Llama student)

Records are text, so a student with a different tokenizer simply encodes them with its own (retokenization);
chat prompts are re-rendered with the student's chat template from the question. The run directory holds
config.yaml, teacher_records.jsonl (written once; a resumed run reuses it instead of sampling again),
summary.json, and student/ (the SFT run: metrics, checkpoints, and the student model in student/model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import r1lab.model as rm
from r1lab import distributed as D
from r1lab.config import ConfigError
from r1lab.fsutil import atomic_write_text
from r1lab.pipeline.rejection import SamplingSpec, filter_records, write_jsonl
from r1lab.run_dir import RunDir, read_jsonl
from r1lab.tokenizer import Tokenizer, load_tokenizer
from r1lab.train.sft import SFTConfig, load_records, model_for_training, train_sft

TEACHER_RECORDS = "teacher_records.jsonl"
SAMPLING_STATS = "teacher_sampling.json"


@dataclass
class DistillConfig(SamplingSpec):
    teacher: str | None = None
    """Teacher HF folder, sampled on the task's prompts when no records are given."""
    teacher_tokenizer: str | None = None
    """Teacher tokenizer folder; None means the teacher folder."""
    records: str | None = None
    """JSONL of teacher traces {prompt, completion, question?, ...} (e.g. `r1lab sample` output); used instead
    of sampling the teacher."""
    temperature: float = 0.7
    """Teacher sampling temperature (the task, prompt count, k and filters: SamplingSpec's fields; given
    records are text-filtered only, since correctness needs problems with gold answers)."""
    student: str = "tiny-dense"
    """Student initial weights: an HF folder (e.g. a Qwen2.5 checkpoint) or a preset name (fresh weights)."""
    student_model: dict = field(default_factory=dict)
    """ModelArgs overrides for a preset student, e.g. {model_type: llama, hidden_size: 96}."""
    student_tokenizer: str | None = None
    """Student tokenizer folder; None: the student folder's, else the teacher's."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Student fine-tuning settings (model, tokenizer and data are filled in by distill)."""
    seed: int = 0
    """Seeds prompts, sampling and the student's fresh weights."""
    device: str = "cpu"
    """Torch device for the teacher and the student."""
    dtype: str = "float32"
    """Parameter dtype of teacher and student."""


@dataclass
class DistillResult:
    student_path: Path
    """HF folder of the distilled student (with its tokenizer)."""
    stats: dict[str, Any]
    """Record counts, filter rejections, architectures, parameter counts and SFT losses."""


def retemplate(records: Sequence[dict], template: str | None, tokenizer: Tokenizer,
               instruction: str | None = None) -> list[dict]:
    """Chat prompts re-rendered with the student's chat template (from the question, with `instruction`;
    None: the math default); other prompts are plain text and stay as they are. template None: each record's
    own (the template its source says it was sampled with, so an instruct teacher's chat turns are re-rendered
    too)."""
    from r1lab.tasks import render_prompt
    from r1lab.tasks.templates import MATH_INSTRUCTION

    out = []
    for r in records:
        if (template or (r.get("source") or {}).get("template")) != "chat":
            out.append(dict(r))
            continue
        if not r.get("question"):
            raise ValueError("chat-template records need a 'question' to re-render the prompt for the student")
        out.append({**r, "prompt": render_prompt("chat", r["question"], apply_chat_template=tokenizer.apply_chat_template,
                                                 instruction=MATH_INSTRUCTION if instruction is None else instruction)})
    return out


def retokenization_stats(records: Sequence[dict], tokenizer: Tokenizer) -> dict[str, float]:
    """How the student's tokenizer carries the traces: tokens per character and the share of records whose
    text survives encode → decode exactly (a byte-level BPE always does; a vocabulary with an unknown token
    does not, and the student would learn the damaged text)."""
    chars = tokens = exact = 0
    for r in records:
        text = r["prompt"] + r["completion"]
        ids = tokenizer.encode(text)
        chars += len(text)
        tokens += len(ids)
        exact += tokenizer.decode(ids) == text
    n = max(len(records), 1)
    return {"student_tokens_per_char": tokens / max(chars, 1), "retokenized_exact": exact / n}


def _teacher_traces(cfg: DistillConfig, teacher, teacher_tokenizer, problems, log, info: D.DistInfo,
                    device: str) -> tuple[list[dict], dict]:
    if teacher is None:
        if not cfg.teacher:
            raise ConfigError("distill needs teacher records (records=...) or a teacher model (teacher=...)")
        teacher, teacher_tokenizer = rm.load_model_and_tokenizer(
            cfg.teacher, tokenizer=teacher_tokenizer or cfg.teacher_tokenizer, device=device, dtype=cfg.dtype)
    teacher_tokenizer = teacher_tokenizer or load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
    result = cfg.sample(teacher, teacher_tokenizer, cfg.load_task(cfg.seed) if problems is None else problems,
                        seed=cfg.seed, model_name=cfg.teacher or teacher.args.model_type, dist=info)
    log("distill: teacher sampling " + ", ".join(f"{k} {v}" for k, v in result.stats.items()))
    teacher_info = {"teacher_model_type": teacher.args.model_type, "teacher_parameters": teacher.num_parameters()}
    return result.records, {**{f"sampling_{k}": v for k, v in result.stats.items()}, **teacher_info}


def distill(cfg: DistillConfig, run_dir: RunDir | str | Path, *, teacher_records: Sequence[dict] | None = None,
            teacher=None, teacher_tokenizer: Tokenizer | None = None, problems: Sequence[Any] | None = None,
            student=None, student_tokenizer: Tokenizer | None = None,
            log: Callable[[str], None] = print, dist: D.DistInfo | None = None) -> DistillResult:
    """Distill a teacher into a student; returns the student's folder and stats.

    Teacher traces come from, in order: teacher_records, cfg.records, the run directory's saved
    teacher_records.jsonl (a resumed run), or sampling `teacher` (or cfg.teacher) on `problems` (or
    cfg.task) with rejection sampling. student / student_tokenizer: objects to train instead of cfg.student.

    dist (from distributed.init_distributed() under torchrun; every rank calls distill): teacher and student
    load on the rank's own device, each rank samples its share of the prompts and the traces are filtered
    after gathering (rejection_sample), the student trains sharded (train_sft with FSDP2). Rank 0 alone
    logs and writes config, traces and summary; every rank returns the same path and stats.
    """
    info = dist or D.single_process(cfg.device)
    main = info.is_main
    log = D.rank0_log(log, info)
    device = str(info.device)  # the rank's own GPU under torchrun
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["sft"].pop("data", None)
    if main:
        run_dir.write_config(cfg_dict)
    saved = run_dir.path / TEACHER_RECORDS
    stats: dict[str, Any] = {}
    if teacher_records is not None:
        records = [dict(r) for r in teacher_records]
    elif cfg.records:
        records = load_records(cfg.records, required=("prompt", "completion"))
    elif D.broadcast_object(saved.is_file(), info):  # rank 0 decides: every rank takes the same branch
        records = read_jsonl(saved)
        if (run_dir.path / SAMPLING_STATS).is_file():
            stats = json.loads((run_dir.path / SAMPLING_STATS).read_text())
        log(f"distill: reusing {len(records)} teacher traces from {saved}")
    else:
        records, stats = _teacher_traces(cfg, teacher, teacher_tokenizer, problems, log, info, device)
        if main:
            atomic_write_text(run_dir.path / SAMPLING_STATS, json.dumps(stats, indent=2) + "\n")
    if teacher is not None:
        stats.update({"teacher_model_type": teacher.args.model_type, "teacher_parameters": teacher.num_parameters()})
    if main:
        write_jsonl(records, saved)
    D.barrier(info)

    # Text filters again: given records may never have been filtered, and re-filtering kept ones is a no-op.
    kept, filter_stats = filter_records(records, cfg.filters)
    stats.update({f"filter_{k}": v for k, v in filter_stats.items()})
    if not kept:
        raise ValueError(f"no teacher trace passed the filters ({filter_stats}); loosen filters or sample more")

    if student_tokenizer is None:
        if cfg.student_tokenizer or Path(cfg.student).is_dir():
            student_tokenizer = load_tokenizer(cfg.student_tokenizer or cfg.student)
        else:
            student_tokenizer = teacher_tokenizer or load_tokenizer(cfg.teacher_tokenizer or cfg.teacher or "")
    student, student_tokenizer = model_for_training(
        cfg.student, None, seed=cfg.seed, device=device, dtype=cfg.dtype, model=student,
        tokenizer=student_tokenizer, preset_overrides=cfg.student_model)
    kept = retemplate(kept, cfg.template, student_tokenizer, cfg.instruction)
    stats.update(retokenization_stats(kept, student_tokenizer))
    if stats["retokenized_exact"] < 1.0:
        log(f"distill: warning: only {stats['retokenized_exact']:.1%} of traces survive the student tokenizer exactly")
    stats.update({"student_model_type": student.args.model_type, "student_parameters": student.num_parameters(),
                  "student_vocab_size": student.args.vocab_size})

    sft_cfg = dataclasses.replace(cfg.sft, data=kept, model=cfg.student, tokenizer=cfg.student_tokenizer,
                                  device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    student_dir = RunDir(run_dir.path / "student")
    # sharded under torchrun; returns after rank 0 has written student/summary.json and student/model
    train_sft(sft_cfg, student_dir, model=student, tokenizer=student_tokenizer, log=log, dist=info)
    sft_summary = json.loads((student_dir.path / "summary.json").read_text())
    stats.update({"sft_first_loss": sft_summary["first_loss"], "sft_final_loss": sft_summary["final_loss"],
                  "sft_steps": sft_summary["steps"], "sft_examples": sft_summary["examples"]})
    path = student_dir.path / "model"
    if main:
        run_dir.write_summary({**stats, "student_path": str(path)})
    run_dir.close()
    D.barrier(info)
    return DistillResult(path, stats)
