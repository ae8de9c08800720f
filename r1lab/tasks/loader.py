"""``load_task``: one entry point for every task source a recipe can name."""

from __future__ import annotations

from typing import Any

from .base import ChoiceScorer, CodeTestScorer, MathScorer, Task, select_split
from .champ import champ_problems
from .files import read_jsonl_problems, read_parquet_problems
from .humaneval import humaneval_problems
from .procedural import load_reasoning_gym
from .templates import CODE_INSTRUCTION, MATH_INSTRUCTION

__all__ = ["load_task"]

_FILE_OPTIONS = {"question_field", "answer_field", "tests_field", "answer_format"}


def load_task(spec: str, split: str = "train", size: int | None = None, seed: int = 0,
              **config: Any) -> Task:
    """Load a task by spec.

    Specs:
        ``"<name>"``: a reasoning-gym dataset ("countdown", "chain_sum", "basic_arithmetic",
            "gsm_symbolic", "simple_equations", ...); ``size`` is required, ``config`` goes to the
            dataset (``min_terms=2``...), and train/test are disjoint by construction.
        ``"jsonl:PATH"`` / ``"parquet:PATH"``: a file; ``config`` may set ``question_field``,
            ``answer_field``, ``answer_format`` ("auto", "gsm8k", "boxed", "raw") and, for code,
            ``tests_field``. The whole file is the split unless ``holdout_fraction`` is given.
        ``"humaneval"``, ``"champ"``: evaluation sets; only "test" unless ``holdout_fraction``
            carves a disjoint train part.

    ``size`` (None: all) keeps a seeded subset of fixed sources; ``seed`` also seeds generation.
    """
    kind, sep, arg = spec.partition(":")
    holdout = config.pop("holdout_fraction", None)
    if sep and kind in ("jsonl", "parquet"):
        unknown = set(config) - _FILE_OPTIONS
        if unknown:
            raise TypeError(f"unknown option(s) for {kind} tasks: {sorted(unknown)}; "
                            f"known: {sorted(_FILE_OPTIONS | {'holdout_fraction'})}")
        reader = read_jsonl_problems if kind == "jsonl" else read_parquet_problems
        problems = reader(arg, **config)
        problems = select_split(problems, source=spec, split=split, size=size, seed=seed,
                                holdout_fraction=holdout, eval_only=False)
        is_code = config.get("tests_field") is not None
        return Task(name=spec, problems=problems, scorer=CodeTestScorer() if is_code else MathScorer(),
                    instruction=CODE_INSTRUCTION if is_code else MATH_INSTRUCTION)
    if spec in ("humaneval", "champ"):
        if config:
            raise TypeError(f"{spec} takes no options besides holdout_fraction, got {sorted(config)}")
        if spec == "humaneval":
            problems, scorer, instruction = humaneval_problems(), CodeTestScorer(), CODE_INSTRUCTION
        else:
            problems, scorer, instruction = champ_problems(), ChoiceScorer(), MATH_INSTRUCTION
        problems = select_split(problems, source=spec, split=split, size=size, seed=seed,
                                holdout_fraction=holdout, eval_only=True)
        return Task(name=spec, problems=problems, scorer=scorer, instruction=instruction)
    if holdout is not None:
        config["holdout_fraction"] = holdout
    return load_reasoning_gym(spec, split, size, seed, **config)
