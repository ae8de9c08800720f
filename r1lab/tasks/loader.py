"""``load_task``: one entry point for every task source a recipe can name.

A new task is one registered function (see docs/architecture.md):

    @register_task("my_task")
    def my_task(split: str, size: int | None, seed: int, **options) -> Task: ...
"""

from __future__ import annotations

from typing import Any, Callable

from .base import ChoiceScorer, CodeTestScorer, MathScorer, Task, TaskDataError, select_split
from .champ import champ_problems
from .files import read_jsonl_problems, read_parquet_problems
from .humaneval import HUMANEVAL_PROMPTS, humaneval_problems
from .procedural import load_reasoning_gym
from .templates import CODE_INSTRUCTION, MATH_INSTRUCTION

__all__ = ["available_tasks", "load_task", "register_task"]

TaskSource = Callable[..., Task]
_TASKS: dict[str, TaskSource] = {}


def register_task(name: str):
    """Register ``fn(split, size, seed, **options) -> Task`` under ``name`` (a decorator); `load_task(name)`
    then calls it. Registered names take precedence over reasoning-gym's."""
    def add(fn: TaskSource) -> TaskSource:
        _TASKS[name] = fn
        return fn
    return add


def available_tasks() -> list[str]:
    """The registered task names (reasoning-gym's datasets and files are available besides these)."""
    return sorted(_TASKS)


def _evaluation_set(spec: str, problems, scorer, instruction: str, template: str, split: str, size: int | None,
                    seed: int, holdout: float | None, config: dict, response_prefix: str = "") -> Task:
    if config:
        raise TaskDataError(f"{spec} takes no options besides holdout_fraction, got {sorted(config)}")
    problems = select_split(problems, source=spec, split=split, size=size, seed=seed, holdout_fraction=holdout,
                            eval_only=True)
    return Task(name=spec, problems=problems, scorer=scorer, instruction=instruction, template=template,
                response_prefix=response_prefix)


@register_task("humaneval")
def _humaneval(split: str, size: int | None, seed: int, holdout_fraction: float | None = None,
               prompt: str = "evalplus", **config) -> Task:
    """A chat turn (instruct models), scored by running the tests in the sandbox; prompt: a HUMANEVAL_PROMPTS
    style (evalplus, the published protocol, or r1)."""
    if prompt not in HUMANEVAL_PROMPTS:
        raise TaskDataError(f"humaneval: prompt must be one of {sorted(HUMANEVAL_PROMPTS)}, got {prompt!r}")
    _, instruction, response_prefix = HUMANEVAL_PROMPTS[prompt]
    return _evaluation_set("humaneval", humaneval_problems(prompt), CodeTestScorer(), instruction, "chat", split,
                           size, seed, holdout_fraction, config, response_prefix)


@register_task("champ")
def _champ(split: str, size: int | None, seed: int, holdout_fraction: float | None = None, **config) -> Task:
    return _evaluation_set("champ", champ_problems(), ChoiceScorer(), MATH_INSTRUCTION, "r1_zero", split, size,
                           seed, holdout_fraction, config)


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
        ``"humaneval"``, ``"champ"`` and any other registered name (`register_task`): evaluation sets;
            only "test" unless ``holdout_fraction`` carves a disjoint train part.

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
    if spec in _TASKS:
        return _TASKS[spec](split, size, seed, holdout_fraction=holdout, **config)
    if holdout is not None:
        config["holdout_fraction"] = holdout
    return load_reasoning_gym(spec, split, size, seed, **config)
