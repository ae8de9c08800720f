"""Problems, tasks and the verifiers that score a completion against a problem."""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from ..errors import InputError
from ..rewards.accuracy import accuracy_reward
from ..rewards.coding import code_reward, program_from_completion
from ..rewards.compose import score_against_gold
from ..rewards.extract import extract_answer
from .templates import MATH_INSTRUCTION, forced_think_prefix, render_prompt



class TaskDataError(InputError):
    """Malformed task data; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Problem:
    """One prompt with what is needed to check an answer to it.

    ``gold`` is the reference answer (math tasks) or, for code tasks, the test program; ``tests``
    is the test program of code tasks (None otherwise); ``meta`` holds source-specific extras
    (ids, the reasoning-gym entry, the HumanEval prompt ...).
    """

    question: str
    gold: str
    tests: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class Scorer(Protocol):
    """A task's verifier: accuracy of one completion, in [0, 1]; never raises on model output."""

    def __call__(self, problem: Problem, completion: str) -> float: ...


@dataclass(frozen=True)
class Prompt:
    """A problem's prompt as the model sees it."""

    text: str
    """The rendered prompt text (template applied)."""
    ids: list[int]
    """Its token ids, BOS included where the tokenizer adds one (Tokenizer.encode_prompt)."""
    completion_prefix: str = ""
    """Text the prompt ends with that belongs to the answer (an opened "<think>" with force_think): scored
    as part of the completion."""


@dataclass
class Task:
    """A named list of problems that renders their prompts, decodes and scores completions of them.

    The one place for each of these concerns: every trainer, evaluation, rejection sampling and
    distillation renders a prompt with `prompt`, turns sampled tokens into text with `completion_text`
    and scores the text with `score`.

    ``instruction`` is the answer-format request appended to the question by chat-style prompts
    (math: "put your final answer within \\boxed{}"; code: "write it in a python block"; "" asks for
    nothing); ``template`` is the prompt template the task is posed with unless a recipe names another;
    ``response_prefix`` is text the answer is started with (a published protocol's opening of the reply,
    e.g. EvalPlus's "Below is a Python script ...```python"): part of the prompt, scored as part of the
    completion.
    """

    name: str
    problems: list[Problem]
    scorer: Scorer
    instruction: str | None = None
    template: str = "r1_zero"
    response_prefix: str = ""

    def default_template(self, tokenizer: Any) -> str:
        """The template the task is posed with for this tokenizer: its own, except that a model with a chat
        template of its own (an instruct checkpoint) is asked R1-Zero-template questions as chat turns."""
        if self.template == "r1_zero" and getattr(tokenizer, "has_own_chat_template", False):
            return "chat"
        return self.template

    def prompt(self, problem: Problem, tokenizer: Any, template: str | None = None, *,
               force_think: bool = False) -> Prompt:
        """The prompt of ``problem`` under ``template`` (None: default_template), encoded by ``tokenizer``."""
        template = template or self.default_template(tokenizer)
        text = render_prompt(template, problem.question, apply_chat_template=tokenizer.apply_chat_template,
                             instruction=self.instruction if self.instruction is not None else MATH_INSTRUCTION,
                             force_think=force_think) + self.response_prefix
        prefix = (forced_think_prefix(template).lstrip() if force_think else "") + self.response_prefix
        return Prompt(text, tokenizer.encode_prompt(text, chat=template == "chat"), prefix)

    @staticmethod
    def completion_text(tokenizer: Any, token_ids: Sequence[int], prefix: str = "",
                        stop_strings: Sequence[str] = ()) -> str:
        """The text a completion is scored and trained as: its tokens without the stop token that ended it,
        special tokens dropped, after the prompt's completion prefix, and cut right after the first stop
        string it generated (the token that completed it may carry a few more characters)."""
        ids = list(token_ids)
        if ids and ids[-1] in tokenizer.stop_ids:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
        return prefix + (text[:min(ends)] if ends else text)

    def score(self, problem: Problem, completion: str) -> float:
        """Accuracy of ``completion`` for ``problem`` (see the task's scorer); a malformed gold raises
        ValueError, model output never does."""
        return float(self.scorer(problem, completion))

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


