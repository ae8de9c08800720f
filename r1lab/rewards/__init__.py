"""Rewards: plain functions of text (and a gold answer or tests) that return floats.

They never raise because of model output. A gold answer that cannot be parsed raises ValueError:
it must never let a completion score 1.0.

* :func:`accuracy_reward` -- math-verify equivalence of the final answer with the gold
* :func:`format_reward` -- exactly ``<think>...</think><answer>...</answer>``
* :func:`language_consistency_reward` / :func:`is_mixed_language` -- R1's language reward
* :func:`code_reward` -- program + tests run clean in the sandbox
* :func:`overlong_penalty` -- DAPO's soft overlong punishment
* :func:`compose_rewards` / :func:`score_batch` -- weighted sums named in recipes, batched
"""

from .accuracy import accuracy_reward, math_equal, validate_gold
from .coding import code_reward, program_from_completion
from .compose import (
    BoundedReward,
    ComposedReward,
    RewardModel,
    RewardSpec,
    RewardTerm,
    available_rewards,
    compose_rewards,
    get_reward,
    register_reward,
    score_batch,
)
from .extract import extract_answer, extract_boxed, extract_code, extract_think, strip_think
from .formatting import format_reward
from .language import (
    LANGUAGE_SCRIPTS,
    count_words_by_script,
    is_mixed_language,
    language_consistency_reward,
)
from .length import overlong_penalty

__all__ = [
    "LANGUAGE_SCRIPTS",
    "BoundedReward",
    "ComposedReward",
    "RewardModel",
    "RewardSpec",
    "RewardTerm",
    "accuracy_reward",
    "available_rewards",
    "code_reward",
    "compose_rewards",
    "count_words_by_script",
    "extract_answer",
    "extract_boxed",
    "extract_code",
    "extract_think",
    "format_reward",
    "get_reward",
    "is_mixed_language",
    "language_consistency_reward",
    "math_equal",
    "overlong_penalty",
    "program_from_completion",
    "register_reward",
    "score_batch",
    "strip_think",
    "validate_gold",
]
