"""Procedural pretraining corpus for r1lab's tiny base model (its analog of DeepSeek-V3-Base).

R1-Zero only works when the base model already, now and then, produces a correct, well-formatted
answer: GRPO can only reinforce what it samples. This module writes a seeded, bilingual corpus of
chain-sum arithmetic (the reasoning-gym `chain_sum` task, question strings byte-identical to
reasoning-gym's) in which good and bad habits are mixed on purpose:

* careful documents: a step-by-step `<think>` writing out every partial sum, always correct. Some split
  two-digit operands into tens and ones (longer and easier), some end with a check step, a few contain
  one slip that is caught with "Wait, ..." (an "aha"-style self-correction);
* careful documents whose reasoning switches into Chinese part-way, or is Chinese throughout (the
  language-mixing R1 reports, for the language-consistency reward of the four-stage pipeline);
* lazy documents: an empty or one-phrase `<think>` and an immediate guess that is right only sometimes
  (the habit RL should remove; removing it makes responses longer, the analog of R1-Zero's Fig. 3);
* documents with a broken format (missing or repeated tags, answer outside the tags), so the format
  reward has signal;
* a small share of plain prose about arithmetic facts in English and Chinese, which makes this a base
  corpus rather than an SFT set.

Every templated document is `R1_ZERO_TEMPLATE.format(question=q) + " " + completion + "<|endoftext|>"`.
`generate_cold_start` writes the separate clean, English-only long-CoT set used for the cold-start SFT.

Overlap with evaluation: r1lab evaluates on questions made by reasoning-gym's own generator
(`random.Random(seed + idx)` per item). This module draws numbers from its own stream
(`random.Random("r1lab.corpus:<seed>")`), so the two never share a random sequence; identical questions
still occur by chance for small problems (there are only 200 two-term one-digit questions) and can be
skipped with `exclude=`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from r1lab.tasks.templates import R1_ZERO_TEMPLATE, r1_zero_prompt
from r1lab.tokenizer import EOS_TOKEN

# One template for the corpus and the RL prompts: the base must see exactly what RL will show it.
_TEMPLATE_HEAD = R1_ZERO_TEMPLATE.split("{question}")[0]
_TEMPLATE_TAIL = R1_ZERO_TEMPLATE.split("{question}")[1]

CHAIN_SUM_PREFIX = "State the final answer to the following arithmetic problem: "
# reasoning-gym writes operands with str(int) (negative operands as "-8", e.g. "90 + -8 - 77") and
# joins terms and operators with single spaces; gold answers are str(int), e.g. "-4".
CHAIN_SUM_QUESTION_RE = re.compile(
    r"^State the final answer to the following arithmetic problem: (-?\d+(?: [+-] -?\d+)*) =$"
)

# A chain of +/- terms, or several such chains joined by " = ". Used to find and check every equation
# a document writes (Chinese 加/减/等于 are mapped to symbols first).
_CHAIN = r"-?\d+(?: [+-] -?\d+)*"
_EQUATION_RE = re.compile(rf"(?<![\d-]){_CHAIN}(?: = {_CHAIN})+")
_CJK_RE = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_ZH_TO_SYMBOLS = ((" 加 ", " + "), (" 减 ", " - "), (" 等于 ", " = "))


# ------------------------------------------------------------------------------------ problems
@dataclass(frozen=True)
class ChainProblem:
    """One chain-sum problem: terms[0] ops[0] terms[1] ops[1] ... (ops are "+" or "-")."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.terms) < 1 or len(self.ops) != len(self.terms) - 1 or set(self.ops) - {"+", "-"}:
            raise ValueError(f"malformed chain problem: terms={self.terms} ops={self.ops}")

    @property
    def expression(self) -> str:
        """The expression exactly as reasoning-gym writes it, e.g. '12 + 7 - 3' or '90 + -8'."""
        parts = [str(self.terms[0])]
        for op, term in zip(self.ops, self.terms[1:]):
            parts += [op, str(term)]
        return " ".join(parts)

    @property
    def question(self) -> str:
        return f"{CHAIN_SUM_PREFIX}{self.expression} ="

    @property
    def partial_sums(self) -> list[int]:
        """Running value after each term: [terms[0], terms[0] op terms[1], ...]."""
        sums = [self.terms[0]]
        for op, term in zip(self.ops, self.terms[1:]):
            sums.append(sums[-1] + term if op == "+" else sums[-1] - term)
        return sums

    @property
    def answer(self) -> int:
        return self.partial_sums[-1]

    @classmethod
    def from_question(cls, question: str) -> ChainProblem:
        """Parse a reasoning-gym chain_sum question; ValueError if it is not one."""
        match = CHAIN_SUM_QUESTION_RE.match(question)
        if not match:
            raise ValueError(f"not a chain_sum question: {question!r}")
        tokens = match.group(1).split(" ")
        return cls(terms=tuple(int(t) for t in tokens[0::2]), ops=tuple(tokens[1::2]))


