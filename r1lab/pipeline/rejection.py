"""Rejection sampling (R1 stage 3): sample k responses per prompt, keep correct and readable ones.

R1 samples several responses per prompt from the reasoning-RL checkpoint, keeps only the correct ones, and
filters out chains of thought with mixed languages, long paragraphs and code blocks [R1v1 §2.3.3]. Here a
sample is kept when, in this order, it:

1. finished (did not hit max_new_tokens)            → else rejected as "truncated"
2. scores >= min_score with the scorer              → "incorrect"   (default scorer: accuracy_reward)
3. has the <think>...</think><answer>...</answer> format → "format"
4. reasons in one language (is_mixed_language)      → "language"
5. has no paragraph longer than the limit           → "long_paragraph"
6. has no ``` code block                            → "code_block"
7. is not a duplicate of a kept sample of its prompt (normalized text) → "duplicate"
8. is among the first max_per_prompt kept of its prompt → "over_cap"

Each sample is counted under the first check it fails, so the rejection counts add up to the samples
drawn. Every kept record carries its provenance (model, sample index, step, sampling settings).
Steps 3-6 are pure functions of text (`failed_filters`), reused by distillation on existing records.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from r1lab.config import ConfigError, check_ranges
from r1lab.fsutil import atomic_write_text
from r1lab.rewards import format_reward, is_mixed_language
from r1lab.run_dir import RunDir
from r1lab.tasks import Task, as_task

REJECTION_REASONS = ("truncated", "incorrect", "format", "language", "long_paragraph", "code_block",
                     "duplicate", "over_cap")
TEXT_FILTERS = ("format", "language", "long_paragraph", "code_block")


@dataclass
class FilterConfig:
    min_score: float = 1.0
    """A sample is correct when the scorer gives at least this."""
    reject_truncated: bool = True
    """Reject samples cut off by max_new_tokens (their format is broken or their answer premature)."""
    require_format: bool = True
    """Require format_reward == 1 (one <think> block then one <answer> block)."""
    language: str | None = None
    """Language the chain of thought must be written in ('en', 'zh', ...); None: any one language."""
    language_threshold: float = 0.95
    """Share of chain-of-thought words that must be in that one language (else 'mixed')."""
    max_paragraph_chars: int | None = 2000
    """Longest paragraph (text between blank lines) allowed, in characters; None disables."""
    max_paragraph_tokens: int | None = None
    """Longest paragraph allowed in tokens (needs a tokenizer); None disables."""
    reject_code_blocks: bool = True
    """Reject responses containing ``` fences (R1 filtered code blocks out of reasoning data)."""
    dedup: bool = True
    """Drop a sample whose normalized text equals an already kept sample of the same prompt."""
    max_per_prompt: int = 1
    """Most samples kept per prompt (m)."""


# ----------------------------------------------------------------------------------- pure filters
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of text: pieces separated by blank lines, stripped."""
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def has_long_paragraph(text: str, max_chars: int | None = None, max_tokens: int | None = None,
                       count_tokens: Callable[[str], int] | None = None) -> bool:
    """True when some paragraph has more than max_chars characters or max_tokens tokens."""
    for p in paragraphs(text):
        if max_chars is not None and len(p) > max_chars:
            return True
        if max_tokens is not None:
            if count_tokens is None:
                raise ValueError("max_paragraph_tokens needs a tokenizer to count tokens")
            if count_tokens(p) > max_tokens:
                return True
    return False


def has_code_block(text: str) -> bool:
    """True when the text holds a ``` fence."""
    return "```" in text


def has_mixed_language(text: str, language: str | None = None, threshold: float = 0.95) -> bool:
    """True when the chain of thought (the <think> block, or the whole text without one) mixes languages."""
    return is_mixed_language(text, threshold=threshold, language=language)


def has_bad_format(text: str) -> bool:
    """True when the text is not exactly one <think> block followed by one <answer> block."""
    return format_reward(text) < 1.0


def normalize_for_dedup(text: str) -> str:
    """Text as compared for de-duplication: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def failed_filters(text: str, cfg: FilterConfig, count_tokens: Callable[[str], int] | None = None) -> list[str]:
    """Names of the text filters (format, language, long_paragraph, code_block) that text fails, in order."""
    failed = []
    if cfg.require_format and has_bad_format(text):
        failed.append("format")
    if has_mixed_language(text, cfg.language, cfg.language_threshold):
        failed.append("language")
    if has_long_paragraph(text, cfg.max_paragraph_chars, cfg.max_paragraph_tokens, count_tokens):
        failed.append("long_paragraph")
    if cfg.reject_code_blocks and has_code_block(text):
        failed.append("code_block")
    return failed


