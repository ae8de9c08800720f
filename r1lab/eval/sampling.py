"""Sample k completions of every problem of a task and score them: the one loop under evaluation
(`eval.runner.evaluate`) and rejection sampling (`pipeline.rejection.rejection_sample`).

Prompt i is sampled with seed + i (the engine keys its noise by the request seed, the sample index and
the position), so the samples do not depend on the batch size or on how many processes share the
problems: under torchrun each rank samples its contiguous share on its own unsharded model and the
results are gathered in problem order, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from r1lab import distributed as D
from r1lab.tasks import Problem, Prompt, Task

Scorer = Callable[[Problem, str], float]


@dataclass
class SampledProblem:
    """The k samples of one problem."""

    index: int
    """Position of the problem in the task."""
    problem: Problem
    prompt: Prompt
    texts: list[str]
    """Completion texts (Task.completion_text), one per sample, in sample order."""
    token_counts: list[int]
    """Generated tokens per sample (the stop token included)."""
    finish_reasons: list[str]
    """"stop" or "length" per sample."""
    scores: list[float]
    """The scorer's value per sample."""
    tool_calls: list[int] | None = None
    """Tool calls per sample, when sampled with a tool."""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """What ends a sampled completion: the tokenizer's stop tokens and the model config's EOS ids."""
    return sorted(set(tokenizer.stop_ids) | set(model.args.stop_token_ids))


def sample_and_score(model: Any, tokenizer: Any, task: Task, *, k: int, max_new_tokens: int,
                     temperature: float = 0.6, top_p: float = 0.95, top_k: int | None = None, seed: int = 0,
                     template: str | None = None, force_think: bool = False, scorer: Scorer | None = None,
                     stop_strings: Sequence[str] = (), tool: Any = None,
                     batch: int | None = None, dist: D.DistInfo | None = None, prompts: Sequence[Prompt] | None = None,
                     on_progress: Callable[[int], None] | None = None) -> list[SampledProblem]:
    """Every problem of `task` sampled k times and scored; returns one SampledProblem per problem, in order.

    template: None → the task's own. scorer: None → task.score. stop_strings: text that ends a sample (e.g.
    "</answer>"), which the completion text is cut after. tool: an r1lab.tools.PythonTool the model may call
    while it reasons (samples are scored without its outputs). batch: problems per generate() call (None:
    enough for ~512 samples on CUDA, ~64 on CPU; the engine batches continuously inside a call, so this only
    paces on_progress(n_done)). dist: under torchrun every rank must call this; each samples its share.
    prompts: the task's prompts if the caller rendered them already (task.prompt of every problem).
    """
    from r1lab.rollout import SamplingParams, generate

    scorer = scorer or task.score
    info = dist or D.single_process()
    lo, hi = D.share_bounds(len(task.problems), info)  # all of them in one process
    if prompts is None:
        prompts = {i: task.prompt(task.problems[i], tokenizer, template, force_think=force_think) for i in range(lo, hi)}
    stop = stop_token_ids(model, tokenizer)
    hook = tool.hook(tokenizer) if tool is not None else None
    cuda = next(model.parameters()).is_cuda
    batch = batch or max(1, (512 if cuda else 64) // k)
    out: list[SampledProblem] = []
    was_training = model.training
    model.eval()
    try:
        for first in range(lo, hi, batch):
            last = min(first + batch, hi)
            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                    stop_token_ids=stop, n=k, seed=seed + first, stop_strings=tuple(stop_strings),
                                    detokenize=tokenizer.decode, tool=hook)
            completions = generate(model, [prompts[i].ids for i in range(first, last)], params)
            for offset in range(last - first):
                index = first + offset
                samples = completions[offset * k:(offset + 1) * k]
                prompt, problem = prompts[index], task.problems[index]
                texts = [task.completion_text(tokenizer, c.token_ids, prompt.completion_prefix, stop_strings)
                         for c in samples]
                scored = texts if tool is None else [tool.without_outputs(text) for text in texts]
                out.append(SampledProblem(index, problem, prompt, texts, [len(c.token_ids) for c in samples],
                                          [c.finish_reason for c in samples],
                                          [_score(scorer, problem, index, text) for text in scored],
                                          None if tool is None else [c.tool_calls for c in samples]))
            if on_progress is not None:
                on_progress(last - first)
    finally:
        model.train(was_training)
    # every rank's problems, in order (shares are contiguous and in rank order)
    return [item for share in D.all_gather_objects(out, info) for item in share]


def _score(scorer: Scorer, problem: Problem, index: int, text: str) -> float:
    try:
        return float(scorer(problem, text))
    except ValueError as error:  # a malformed gold: name the problem instead of failing deep inside
        raise ValueError(f"problem {index} ({problem.question[:60]!r}): {error}") from error


def sampled_tokens(items: Sequence[SampledProblem]) -> int:
    return sum(sum(item.token_counts) for item in items)