def sample_problem(
    rng: random.Random,
    min_terms: int,
    max_terms: int,
    min_digits: int,
    max_digits: int,
    allow_negation: bool = False,
) -> ChainProblem:
    """Draw a problem from the same distribution reasoning-gym's chain_sum uses: a uniform number of
    terms, one digit count per problem (1 digit means 0-9), uniform operands, uniform +/-; with
    `allow_negation` operands are uniform in [-max, max]."""
    num_terms = rng.randint(min_terms, max_terms)
    num_digits = rng.randint(min_digits, max_digits)
    high = 10**num_digits - 1
    low = -high if allow_negation else (0 if num_digits == 1 else 10 ** (num_digits - 1))
    terms = tuple(rng.randint(low, high) for _ in range(num_terms))
    ops = tuple(rng.choice("+-") for _ in range(num_terms - 1))
    return ChainProblem(terms, ops)


def make_document(prompt: str, completion: str) -> str:
    """A templated corpus document: prompt, one space, completion, end-of-text."""
    return f"{prompt} {completion}{EOS_TOKEN}"


# ------------------------------------------------------------------------------------ config
@dataclass
class CorpusConfig:
    """Mixture knobs of the pretraining corpus.

    Why the defaults give a base pass@1 of roughly 10-25% on chain_sum (3-4 terms, 1-2 digits) under
    the R1-Zero template: 90% of documents use the template, so a model imitating the corpus answers
    carefully in p_careful / 0.9 ≈ 28% of samples at T=1.0, and in ≈ 20% at T=0.6 (estimated by
    sharpening the corpus's distribution of first words after "<think>", where lazy styles dominate). A careful answer is right when every step is;
    a tiny model doing 2-3 one- or two-digit steps at ~85-90% each lands ~65-75%, i.e. ~15-20 points.
    Lazy answers (61%) must compute the whole chain in one shot and are only right lazy_correct_prob of
    the time in the data, so they add a few points at most; broken-format answers add ~nothing. After
    RL has made careful reasoning the only habit, pass@1 approaches the model's careful accuracy,
    well over twice the base.
    """

    min_terms: int = 2
    """Fewest terms in a problem (>= 2, so every careful answer has at least one step)."""
    max_terms: int = 4
    """Most terms. 4 matches the default RL task (3-4 terms) and keeps the longest document (4 terms of
    two digits, tens/ones split) near 230 tokens, inside a 256-token context."""
    min_digits: int = 1
    """Fewest digits per operand (reasoning-gym: 1 digit means 0-9)."""
    max_digits: int = 2
    """Most digits per operand; one digit count is drawn per problem, as in reasoning-gym."""
    allow_negation: bool = False
    """Negative operands, as reasoning-gym's allow_negation (questions then read like '5 + -3')."""

    p_careful: float = 0.25
    """Share of documents with careful step-by-step reasoning (always correct), all languages."""
    p_lazy: float = 0.55
    """Share with an empty or one-phrase <think> and an immediate guess (right lazy_correct_prob)."""
    p_bad_format: float = 0.10
    """Share with a broken format: missing/repeated tags, answer outside the tags, no <think>."""
    p_plain: float = 0.10
    """Share of plain prose about arithmetic facts (no template), English and Chinese."""

    p_chinese_mix: float = 0.10
    """Share of careful documents whose reasoning switches into Chinese after at least one step."""
    p_chinese_full: float = 0.05
    """Share of careful documents reasoning in Chinese throughout."""
    p_detailed: float = 0.25
    """Share of English careful documents that split two-digit operands into tens and ones."""
    p_check: float = 0.10
    """Share of English careful documents ending with a check step ('Check: 16 + 3 - 7 = 12.')."""
    p_self_correct: float = 0.05
    """Share of English careful documents with one wrong step immediately caught by 'Wait, ...'."""
    lazy_correct_prob: float = 0.2
    """Chance a lazy (or broken-format lazy) answer is correct; otherwise it is a plausible mistake."""
    p_plain_chinese: float = 0.4
    """Share of plain documents written in Chinese."""

    def validate(self) -> None:
        """Raise ValueError naming the field when the knobs are inconsistent."""
        if self.min_terms < 2 or self.max_terms < self.min_terms:
            raise ValueError(
                f"CorpusConfig: need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}"
            )
        if self.min_digits < 1 or self.max_digits < self.min_digits:
            raise ValueError(
                f"CorpusConfig: need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name.startswith("p_") or f.name.endswith("_prob")) and not 0.0 <= value <= 1.0:
                raise ValueError(f"CorpusConfig.{f.name} must lie in [0, 1], got {value}")
        total = self.p_careful + self.p_lazy + self.p_bad_format + self.p_plain
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"CorpusConfig: p_careful + p_lazy + p_bad_format + p_plain must be 1, got {total}"
            )
        if self.p_chinese_mix + self.p_chinese_full > 1.0 + 1e-9:
            raise ValueError("CorpusConfig: p_chinese_mix + p_chinese_full must not exceed 1")