def passed_filters(cfg: FilterConfig) -> list[str]:
    """Names of the checks a kept sample has passed under cfg (provenance for its record)."""
    names = ["finished"] if cfg.reject_truncated else []
    names.append("correct")
    names += [n for n, on in (("format", cfg.require_format), ("language", True),
                              ("long_paragraph", cfg.max_paragraph_chars is not None or cfg.max_paragraph_tokens is not None),
                              ("code_block", cfg.reject_code_blocks), ("dedup", cfg.dedup)) if on]
    return names


@dataclass
class Candidate:
    """One sampled response before selection."""

    prompt_index: int
    sample_index: int
    text: str
    score: float
    finished: bool = True


def select(candidates: Iterable[Candidate], cfg: FilterConfig,
           count_tokens: Callable[[str], int] | None = None) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """Apply every check in order; returns (kept, [(rejected, reason)]). Pure: no model, no I/O."""
    kept: list[Candidate] = []
    rejected: list[tuple[Candidate, str]] = []
    seen: dict[int, set[str]] = {}
    per_prompt: dict[int, int] = {}
    for c in candidates:
        reason = None
        if cfg.reject_truncated and not c.finished:
            reason = "truncated"
        elif c.score < cfg.min_score:
            reason = "incorrect"
        else:
            failed = failed_filters(c.text, cfg, count_tokens)
            if failed:
                reason = failed[0]
            else:
                key = normalize_for_dedup(c.text)
                if cfg.dedup and key in seen.get(c.prompt_index, ()):
                    reason = "duplicate"
                elif per_prompt.get(c.prompt_index, 0) >= cfg.max_per_prompt:
                    reason = "over_cap"
                else:
                    seen.setdefault(c.prompt_index, set()).add(key)
                    per_prompt[c.prompt_index] = per_prompt.get(c.prompt_index, 0) + 1
        if reason is None:
            kept.append(c)
        else:
            rejected.append((c, reason))
    return kept, rejected


def selection_stats(n_prompts: int, kept: Sequence[Candidate], rejected: Sequence[tuple[Candidate, str]]) -> dict[str, float]:
    """Counts: prompts, samples, kept, prompts_with_kept, rejected_<reason> for every reason."""
    stats = {"prompts": n_prompts, "samples": len(kept) + len(rejected), "kept": len(kept),
             "prompts_with_kept": len({c.prompt_index for c in kept})}
    for reason in REJECTION_REASONS:
        stats[f"rejected_{reason}"] = sum(r == reason for _, r in rejected)
    return stats


# ----------------------------------------------------------------------------------- sampling
@dataclass
class RejectionResult:
    records: list[dict]
    """Kept samples: {prompt, completion, question, gold, score, source, filters_passed}."""
    stats: dict[str, float]
    """Counts of samples kept and rejected by each check (see REJECTION_REASONS)."""
    rejected: list[dict] = field(default_factory=list)
    """Rejected samples with {prompt_index, sample_index, completion, score, rejected_by}, for inspection."""