def as_task(problems: "Task | Sequence[Problem | dict]", name: str = "problems") -> Task:
    """A Task as given, or one over bare problems (Problem objects or {question, gold} dicts), scored by
    math-verify against gold, or by running their tests for problems that have tests."""
    if isinstance(problems, Task):
        return problems
    items = [p if isinstance(p, Problem) else Problem(p["question"], str(p.get("gold", p.get("answer"))))
             for p in problems]
    return Task(name=name, problems=items, scorer=GoldScorer())


# --------------------------------------------------------------------------------------------
# Scorers (small classes rather than closures, so tasks pickle)
# --------------------------------------------------------------------------------------------


class MathScorer:
    """math-verify equivalence of the extracted answer with ``problem.gold``."""

    def __call__(self, problem: Problem, completion: str) -> float:
        return accuracy_reward(completion, problem.gold)


_WORD_EDGES = re.compile(r"^[\W_]+|[\W_]+$")
_LATEX_TEXT = re.compile(r"\\text\{(.*?)\}")


def _normalize_word(text: str) -> str:
    """"\\text{Yes}." -> "yes": LaTeX text wrapper, edge punctuation and case removed."""
    return _WORD_EDGES.sub("", _LATEX_TEXT.sub(r"\1", text)).lower()


class ChoiceScorer:
    """Exact match of a word answer (``Yes``/``No``, a choice letter), case and punctuation
    insensitive; problems with ``meta["answer_type"] != "choice"`` go to the fallback scorer."""

    def __init__(self, fallback: Scorer | None = None) -> None:
        self.fallback = fallback or MathScorer()

    def __call__(self, problem: Problem, completion: str) -> float:
        if problem.meta.get("answer_type") != "choice":
            return self.fallback(problem, completion)
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        return 1.0 if _normalize_word(answer) == _normalize_word(problem.gold) else 0.0


class GoldScorer:
    """The verifier of bare problems (rewards.score_against_gold): tests when they have them, else gold."""

    def __call__(self, problem: Problem, completion: str) -> float:
        return score_against_gold(completion, problem)


class CodeTestScorer:
    """Runs the completion's program (last ```python block) plus ``problem.tests`` in the sandbox.

    ``meta["code_prefix"]`` (e.g. HumanEval's prompt: imports and the function stub) is put
    before the program so that a completion may define the function without repeating imports;
    a program that does not define ``meta["entry_point"]`` is taken as the body that continues
    the prefix, the way HumanEval completions are written.
    """

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def __call__(self, problem: Problem, completion: str) -> float:
        program = program_from_completion(completion)
        if not program or not program.strip() or not problem.tests:
            return 0.0
        prefix = problem.meta.get("code_prefix", "")
        entry_point = problem.meta.get("entry_point")
        if prefix:
            defines_entry = entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(",
                                                      program, re.MULTILINE)
            program = f"{prefix}\n\n{program}" if defines_entry or not entry_point else prefix + program
        return code_reward(program, problem.tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def holdout_bucket(key: str, holdout_fraction: float) -> str:
    """"test" or "train" for ``key``, by a stable hash: the same key is always on the same side,
    so splits made this way can never share an item."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < holdout_fraction else "train"


def select_split(problems: Sequence[Problem], *, source: str, split: str, size: int | None,
                 seed: int, holdout_fraction: float | None, eval_only: bool) -> list[Problem]:
    """The problems of ``split`` from a fixed (non-procedural) source.

    With ``holdout_fraction`` the source is cut in two by :func:`holdout_bucket` of the question.
    Without it the whole source is the split -- except for evaluation sets (``eval_only``), whose
    "train" split would silently train on the benchmark and is refused. ``size`` keeps a seeded
    random subset (in source order); ``None`` keeps everything.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if holdout_fraction is not None:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        problems = [p for p in problems if holdout_bucket(p.question, holdout_fraction) == split]
    elif eval_only and split == "train":
        raise ValueError(
            f"{source} is an evaluation set and has no train split; pass holdout_fraction=... "
            f"to carve disjoint train/test splits out of it")
    problems = list(problems)
    if size is None or size >= len(problems):
        if size is not None and size > len(problems):
            warnings.warn(f"{source} ({split}) has {len(problems)} problems, fewer than size={size}",
                          stacklevel=3)
        return problems
    if size < 1:
        raise ValueError(f"size must be >= 1 (or None for all), got {size}")
    keep = sorted(random.Random(seed).sample(range(len(problems)), size))
    return [problems[i] for i in keep]