# ---------------------------------------------------------------------------- reasoning writers
def _step_sentence(x: int, op: str, y: int, z: int) -> str:
    return f"{x} {op} {y} = {z}."


def _detailed_step(x: int, op: str, y: int, z: int) -> str:
    """'19 + 27 = 19 + 20 + 7 = 39 + 7 = 46.' Adding tens then ones is easier for a small model than a
    two-digit sum in one go; single-digit and round operands are written as a plain step."""
    delta = y if op == "+" else -y
    sign = "+" if delta >= 0 else "-"
    tens, ones = divmod(abs(delta), 10)
    if tens == 0 or ones == 0:
        return _step_sentence(x, op, y, z)
    middle = x + (tens * 10 if delta >= 0 else -tens * 10)
    return f"{x} {op} {y} = {x} {sign} {tens * 10} {sign} {ones} = {middle} {sign} {ones} = {z}."


def _steps(problem: ChainProblem) -> list[tuple[int, str, int, int]]:
    sums = problem.partial_sums
    return [(sums[i], op, problem.terms[i + 1], sums[i + 1]) for i, op in enumerate(problem.ops)]


def _check_sentence(problem: ChainProblem) -> str:
    """Undo the operations from the last to the first and land on the first term."""
    parts = [str(problem.answer)]
    for op, term in zip(reversed(problem.ops), reversed(problem.terms[1:])):
        parts += ["-" if op == "+" else "+", str(term)]
    return f"Check: {' '.join(parts)} = {problem.terms[0]}. Correct."


_EN_OPENINGS = (
    "", "Let me add step by step.", "Work from left to right.", "Start with {first}.", "One step at a time."
)
_EN_CLOSINGS = ("", "So the answer is {answer}.", "The result is {answer}.", "Final result: {answer}.")
_ZH_OPENINGS = ("我们一步一步算。", "从左到右计算。", "逐步计算。")
_ZH_CLOSINGS = ("所以答案是 {answer}。", "答案是 {answer}。")