def rejection_sample(
    model,
    tokenizer,
    problems: Task | Sequence[Any],
    *,
    k: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    max_new_tokens: int = 256,
    template: str | None = None,
    scorer: Callable[[Any, str], float] | None = None,
    filters: FilterConfig | None = None,
    seed: int = 0,
    prompts_per_batch: int = 64,
    model_name: str | None = None,
    step: int | None = None,
    stop_strings: Sequence[str] = (),
    dist: Any = None,
) -> RejectionResult:
    """Sample k responses per problem with the rollout engine and keep the correct, clean ones.

    problems: a Task (its template, instruction and verifier are used), or problems (tasks.Problem or dicts
        {question, gold}) scored by math-verify against gold unless `scorer` is given.
    template: None (the task's own), 'r1_zero', 'chat', 'plain' or a string containing {question}.
    scorer(problem, completion) -> float: correctness, instead of the task's verifier.
    model_name/step: provenance written into every record's source.
    dist: a r1lab.distributed.DistInfo under torchrun (every rank must call this, each on its own unsharded
        model). Each rank samples its contiguous share of the problems (eval.sampling.sample_and_score); the
        checks, dedup and the per-prompt cap included, run on the gathered candidates, so every rank returns
        the result one process would select from the same samples. The caller writes the files from rank 0.
    """
    from r1lab.eval.sampling import sample_and_score

    filters = filters or FilterConfig()
    task = as_task(problems)
    count_tokens = (lambda text: len(tokenizer.encode(text))) if filters.max_paragraph_tokens else None
    sampled = sample_and_score(model, tokenizer, task, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, template=template, scorer=scorer,
                               batch=prompts_per_batch, stop_strings=stop_strings, dist=dist)
    # records are plain text; the SFT raw template re-inserts the separator before the completion
    candidates = [Candidate(item.index, j, text.lstrip(), score, finished=reason == "stop")
                  for item in sampled
                  for j, (text, score, reason) in enumerate(zip(item.texts, item.scores, item.finish_reasons))]
    kept, rejected = select(candidates, filters, count_tokens)
    source = {"model": model_name or getattr(model.args, "model_type", "model"), "step": step,
              "temperature": temperature, "top_p": top_p, "seed": seed,
              "template": template or task.default_template(tokenizer)}
    passed = passed_filters(filters)
    records = [{"prompt": sampled[c.prompt_index].prompt.text, "completion": c.text,
                "question": task.problems[c.prompt_index].question, "gold": task.problems[c.prompt_index].gold,
                "score": c.score, "source": {**source, "prompt_index": c.prompt_index, "sample_index": c.sample_index},
                "filters_passed": passed} for c in kept]
    rejected_rows = [{"prompt_index": c.prompt_index, "sample_index": c.sample_index, "completion": c.text,
                      "score": c.score, "rejected_by": reason} for c, reason in rejected]
    return RejectionResult(records, selection_stats(len(task.problems), kept, rejected), rejected_rows)


