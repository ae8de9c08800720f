"""Language-consistency reward (DeepSeek-R1 §2.3.2): the share of chain-of-thought words that are
in the target language, ``Num(Words_target) / Num(Words)``.

What counts as a word:
* a run of letters of an alphabetic script (Latin, Cyrillic, Hangul, Arabic, ...) is one word;
  a single Latin letter is not (in reasoning it is nearly always a variable such as ``x``);
* each Han character is one word, and so is each kana character (CJK text has no spaces);
* numbers, punctuation, Greek letters and math are not words of any language: ``$...$``,
  ``\\(...\\)``, ``\\[...\\]`` regions, LaTeX commands, fenced code blocks and tags such as
  ``<answer>`` are removed first.

Scripts, not dictionaries, decide the language: "en" means Latin-script words, so French or
German text also counts as "en"; "zh" means Han characters; "ja" accepts kana and Han.
A text with no words at all scores 1.0: it contains nothing in another language, and punishing
an all-math chain of thought for "inconsistency" would be wrong.
"""

from __future__ import annotations

import re
from collections import Counter

from .extract import extract_think

__all__ = ["LANGUAGE_SCRIPTS", "count_words_by_script", "is_mixed_language",
           "language_consistency_reward"]

LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"latin"}),
    "zh": frozenset({"han"}),
    "ja": frozenset({"kana", "han"}),
    "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}),
    "ar": frozenset({"arabic"}),
    "he": frozenset({"hebrew"}),
    "hi": frozenset({"devanagari"}),
    "th": frozenset({"thai"}),
}

# One alternative per script; Han and kana match one character at a time.
_SCRIPT_PATTERNS = {
    "han": r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\U00020000-\U0002FA1F]",
    "kana": r"[\u3040-\u30FF\u31F0-\u31FF]",
    "latin": r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F\u1E00-\u1EFF]{2,}",
    "cyrillic": r"[\u0400-\u04FF]+",
    "hangul": r"[\uAC00-\uD7AF\u1100-\u11FF\u3130-\u318F]+",
    "arabic": r"[\u0600-\u06FF]+",
    "hebrew": r"[\u0590-\u05FF]+",
    "devanagari": r"[\u0900-\u097F]+",
    "thai": r"[\u0E00-\u0E7F]+",
}
_WORD = re.compile("|".join(f"(?P<{name}>{pat})" for name, pat in _SCRIPT_PATTERNS.items()))
# A single Latin letter, so that "x" in "x+1" is skipped rather than glued to a neighbour.
_SINGLE_LATIN = re.compile(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])")
_NOT_WORDS = re.compile(
    r"```.*?```"  # fenced code
    r"|\$\$.*?\$\$|\$[^$]*\$"  # $$display$$ and $inline$ math
    # \( inline \) and \[ display \] math. The body may not hold another delimiter, so an unclosed
    # \( is scanned up to the next delimiter only, not to the end (no quadratic blow-up).
    r"|\\\((?:(?!\\[()]).)*\\\)|\\\[(?:(?!\\[\[\]]).)*\\\]"
    r"|\\[A-Za-z]+"  # any other LaTeX command (\frac, \text, ...)
    r"|</?[A-Za-z_]+>",  # markup tags such as <think> and <answer>
    re.DOTALL,
)


def count_words_by_script(text: str) -> Counter:
    """Number of words per script in ``text`` (math, code, numbers and punctuation excluded)."""
    if not isinstance(text, str) or not text:
        return Counter()
    text = _NOT_WORDS.sub(" ", text)
    text = _SINGLE_LATIN.sub(" ", text)
    return Counter(match.lastgroup for match in _WORD.finditer(text))


def _chain_of_thought(text: str) -> str:
    think = extract_think(text)
    return think if think is not None else (text if isinstance(text, str) else "")


def language_consistency_reward(text: str, language: str = "en") -> float:
    """Share, in [0, 1], of the chain-of-thought words written in ``language``.

    The chain of thought is the ``<think>`` block when there is one, else the whole text. A text
    without any words scores 1.0 (see the module docstring).
    """
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; known: {sorted(LANGUAGE_SCRIPTS)}")
    counts = count_words_by_script(_chain_of_thought(text))
    total = sum(counts.values())
    if total == 0:
        return 1.0
    in_target = sum(n for script, n in counts.items() if script in LANGUAGE_SCRIPTS[language])
    return in_target / total


def is_mixed_language(text: str, threshold: float = 0.95, language: str | None = None) -> bool:
    """True when less than ``threshold`` of the chain-of-thought words are in one language.

    With ``language`` set, that language must hold the ``threshold`` share; without it, the best
    fitting language is used. Used to filter mixed-language traces in rejection sampling.
    """
    if language is not None:
        return language_consistency_reward(text, language) < threshold
    counts = count_words_by_script(_chain_of_thought(text))
    total = sum(counts.values())
    if total == 0:
        return False
    best = max(sum(counts[s] for s in scripts) for scripts in LANGUAGE_SCRIPTS.values())
    return best / total < threshold