def _slip(rng: random.Random, z: int) -> int:
    """A believable wrong partial sum: off by one, or a dropped/extra carry of ten."""
    return z + rng.choice((-10, -1, 1, 10))


def _english_careful_think(rng: random.Random, problem: ChainProblem, cfg: CorpusConfig) -> str:
    detailed = rng.random() < cfg.p_detailed
    steps = _steps(problem)
    slip_at = rng.randrange(len(steps)) if rng.random() < cfg.p_self_correct else -1
    sentences = [rng.choice(_EN_OPENINGS).format(first=problem.terms[0])]
    for i, (x, op, y, z) in enumerate(steps):
        if i == slip_at:
            sentences.append(_step_sentence(x, op, y, _slip(rng, z)))
            sentences.append(rng.choice(("Wait, that is wrong.", "Wait, let me recheck.")))
        sentences.append(_detailed_step(x, op, y, z) if detailed else _step_sentence(x, op, y, z))
    if rng.random() < cfg.p_check:
        sentences.append(_check_sentence(problem))
    sentences.append(rng.choice(_EN_CLOSINGS).format(answer=problem.answer))
    return " ".join(s for s in sentences if s)


def _zh_step(x: int, op: str, y: int, z: int) -> str:
    return f"{x} {'加' if op == '+' else '减'} {y} 等于 {z}。"


def _chinese_full_think(rng: random.Random, problem: ChainProblem, cfg: CorpusConfig) -> str:
    """Chinese from the first word to the conclusion (`cfg` unused: same signature as the others)."""
    parts = [rng.choice(_ZH_OPENINGS)]
    for i, step in enumerate(_steps(problem)):
        parts.append(("然后 " if i and rng.random() < 0.5 else "") + _zh_step(*step))
    parts.append(rng.choice(_ZH_CLOSINGS).format(answer=problem.answer))
    return " ".join(parts)


def _chinese_mix_think(rng: random.Random, problem: ChainProblem, cfg: CorpusConfig) -> str:
    """English for the first k >= 1 steps, then Chinese: the mid-reasoning language switch R1 reports.
    With one step only the conclusion switches; otherwise at least the last step is in Chinese.
    (`cfg` unused: same signature as the other careful writers.)"""
    steps = _steps(problem)
    switch = rng.randint(1, max(1, len(steps) - 1))
    parts = [rng.choice(_EN_OPENINGS).format(first=problem.terms[0])]
    parts += [_step_sentence(*step) for step in steps[:switch]]
    parts += [("然后 " if rng.random() < 0.5 else "") + _zh_step(*step) for step in steps[switch:]]
    parts.append(rng.choice(_ZH_CLOSINGS).format(answer=problem.answer))
    return " ".join(p for p in parts if p)


# An empty think twice as often as each phrase: the laziest habit is also the most common one.
_LAZY_THINKS = (
    "", "", "This is easy.", "Easy.", "I know this one.", "The answer is clear.", "Quick guess.",
    "The answer is {guess}.",
)


def _wrong_answer(rng: random.Random, problem: ChainProblem) -> int:
    """A plausible mistake: small offset, signs ignored, last term dropped, or last sign flipped."""
    answer = problem.answer
    candidates = [
        answer + rng.choice([d for d in range(-10, 11) if d]),
        sum(abs(t) for t in problem.terms),
        problem.partial_sums[-2],
        problem.partial_sums[-2] + (problem.terms[-1] if problem.ops[-1] == "-" else -problem.terms[-1]),
    ]
    guess = rng.choice(candidates)
    return guess if guess != answer else answer + rng.choice((-1, 1))


def _lazy_guess(rng: random.Random, problem: ChainProblem, cfg: CorpusConfig) -> int:
    return problem.answer if rng.random() < cfg.lazy_correct_prob else _wrong_answer(rng, problem)


