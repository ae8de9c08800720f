"""Rewards named in recipes, weighted sums of them, learned reward models, and batched scoring.

A recipe declares its reward as ``{name: weight}`` (or ``{name: {"weight": w, **params}}``), e.g.
``{"accuracy": 1.0, "format": 1.0, "language": 0.1}``. :func:`compose_rewards` turns that into a
callable ``(completion, problem) -> {"accuracy": ..., "format": ..., "language": ..., "total": ...}``
where ``total`` is the weighted sum and every other entry is the unweighted component.
"""

from __future__ import annotations

import inspect
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from .accuracy import accuracy_reward
from .coding import code_reward
from .extract import strip_think
from .formatting import format_reward
from .language import language_consistency_reward
from .length import overlong_penalty


RewardFn = Callable[..., float]

# Values the scorer can hand to a reward function that declares a parameter of that name.
_CONTEXT_NAMES = ("task", "length", "prompt")


@runtime_checkable
class RewardModel(Protocol):
    """A learned reward model: scores many (prompt, response) pairs in one call."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class BoundedReward:
    """A learned reward squashed to (0, 1) by a sigmoid of its score (a Bradley-Terry logit).

    Unbounded reward-model scores invite reward hacking: in r1lab's first full pipeline run the policy dropped
    </think> because the reward model liked the resulting "summary" by more than the format reward it lost
    (format rate fell to 0). Bounded, a reward-model term of weight w can never outweigh a rule reward of
    weight > w."""

    def __init__(self, inner: RewardModel):
        self.inner = inner

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [1.0 / (1.0 + math.exp(-s)) for s in self.inner.score(prompts, responses)]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Registered:
    fn: RewardFn
    context: frozenset[str]  # which of _CONTEXT_NAMES the function takes


_REGISTRY: dict[str, _Registered] = {}


def register_reward(name: str, fn: RewardFn | None = None):
    """Register ``fn(completion, problem, **params) -> float`` under ``name`` (usable as a
    decorator). The function may also declare ``task``, ``length`` (response tokens) or ``prompt``
    parameters to receive them from the scorer."""

    def add(f: RewardFn) -> RewardFn:
        params = inspect.signature(f).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        context = frozenset(n for n in _CONTEXT_NAMES if takes_any or n in params)
        _REGISTRY[name] = _Registered(f, context)
        return f

    return add(fn) if fn is not None else add


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``."""
    try:
        return _REGISTRY[name].fn
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {available_rewards()}") from None


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def score_against_gold(completion: str, problem: Any) -> float:
    """The verifier of a problem that comes without a task: its tests run in the sandbox when it has tests,
    else math-verify equivalence of the final answer with its gold."""
    if getattr(problem, "tests", None):
        return code_reward(completion, problem.tests)
    return accuracy_reward(completion, problem.gold)


@register_reward("accuracy")
def _accuracy(completion: str, problem: Any, *, task: Any = None) -> float:
    """The task's own verifier when a task is given (the usual case), else score_against_gold."""
    return task.score(problem, completion) if task is not None else score_against_gold(completion, problem)


@register_reward("format")
def _format(completion: str, problem: Any) -> float:
    return format_reward(completion)


@register_reward("language")
def _language(completion: str, problem: Any, *, language: str | None = None) -> float:
    """Target language: the term's ``language`` parameter, else ``problem.meta["language"]``, else en."""
    meta = getattr(problem, "meta", None) or {}
    return language_consistency_reward(completion, language or meta.get("language", "en"))


@register_reward("code")
def _code(completion: str, problem: Any, *, timeout_s: float = 10.0, memory_mb: int = 512) -> float:
    return code_reward(completion, problem.tests or "", timeout_s=timeout_s, memory_mb=memory_mb)


@register_reward("overlong")
def _overlong(completion: str, problem: Any, *, length: int | None = None, max_len: int,
              cache_len: int) -> float:
    if length is None:
        raise ValueError("the 'overlong' reward needs the response length in tokens (length=...)")
    return overlong_penalty(length, max_len, cache_len)


