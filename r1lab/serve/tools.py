"""Function calling on the completion side: `<tool_call>` blocks in an answer → OpenAI `tool_calls`.

Hermes-style models (Qwen2.5 and its fine-tunes, among them the R1 distills of Qwen) are told by their chat
template (see `reasoning.render_chat_prompt` for the prompt side) to call a function by writing

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

in their answer, one block per call. `ToolCallParser` finds those blocks in the answer text (the `content`
that `ReasoningSplitter` gives: a block inside `<think>` is reasoning, never a call), incrementally, as
the answer streams in.

Decisions (API clients depend on them):
* A block becomes a call only when its inside is one JSON object with a "name" that is one of the
  request's tools and "arguments" that is an object (or a JSON string of one; missing: {}). Anything else
  (JSON that does not parse, an unknown tool, a block the generation never closed) stays in `content`
  as the text the model wrote, tags included: the client sees what went wrong instead of a 500.
* `arguments` is sent as JSON text (OpenAI's format), re-serialized from the parsed object.
* `content` is the text outside the call blocks, with the whitespace rule of `reasoning._Field` (none at the
  start or end; whitespace between text and a block is kept only when more text follows).
* Streaming sends a call whole once its closing tag arrives; the text of an open block, and a partial
  `<tool_call` at the end of what arrived so far, are held back, never sent as content deltas.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from .reasoning import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, _Field, _partial_tag_length

__all__ = ["ToolCall", "ToolCallParser", "parse_tool_call"]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One parsed call: `arguments` is the JSON text of an object, e.g. '{"city": "Paris"}'."""

    name: str
    arguments: str
    id: str = field(default_factory=_call_id)

    def as_openai(self) -> dict:
        """{"id": "call_...", "type": "function", "function": {"name": ..., "arguments": "<JSON text>"}}"""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_call(inside: str, tool_names: frozenset[str]) -> ToolCall | None:
    """The call written between `<tool_call>` and `</tool_call>`, or None when it is not a valid call of
    one of `tool_names` (see the module's rules)."""
    try:
        call = json.loads(inside)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(call, dict) or call.get("name") not in tool_names:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some fine-tunes write the arguments as a JSON string, OpenAI-style
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Incremental: chunks of answer text → the content outside the call blocks, with the calls collected in
    `calls` (in the order written).

    >>> p = ToolCallParser(["get_weather"])
    >>> p.feed('Let me check.\\n<tool_ca'), p.calls
    ('Let me check.', [])
    >>> p.feed('ll>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>', final=True)
    ''
    >>> [(c.name, c.arguments) for c in p.calls]
    [('get_weather', '{"city": "Paris"}')]
    """

    def __init__(self, tool_names: Iterable[str]) -> None:
        self.tool_names = frozenset(tool_names)
        self.calls: list[ToolCall] = []
        self._pending = ""  # a possible start of "<tool_call>", or the inside of an open block so far
        self._in_block = False
        self._content = _Field()

    def feed(self, text: str, final: bool = False) -> str:
        """Consume the next chunk (`final`: the answer ends with it); return the content that became certain."""
        pending, out = self._pending + text, []
        while True:
            if not self._in_block:
                start = pending.find(TOOL_CALL_OPEN)
                if start == -1:
                    keep = 0 if final else _partial_tag_length(pending, (TOOL_CALL_OPEN,))
                    out.append(pending[: len(pending) - keep])
                    pending = pending[len(pending) - keep:]
                    break
                out.append(pending[:start])
                pending, self._in_block = pending[start + len(TOOL_CALL_OPEN):], True
            else:
                end = pending.find(TOOL_CALL_CLOSE)
                if end == -1:
                    if final:  # never closed (max_tokens, a stop string): the text as written
                        out.append(TOOL_CALL_OPEN + pending)
                        pending, self._in_block = "", False
                    break
                call = parse_tool_call(pending[:end], self.tool_names)
                if call is None:
                    out.append(TOOL_CALL_OPEN + pending[: end + len(TOOL_CALL_CLOSE)])
                else:
                    self.calls.append(call)
                pending, self._in_block = pending[end + len(TOOL_CALL_CLOSE):], False
        self._pending = pending
        content = self._content.push("".join(out))
        if final:
            self._content.held = ""  # whitespace at the very end is dropped
        return content