def _lazy_think(rng: random.Random, guess: int) -> str:
    return rng.choice(_LAZY_THINKS).format(guess=guess)


def _think_block(body: str) -> str:
    return f"<think> {body} </think>" if body else "<think> </think>"


def _answer_block(answer: int) -> str:
    return f"<answer> {answer} </answer>"


def _bad_format_completion(rng: random.Random, problem: ChainProblem, cfg: CorpusConfig) -> str:
    if rng.random() < 0.5:
        body, answer = _english_careful_think(rng, problem, cfg), problem.answer
    else:
        answer = _lazy_guess(rng, problem, cfg)
        body = _lazy_think(rng, answer)
    think = _think_block(body)
    variants = (
        f"{think} <answer> {answer}",  # missing </answer>
        f"{think} The answer is {answer}.",  # answer outside the tags
        f"{think} {answer}",
        f"{think} <think> </think> {_answer_block(answer)}",  # repeated tags
        f"{think} {_answer_block(answer)} {_answer_block(answer)}",
        _answer_block(answer),  # no reasoning block at all
        f"{body} {_answer_block(answer)}".strip(),  # reasoning without tags
        f"<think> {body} {_answer_block(answer)}".replace("  ", " "),  # missing </think>
    )
    return rng.choice(variants)


# ------------------------------------------------------------------------------- plain documents
def _draw(rng: random.Random, cfg: CorpusConfig) -> ChainProblem:
    return sample_problem(rng, cfg.min_terms, cfg.max_terms, cfg.min_digits, cfg.max_digits, cfg.allow_negation)


def _random_step(rng: random.Random, cfg: CorpusConfig) -> tuple[int, str, int, int]:
    """One (x, op, y, z) step as it would appear inside a careful solution of a corpus problem."""
    return rng.choice(_steps(_draw(rng, cfg)))


def _plain_document(rng: random.Random, cfg: CorpusConfig) -> str:
    chinese = rng.random() < cfg.p_plain_chinese
    style = rng.randrange(3)
    if style == 0:  # a list of facts
        facts = [_random_step(rng, cfg) for _ in range(rng.randint(3, 6))]
        if chinese:
            text = "算术练习：" + " ".join(_zh_step(*f) for f in facts)
        else:
            text = "Arithmetic facts: " + " ".join(_step_sentence(*f) for f in facts)
    elif style == 1:  # facts in words
        x, op, y, z = _random_step(rng, cfg)
        if chinese:
            text = f"{x} {'加上' if op == '+' else '减去'} {y}，结果是 {z}。"
        elif op == "+":
            text = rng.choice((f"{x} plus {y} equals {z}.", f"Adding {y} to {x} gives {z}."))
        else:
            text = rng.choice((f"{x} minus {y} equals {z}.", f"Taking {y} away from {x} leaves {z}."))
    else:  # a worked chain in prose
        problem = _draw(rng, cfg)
        steps = _steps(problem)
        if chinese:
            worked = " ".join(_zh_step(*s) for s in steps)
            text = f"计算 {problem.expression}：{worked} 结果是 {problem.answer}。"
        else:
            words = ", then ".join(f"{'add' if op == '+' else 'subtract'} {y} to get {z}" for _, op, y, z in steps)
            text = f"To work out {problem.expression}, start from {problem.terms[0]}, {words}."
    return text + EOS_TOKEN


# -------------------------------------------------------------------------------- generation
KINDS = ("careful", "careful_zh_mix", "careful_zh_full", "lazy", "bad_format", "plain")
_CAREFUL_WRITERS = {
    "careful": _english_careful_think,
    "careful_zh_mix": _chinese_mix_think,
    "careful_zh_full": _chinese_full_think,
}