# --------------------------------------------------------------------------------------------
# Spec and composition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardTerm:
    """One weighted component of a composed reward."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardSpec:
    """The reward a recipe declares: weighted terms, by registry (or reward-model) name."""

    terms: tuple[RewardTerm, ...]

    @classmethod
    def from_dict(cls, spec: Mapping[str, float | Mapping[str, Any]]) -> "RewardSpec":
        """``{"accuracy": 1.0, "overlong": {"weight": 1.0, "max_len": 4096, "cache_len": 512}}``."""
        terms = []
        for name, value in spec.items():
            if isinstance(value, Mapping):
                params = dict(value)
                weight = params.pop("weight", 1.0)
            else:
                weight, params = value, {}
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"reward {name!r}: weight must be a number, got {weight!r}")
            terms.append(RewardTerm(str(name), float(weight), params))
        if not terms:
            raise ValueError("a reward spec needs at least one term")
        return cls(tuple(terms))


@dataclass
class ComposedReward:
    """Weighted sum of rule rewards and (batched) reward models. Build with :func:`compose_rewards`."""

    spec: RewardSpec
    task: Any = None
    reward_models: Mapping[str, RewardModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for term in self.spec.terms:
            if term.name not in self.reward_models and term.name not in _REGISTRY:
                raise ValueError(
                    f"unknown reward {term.name!r}; registered: {available_rewards()}, "
                    f"reward models: {sorted(self.reward_models)}")
            if term.name in self.reward_models:
                unknown = set(term.params) - {"on"}
                if unknown or term.params.get("on", "full") not in ("full", "summary"):
                    raise ValueError(f"reward model {term.name!r} takes only on='full'|'summary', "
                                     f"got {dict(term.params)}")

    def __call__(self, completion: str, problem: Any, *, length: int | None = None,
                 prompt: str | None = None) -> dict[str, float]:
        """Components and ``total`` for one completion."""
        return self.batch([problem], [completion], lengths=[length],
                          prompts=None if prompt is None else [prompt])[0]

    def batch(self, problems: Sequence[Any], completions: Sequence[str], *,
              lengths: Sequence[int | None] | None = None, prompts: Sequence[str] | None = None,
              workers: int = 1) -> list[dict[str, float]]:
        """Components and ``total`` for many completions.

        Rule rewards run in ``workers`` threads (code checks are sandboxed subprocesses and math
        checks go to helper processes, so threads overlap well); each reward model is called once
        with the whole batch.
        """
        n = len(completions)
        if len(problems) != n:
            raise ValueError(f"{len(problems)} problems but {n} completions")
        lengths = list(lengths) if lengths is not None else [None] * n
        if prompts is None:
            prompts = [getattr(p, "question", "") for p in problems]
        if len(lengths) != n or len(prompts) != n:
            raise ValueError("lengths and prompts must have one entry per completion")

        rule_terms = [t for t in self.spec.terms if t.name not in self.reward_models]

        def score_rules(i: int) -> dict[str, float]:
            context = {"task": self.task, "length": lengths[i], "prompt": prompts[i]}
            scores = {}
            for term in rule_terms:
                entry = _REGISTRY[term.name]
                extra = {k: v for k, v in context.items() if k in entry.context}
                scores[term.name] = float(entry.fn(completions[i], problems[i], **term.params, **extra))
            return scores

        if workers > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1lab-reward") as ex:
                results = list(ex.map(score_rules, range(n)))
        else:
            results = [score_rules(i) for i in range(n)]

        for term in self.spec.terms:
            model = self.reward_models.get(term.name)
            if model is None:
                continue
            on_summary = term.params.get("on", "full") == "summary"
            responses = [strip_think(c) if on_summary else c for c in completions]
            scores = list(model.score(list(prompts), responses))
            if len(scores) != n:
                raise ValueError(f"reward model {term.name!r} returned {len(scores)} scores for {n} responses")
            for result, score in zip(results, scores):
                result[term.name] = float(score)

        for result in results:
            result["total"] = sum(t.weight * result[t.name] for t in self.spec.terms)
        return results


def compose_rewards(spec: RewardSpec | Mapping[str, Any], *, task: Any = None,
                    reward_models: Mapping[str, RewardModel] | RewardModel | None = None) -> ComposedReward:
    """Build the weighted reward a recipe declares.

    Args:
        spec: a :class:`RewardSpec` or its dict form, e.g. ``{"accuracy": 1.0, "format": 1.0}``.
        task: when given, ``accuracy`` uses the task's own verifier (``task.score``).
        reward_models: learned reward models by spec name; a single model is named
            ``"reward_model"``. Their terms take ``on="full"`` (default: the whole response) or
            ``on="summary"`` (only the text after ``</think>``, as R1 judged helpfulness).
    """
    if not isinstance(spec, RewardSpec):
        spec = RewardSpec.from_dict(spec)
    if reward_models is None:
        models: dict[str, RewardModel] = {}
    elif isinstance(reward_models, Mapping):
        models = dict(reward_models)
    else:
        models = {"reward_model": reward_models}
    return ComposedReward(spec, task, models)


def score_batch(task: Any, problems: Sequence[Any], completions: Sequence[str],
                reward_spec: RewardSpec | Mapping[str, Any] | ComposedReward, workers: int = 4, *,
                lengths: Sequence[int | None] | None = None, prompts: Sequence[str] | None = None,
                reward_models: Mapping[str, RewardModel] | RewardModel | None = None,
                ) -> list[dict[str, float]]:
    """Score ``completions[i]`` of ``problems[i]`` with the declared reward, ``workers`` at a time.

    Returns one ``{component: value, ..., "total": weighted sum}`` dict per completion.
    """
    composed = reward_spec if isinstance(reward_spec, ComposedReward) else compose_rewards(
        reward_spec, task=task, reward_models=reward_models)
    return composed.batch(problems, completions, lengths=lengths, prompts=prompts, workers=workers)
