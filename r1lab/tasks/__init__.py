"""Tasks: prompts + gold answers (or tests) + a verifier.

>>> task = load_task("chain_sum", split="train", size=100, seed=0)
>>> prompt = render_prompt("r1_zero", task[0].question)
>>> task.score(task[0], "<think>...</think> <answer>7</answer>")
"""

from .base import (
    ChoiceScorer,
    CodeTestScorer,
    MathScorer,
    Problem,
    Prompt,
    Scorer,
    Task,
    TaskDataError,
    as_task,
    holdout_bucket,
    select_split,
)
from .champ import champ_problems
from .files import gold_from_text, read_jsonl_problems, read_parquet_problems
from .humaneval import humaneval_problems
from .loader import available_tasks, load_task, register_task
from .procedural import ReasoningGymScorer, load_reasoning_gym, reasoning_gym_names
from .templates import (
    CODE_INSTRUCTION,
    MATH_INSTRUCTION,
    R1_ZERO_TEMPLATE,
    chat_prompt,
    forced_think_prefix,
    r1_zero_prompt,
    render_prompt,
)

__all__ = [
    "CODE_INSTRUCTION",
    "MATH_INSTRUCTION",
    "R1_ZERO_TEMPLATE",
    "ChoiceScorer",
    "CodeTestScorer",
    "MathScorer",
    "Problem",
    "Prompt",
    "ReasoningGymScorer",
    "Scorer",
    "Task",
    "TaskDataError",
    "as_task",
    "available_tasks",
    "champ_problems",
    "chat_prompt",
    "forced_think_prefix",
    "gold_from_text",
    "holdout_bucket",
    "humaneval_problems",
    "load_reasoning_gym",
    "load_task",
    "r1_zero_prompt",
    "read_jsonl_problems",
    "read_parquet_problems",
    "register_task",
    "reasoning_gym_names",
    "render_prompt",
    "select_split",
]