def _allocate(shares: dict[str, float], n: int) -> list[str]:
    """Exactly round(n * share) items per kind (largest remainder), so realized shares match config."""
    raw = {kind: n * share for kind, share in shares.items()}
    counts = {kind: int(value) for kind, value in raw.items()}
    by_remainder = sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)  # stable: ties keep order
    for kind in by_remainder[: n - sum(counts.values())]:
        counts[kind] += 1
    return [kind for kind in shares for _ in range(counts[kind])]


def _fresh_problem(rng: random.Random, cfg: CorpusConfig, exclude: frozenset[str]) -> ChainProblem:
    for _ in range(1000):
        problem = _draw(rng, cfg)
        if problem.question not in exclude:
            return problem
    raise ValueError("could not draw a problem outside `exclude` in 1000 tries: the range is too small")


def generate_corpus(
    cfg: CorpusConfig | None = None, n_docs: int = 10_000, seed: int = 0, exclude: Iterable[str] = ()
) -> list[str]:
    """`n_docs` pretraining documents mixed as `cfg` says, in a seeded random order.

    Questions listed in `exclude` (e.g. an eval split's) are never used in templated documents.
    """
    cfg = cfg or CorpusConfig()
    cfg.validate()
    excluded = frozenset(exclude)
    rng = random.Random(f"r1lab.corpus:{seed}")
    zh_mix = cfg.p_careful * cfg.p_chinese_mix
    zh_full = cfg.p_careful * cfg.p_chinese_full
    shares = {
        "careful": cfg.p_careful - zh_mix - zh_full,
        "careful_zh_mix": zh_mix,
        "careful_zh_full": zh_full,
        "lazy": cfg.p_lazy,
        "bad_format": cfg.p_bad_format,
        "plain": cfg.p_plain,
    }
    kinds = _allocate(shares, n_docs)
    rng.shuffle(kinds)
    docs = []
    for kind in kinds:
        if kind == "plain":
            docs.append(_plain_document(rng, cfg))
            continue
        problem = _fresh_problem(rng, cfg, excluded)
        if kind in _CAREFUL_WRITERS:
            think = _CAREFUL_WRITERS[kind](rng, problem, cfg)
            completion = f"{_think_block(think)} {_answer_block(problem.answer)}"
        elif kind == "lazy":
            guess = _lazy_guess(rng, problem, cfg)
            completion = f"{_think_block(_lazy_think(rng, guess))} {_answer_block(guess)}"
        else:
            completion = _bad_format_completion(rng, problem, cfg)
        docs.append(make_document(r1_zero_prompt(problem.question), completion))
    return docs


def _cold_start_think(rng: random.Random, problem: ChainProblem) -> str:
    """Readable long CoT: name each operation, split a two-digit operand into tens and ones when the
    ones cross a multiple of ten (a carry or borrow, where mistakes happen), verify, conclude."""
    opening = rng.choice(("Let me solve this step by step.", "I will go from left to right.", "Term by term."))
    sentences = [opening, f"Start with {problem.terms[0]}."]
    for x, op, y, z in _steps(problem):
        verb = "Add" if op == "+" else "Subtract"
        delta = y if op == "+" else -y
        tens, ones = divmod(abs(delta), 10)
        middle = x + (tens * 10 if delta >= 0 else -tens * 10)
        if tens and ones and middle // 10 != z // 10:
            sign = "+" if delta >= 0 else "-"
            sentences.append(f"{verb} {y}: {x} {sign} {tens * 10} = {middle}, then {middle} {sign} {ones} = {z}.")
        else:
            sentences.append(f"{verb} {y}: {x} {op} {y} = {z}.")
    sentences.append(_check_sentence(problem))
    sentences.append(f"So the answer is {problem.answer}.")
    return " ".join(sentences)


