"""Pull the parts that rewards look at out of a completion: the answer, the chain of thought, code.

Every function here takes arbitrary model output and returns ``None`` (never raises) when the part
it looks for is missing or malformed. All of them run in linear time: degenerate generations
(thousands of unclosed ``<answer>`` or ``\\boxed{``) are common in RL and must not stall scoring.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "extract_code", "extract_think", "strip_think"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_BARE_TOKEN = re.compile(r"[^\s$]+")
# ```python ... ``` (also ```py, ```python3 and a bare ```); the closing fence must start a line.
_CODE_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)^[ \t]*```",
                         re.DOTALL | re.MULTILINE | re.IGNORECASE)


def _matching_braces(text: str) -> dict[int, int]:
    """Index of the closing brace of every balanced opening brace, found in one pass.

    Escaped braces ``\\{`` and ``\\}`` are literal characters, not groups.
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "{":
            stack.append(i)
        elif char == "}" and stack:
            closing[stack.pop()] = i
    return closing


def extract_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (nested braces allowed), or None.

    ``\\boxed 5`` (the brace-less form) is accepted too; ``\\fbox`` counts as ``\\boxed``.
    """
    if not isinstance(text, str) or ("\\boxed" not in text and "\\fbox" not in text):
        return None
    closing = _matching_braces(text)
    for match in reversed(list(_BOXED.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            if pos in closing:
                return text[pos + 1 : closing[pos]].strip()
        elif pos > match.end():  # "\boxed 5": the next whitespace-free token
            token = _BARE_TOKEN.match(text, pos)
            if token:
                return token.group(0)
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion.

    The content of the last ``<answer>...</answer>`` block (if that content holds a ``\\boxed{}``,
    the boxed part); else the content of the last ``\\boxed{...}``; else None. An empty answer
    block counts as no answer.
    """
    if not isinstance(completion, str):
        return None
    # The last closing tag and the nearest opening tag before it. (A lazy regex would rescan the
    # rest of the text from every unclosed <answer>: quadratic time.)
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end != -1 else -1
    if start != -1:
        block = completion[start + len("<answer>") : end]
        boxed = extract_boxed(block)
        answer = boxed if boxed is not None else block.strip()
        return answer or None
    return extract_boxed(completion) or None


def extract_think(completion: str) -> str | None:
    """The chain of thought: content of the first ``<think>...</think>`` block, or None.

    When generation was forced to start inside the block (prompt ends with ``<think>``), the
    completion has a closing tag only; then everything before ``</think>`` is the thought.
    """
    if not isinstance(completion, str):
        return None
    start = completion.find("<think>")
    if start == -1:
        return completion.split("</think>", 1)[0] if "</think>" in completion else None
    end = completion.find("</think>", start + len("<think>"))
    return completion[start + len("<think>") : end] if end != -1 else None


def strip_think(completion: str) -> str:
    """What follows the chain of thought (the summary / final response); the whole text if no
    ``</think>`` is present."""
    if not isinstance(completion, str):
        return ""
    return completion.rsplit("</think>", 1)[-1].strip() if "</think>" in completion else completion


def extract_code(completion: str) -> str | None:
    """The program in the last fenced ```python (or bare ```) block, or None."""
    if not isinstance(completion, str):
        return None
    blocks = _CODE_FENCE.findall(completion)
    if not blocks:
        return None
    return blocks[-1][1]
