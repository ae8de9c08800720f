"""Procedurally generated tasks from reasoning-gym, with disjoint train / held-out splits."""

from __future__ import annotations

import difflib
import hashlib
from typing import Any

from ..rewards.extract import extract_answer
from .base import Problem, Task, TaskDataError, holdout_bucket
from .templates import MATH_INSTRUCTION

__all__ = ["ReasoningGymScorer", "load_reasoning_gym", "reasoning_gym_names"]

DEFAULT_HOLDOUT_FRACTION = 0.5


def reasoning_gym_names() -> list[str]:
    """Names of all reasoning-gym datasets."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymScorer:
    """The dataset's own ``score_answer(answer, entry)`` on the extracted final answer.

    reasoning-gym may give partial credit (e.g. countdown: 0.01 for a well-formed wrong
    expression; the default scorer: len(gold)/len(answer) when the answer contains the gold), so
    scores are in [0, 1] and not always 0 or 1. A completion without an answer scores 0.0.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, problem: Problem, completion: str) -> float:
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        try:
            score = float(self.dataset.score_answer(answer, entry=problem.meta["entry"]))
        except Exception:  # noqa: BLE001 - a scorer choking on model output is a wrong answer
            return 0.0
        return min(1.0, max(0.0, score)) if score == score else 0.0  # NaN -> 0


def _split_seed(name: str, seed: int, split: str) -> int:
    """Far-apart generator seeds per split. reasoning-gym seeds item i with seed + i, so nearby
    seeds would mostly replay each other's items."""
    digest = hashlib.sha256(f"r1lab:{name}:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def load_reasoning_gym(name: str, split: str, size: int, seed: int, *,
                       holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                       **dataset_kwargs: Any) -> Task:
    """``size`` problems of reasoning-gym dataset ``name`` for ``split`` ("train" or "test").

    Items are drawn from a generator seeded per (name, seed, split) and kept only when the hash
    of their question falls on this split's side (:func:`holdout_bucket`), so no question can
    ever be in both splits, whatever the seeds and sizes. ``dataset_kwargs`` go to the dataset's
    config (e.g. ``min_terms=2, max_terms=4`` for chain_sum).
    """
    import reasoning_gym

    names = reasoning_gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise TaskDataError(f"unknown task {name!r}: not a reasoning-gym dataset, 'jsonl:PATH', "
                            f"'parquet:PATH', 'humaneval' or 'champ'{hint}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size is None or size < 1:
        raise TaskDataError(f"procedural task {name!r} needs size >= 1, got {size}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    for reserved in ("size", "seed"):
        if reserved in dataset_kwargs:
            raise ValueError(f"pass {reserved} as load_task's argument, not as a dataset option")

    generator_seed = _split_seed(name, seed, split)

    def make(capacity: int) -> Any:
        try:
            return reasoning_gym.create_dataset(name, size=capacity, seed=generator_seed,
                                                **dataset_kwargs)
        except TypeError as exc:
            raise ValueError(f"bad option for reasoning-gym dataset {name!r}: {exc}") from exc

    capacity = max(64, 4 * size)
    max_draws = 50 * size + 1000
    dataset = make(capacity)
    problems: list[Problem] = []
    index = 0
    while len(problems) < size:
        if index >= capacity:
            if index >= max_draws:
                raise ValueError(
                    f"{name}: found only {len(problems)} {split} problems in {index} draws; the "
                    f"dataset's question space is too small for size={size} with these options")
            capacity *= 2  # items depend only on (seed, index), so a bigger dataset extends this one
            dataset = make(capacity)
        entry = dataset[index]
        index += 1
        if holdout_bucket(entry["question"], holdout_fraction) != split:
            continue
        problems.append(Problem(question=entry["question"], gold=str(entry["answer"]),
                                meta={"source": name, "index": index - 1, "entry": entry}))
    return Task(name=name, problems=problems, scorer=ReasoningGymScorer(dataset),
                instruction=MATH_INSTRUCTION)