def _tool_think(problem: ChainProblem, tool: Any) -> str:
    """Reasoning that hands the arithmetic to the Python tool and reads the result off its reply."""
    from r1lab.tools import ToolResult

    openings = ("Let me compute it.", "I will let Python do the arithmetic.", "Compute the chain.")
    opening = openings[sum(problem.terms) % len(openings)]
    reply = tool.reply_text(ToolResult(str(problem.answer), False))
    call = f"{tool.call_open}\nprint({problem.expression})\n{tool.call_close}"
    return f"{opening} {call}{reply} So the answer is {problem.answer}."


def generate_cold_start(
    n: int,
    seed: int = 0,
    min_terms: int = 2,
    max_terms: int = 4,
    min_digits: int = 1,
    max_digits: int = 2,
    exclude: Iterable[str] = (),
    tool: Any = None,
) -> list[dict[str, Any]]:
    """`n` clean, English-only long-CoT demonstrations for the cold-start SFT (R1 stage 1).

    Each item is {"prompt", "completion", "question", "answer"}; the training text is
    `prompt + " " + completion` followed by EOS (see `make_document`). The completion is exactly one
    `<think>...</think>` then one `<answer>...</answer>`, always correct. With `tool` (an
    r1lab.tools.PythonTool) the reasoning calls it to evaluate the expression and reads the answer off its
    reply, instead of working it out in words: the cold start of a tool-using model.
    """
    cfg = CorpusConfig(
        min_terms=min_terms, max_terms=max_terms, min_digits=min_digits, max_digits=max_digits
    )
    cfg.validate()
    excluded = frozenset(exclude)
    rng = random.Random(f"r1lab.cold_start:{seed}")
    items = []
    for _ in range(n):
        problem = _fresh_problem(rng, cfg, excluded)
        think = _cold_start_think(rng, problem)  # drawn with a tool too: both variants pose the same problems
        if tool is not None:
            think = _tool_think(problem, tool)
        completion = f"{_think_block(think)} {_answer_block(problem.answer)}"
        items.append(
            {
                "prompt": r1_zero_prompt(problem.question),
                "completion": completion,
                "question": problem.question,
                "answer": str(problem.answer),
            }
        )
    return items


def pretrain_texts(
    cfg: CorpusConfig | None = None, n_docs: int = 4000, seed: int = 0, n_cold_start: int = 200
) -> list[str]:
    """Texts to train the tokenizer on: a corpus sample plus cold-start documents, so every phrase
    any later stage writes (both languages, all templates) is covered."""
    docs = generate_corpus(cfg, n_docs=n_docs, seed=seed)
    cold = generate_cold_start(n_cold_start, seed=seed)
    return docs + [make_document(item["prompt"], item["completion"]) for item in cold]


# --------------------------------------------------------------------------------- analysis
def split_document(doc: str) -> tuple[str, str] | None:
    """(question, completion) of a templated document, or None for a plain one."""
    if not doc.startswith(_TEMPLATE_HEAD):
        return None
    question, sep, rest = doc[len(_TEMPLATE_HEAD):].partition(_TEMPLATE_TAIL + " ")
    if not sep:
        return None
    return question, rest.removesuffix(EOS_TOKEN)


_STRICT_FORMAT_RE = re.compile(r"^<think>(.*?)</think>\s*<answer>(.*?)</answer>$", re.DOTALL)


def is_well_formatted(completion: str) -> bool:
    """Exactly one <think>...</think> followed by exactly one <answer>...</answer>, nothing else."""
    text = completion.strip()
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    return _STRICT_FORMAT_RE.match(text) is not None


def think_text(completion: str) -> str:
    """Text between <think> and </think> ('' if absent)."""
    match = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return match.group(1).strip() if match else ""


def answer_text(completion: str) -> str:
    """Text between <answer> and </answer> ('' if absent)."""
    match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return match.group(1).strip() if match else ""


def has_cjk(text: str) -> bool:
    return _CJK_RE.search(text) is not None


def _evaluate_chain(chain: str) -> int:
    tokens = chain.split(" ")
    value = int(tokens[0])
    for op, term in zip(tokens[1::2], tokens[2::2]):
        value = value + int(term) if op == "+" else value - int(term)
    return value