def filter_records(records: Sequence[dict], cfg: FilterConfig,
                   count_tokens: Callable[[str], int] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Apply the text filters, de-duplication and the per-prompt cap to existing {prompt, completion}
    records (e.g. a teacher's traces); a record's 'score' (default 1.0) is checked against min_score.
    Returns (kept records, stats)."""
    prompt_ids: dict[str, int] = {}
    candidates = []
    for i, r in enumerate(records):
        p = prompt_ids.setdefault(r["prompt"], len(prompt_ids))
        candidates.append(Candidate(p, i, r["completion"], float(r.get("score", 1.0))))
    kept, rejected = select(candidates, cfg, count_tokens)
    return [records[c.sample_index] for c in kept], selection_stats(len(prompt_ids), kept, rejected)


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (readers see the old file or the complete new one)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------- command
@dataclass
class SamplingSpec:
    """What to sample and keep: a task's prompts, k samples each, the filters. Shared by `r1lab sample`
    (RejectionConfig) and `r1lab distill` (DistillConfig), whose YAML keys are these field names."""

    task: str = "chain_sum"
    """Task spec for tasks.load_task (a reasoning-gym name, jsonl:PATH, ...)."""
    task_options: dict = field(default_factory=dict)
    """Extra options for the task (e.g. min_terms, max_digits for reasoning-gym)."""
    split: str = "train"
    """Task split to draw prompts from."""
    size: int = 256
    """Prompts to sample on."""
    template: str | None = None
    """Prompt template: r1_zero, chat, plain or a string with {question}; None: the task's own."""
    instruction: str | None = None
    """What a chat-template prompt asks for after the question; None: the task's own (math: \\boxed{})."""
    stop_strings: list[str] = field(default_factory=list)
    """Text that ends a sample (e.g. '</answer>' for an instruct model that keeps talking after its answer)."""
    k: int = 4
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest response; longer ones are truncated and rejected."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Which samples to keep."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"size": 1, "k": 1, "max_new_tokens": 1, "temperature": 0}, unit=("top_p",))

    def load_task(self, seed: int) -> Task:
        """The prompts to sample on, posed with this spec's instruction."""
        from r1lab.tasks import load_task

        task = load_task(self.task, split=self.split, size=self.size, seed=seed, **self.task_options)
        if self.instruction is not None:
            task.instruction = self.instruction
        return task

    def sample(self, model, tokenizer, problems: Task | Sequence[Any], *, seed: int, model_name: str,
               prompts_per_batch: int = 64, dist: Any = None) -> "RejectionResult":
        """rejection_sample with this spec's settings."""
        return rejection_sample(model, tokenizer, problems, k=self.k, temperature=self.temperature,
                                top_p=self.top_p, max_new_tokens=self.max_new_tokens, template=self.template,
                                filters=self.filters, seed=seed, prompts_per_batch=prompts_per_batch,
                                model_name=model_name, stop_strings=self.stop_strings, dist=dist)


@dataclass
class RejectionConfig(SamplingSpec):
    model: str = ""
    """HF model folder to sample from (the reasoning-RL checkpoint, R1's stage-2 output)."""
    tokenizer: str | None = None
    """Tokenizer folder; None means the model folder."""
    prompts_per_batch: int = 64
    """Prompts per generate call."""
    seed: int = 0
    """Seeds the task subset and the sampler."""
    device: str = "cpu"
    """Torch device."""
    dtype: str = "float32"
    """Model dtype for sampling."""


def run_rejection(cfg: RejectionConfig, run_dir: RunDir | str | Path, log: Callable[[str], None] = print,
                  dist: Any = None) -> Path:
    """`r1lab sample`: rejection-sample a task with a checkpoint; writes run_dir/records.jsonl (kept),
    rejected.jsonl, summary.json (stats) and config.yaml. Returns the records path.
    dist (under torchrun): every rank samples its share of the prompts on its own GPU; rank 0 writes."""
    from r1lab import distributed as D
    from r1lab.model import load_model_and_tokenizer

    info = dist or D.single_process(cfg.device)
    main = info.is_main
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if main:
        run_dir.write_config(cfg)
    if not cfg.model:
        raise ConfigError("set model= to the HF folder to sample from")
    model, tok = load_model_and_tokenizer(cfg.model, tokenizer=cfg.tokenizer, device=info.device, dtype=cfg.dtype)
    result = cfg.sample(model, tok, cfg.load_task(cfg.seed), seed=cfg.seed, model_name=str(cfg.model),
                        prompts_per_batch=cfg.prompts_per_batch, dist=info)
    path = run_dir.path / "records.jsonl"
    if not main:
        return path
    write_jsonl(result.records, path)
    write_jsonl(result.rejected, run_dir.path / "rejected.jsonl")
    run_dir.log_metrics(0, result.stats)
    run_dir.write_summary({**result.stats, "records": str(path)})
    run_dir.close()
    log("sample: " + ", ".join(f"{k} {v}" for k, v in result.stats.items()))
    return path