def find_equations(text: str) -> list[tuple[str, bool, bool]]:
    """Every equation written in `text` (Chinese 加/减/等于 read as + - =), as
    (equation, holds, retracted): `holds` when all sides are equal, `retracted` when the next
    sentence starts with "Wait" (a slip the writer caught)."""
    for zh, symbol in _ZH_TO_SYMBOLS:
        text = text.replace(zh, symbol)
    found = []
    for match in _EQUATION_RE.finditer(text):
        values = {_evaluate_chain(side) for side in match.group(0).split(" = ")}
        retracted = text[match.end():].lstrip(".。 ").startswith("Wait")
        found.append((match.group(0), len(values) == 1, retracted))
    return found


def classify_document(doc: str) -> str:
    """The kind of a corpus document, read from its text: one of careful, careful_zh_mix,
    careful_zh_full, lazy, bad_format, plain."""
    parts = split_document(doc)
    if parts is None:
        return "plain"
    _, completion = parts
    if not is_well_formatted(completion):
        return "bad_format"
    think = think_text(completion)
    if not find_equations(think):
        return "lazy"
    if not has_cjk(think):
        return "careful"
    # Mixed reasoning always opens with at least one English-style "a + b = c" step; fully Chinese
    # reasoning writes every step with 加/减/等于.
    return "careful_zh_mix" if "=" in think else "careful_zh_full"


def _shows_split(think: str) -> bool:
    return any(equation.count("=") > 1 for equation, _, _ in find_equations(think))


def _has_splittable_operand(question: str) -> bool:
    return any(abs(t) >= 10 and t % 10 for t in ChainProblem.from_question(question).terms[1:])


def corpus_stats(docs: Sequence[str]) -> dict[str, float]:
    """Realized mixture of a corpus, read back from the text alone.

    Top-level shares (of all documents): careful (all languages), lazy, bad_format, plain. Sub-shares:
    chinese_mix and chinese_full (of careful), check and self_correct (of English careful), detailed (of
    English careful whose problem has a two-digit operand that is not a multiple of ten),
    lazy_correct (of lazy), plain_chinese (of plain). Also n_docs and mean_chars.
    """
    kinds = [classify_document(doc) for doc in docs]
    count = Counter(kinds)
    n = max(len(docs), 1)
    careful = count["careful"] + count["careful_zh_mix"] + count["careful_zh_full"]
    english = [split_document(d) for d, k in zip(docs, kinds) if k == "careful"]
    english_thinks = [think_text(completion) for _, completion in english]
    # Only operands of two digits that are not round can be split into tens and ones.
    splittable = [t for (q, _), t in zip(english, english_thinks) if _has_splittable_operand(q)]
    lazy_right = 0
    for doc, kind in zip(docs, kinds):
        if kind == "lazy":
            question, completion = split_document(doc)
            lazy_right += answer_text(completion) == str(ChainProblem.from_question(question).answer)
    plain_zh = sum(has_cjk(d) for d, k in zip(docs, kinds) if k == "plain")

    def share(part: int, whole: int) -> float:
        return part / whole if whole else 0.0

    return {
        "n_docs": float(len(docs)),
        "careful": share(careful, n),
        "lazy": share(count["lazy"], n),
        "bad_format": share(count["bad_format"], n),
        "plain": share(count["plain"], n),
        "chinese_mix": share(count["careful_zh_mix"], careful),
        "chinese_full": share(count["careful_zh_full"], careful),
        "detailed": share(sum(_shows_split(t) for t in splittable), len(splittable)),
        "check": share(sum("Check:" in t for t in english_thinks), len(english_thinks)),
        "self_correct": share(sum("Wait" in t for t in english_thinks), len(english_thinks)),
        "lazy_correct": share(lazy_right, count["lazy"]),
        "plain_chinese": share(plain_zh, count["plain"]),
        "mean_chars": sum(len(d) for d in docs) / n,
    }
