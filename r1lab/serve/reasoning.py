"""The two sides of R1's think protocol at inference time.

0. Tokens → text, `IncrementalDetokenizer` and `StopStringFilter`: streamed token ids become text only once
   their characters are complete, and a stop string ends the text even when it arrives in pieces.
1. Prompt side, `render_chat_prompt`: turn chat messages into prompt text that ends inside an open
   `<think>` block. DeepSeek's usage notes say to force the response to start with "<think>\\n" because the
   released models sometimes skip thinking; the forced prefix then belongs to the prompt, and the generated
   text starts inside the thought. With `tools` (function calling) the conversation goes through the
   model's chat template with `tools=`, or, for a tokenizer without a template of its own, `hermes_chatml`.
2. Completion side, `ReasoningSplitter` / `split_reasoning`: cut generated text into `reasoning_content`
   (the inside of `<think>...</think>`) and `content` (what follows `</think>`), either at once or
   incrementally over streamed chunks, where a tag may arrive split across chunks ("</th" + "ink>").

Decisions (documented because API clients depend on them):
* `content` is the final answer as DeepSeek's API returns it: the `<answer>` / `</answer>` tags of the
  R1-Zero format are removed and their inside kept ("<answer> 42 </answer>" → "42"). Pass
  `keep_answer_tags=True` to keep them.
* Both fields are stripped of leading and trailing whitespace (the newline after "<think>", the blank line
  after "</think>"). The streaming splitter holds back trailing whitespace until it knows more text
  follows, so the concatenation of streamed deltas equals the one-shot split exactly.
* A completion that never opens a think block (and was not forced into one) has `reasoning_content`
  None and everything is `content`. A think block that never closes (the generation hit max_tokens) is
  all reasoning, and `content` is "".
* Tags are only recognized where the protocol puts them: one leading `<think>`, the first `</think>`,
  and `<answer>` / `</answer>` in the content. Any other tag text is kept as ordinary text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Hermes / Qwen2.5 function calling: a call is a JSON object between these tags (see tools.py)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

# What a prompt appends to open the think block. Chat-format R1 models are told "<think>\n" (DeepSeek's
# advice); the R1-Zero template's documents read "Assistant: <think> ...", so there the prefix is " <think>".
CHAT_THINK_PREFIX = "<think>\n"
R1_ZERO_THINK_PREFIX = " " + THINK_OPEN

__all__ = [
    "CHAT_THINK_PREFIX",
    "R1_ZERO_THINK_PREFIX",
    "Delta",
    "IncrementalDetokenizer",
    "ReasoningSplitter",
    "StopStringFilter",
    "RenderedPrompt",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "choose_template",
    "hermes_chatml",
    "uses_tools",
    "render_chat_prompt",
    "split_reasoning",
]


# --------------------------------------------------------------------------------------------------------
# Tokens to text
# --------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Text of a growing token sequence, returned piece by piece.

    Decoding token by token is wrong for byte-level BPE (a character's UTF-8 bytes may span tokens) and for
    SentencePiece (a token's leading space depends on its left neighbour); decoding the whole sequence every
    step is quadratic. So each step decodes a short window: the tokens already returned since the previous
    step (left context) plus the new ones, and returns the text beyond that context, unless it ends in an
    incomplete character (U+FFFD), in which case the new tokens wait for the next step.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._context_start = 0  # window start: tokens whose text was returned one step ago
        self._returned_end = 0  # tokens [.. _returned_end) have had their text returned

    def add(self, token_ids: Sequence[int]) -> str:
        self.token_ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._advance(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._returned_end == len(self.token_ids):
            return ""
        context = self._decode(self.token_ids[self._context_start:self._returned_end])
        window = self._decode(self.token_ids[self._context_start:])
        if not final and window.endswith("\ufffd"):
            return ""
        self._context_start, self._returned_end = self._returned_end, len(self.token_ids)
        return window[len(context):]


class StopStringFilter:
    """Cuts streamed text at the first stop string (OpenAI `stop`: the stop string itself is not returned).

    Text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """The text that is certainly output; after a stop string (`stopped` is then True) nothing more."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i != -1]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = 0 if final else _partial_tag_length(text, self.stops)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep]


# --------------------------------------------------------------------------------------------------------
# Completion side
# --------------------------------------------------------------------------------------------------------


@dataclass
class Delta:
    """New text of each field produced by one `feed` (either may be "")."""

    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class _Field:
    """One output field (reasoning or content) with R1's whitespace rule: no leading whitespace, and
    trailing whitespace held back until non-blank text follows it (dropped if the field ends)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def _partial_tag_length(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (it may be the start
    of a tag whose rest has not arrived yet)."""
    longest = 0
    for tag in tags:
        # such a suffix starts with tag[0] within the last len(tag) - 1 characters: try those starts in order
        start = text.find(tag[0], max(len(text) - len(tag) + 1, 0))
        while start != -1 and len(text) - start > longest:
            if tag.startswith(text[start:]):
                longest = len(text) - start
                break
            start = text.find(tag[0], start + 1)
    return longest


class ReasoningSplitter:
    """Incremental splitter of generated text into reasoning and content.

    >>> s = ReasoningSplitter(starts_in_think=True)
    >>> s.feed("Two plus two is four.</th")
    Delta(reasoning='Two plus two is four.', content='')
    >>> s.feed("ink>\\n\\n<answer>4</answer>"), s.finish()
    (Delta(reasoning='', content='4'), Delta(reasoning='', content=''))

    `starts_in_think`: the prompt ended with an opening `<think>` (forced thinking), so the text starts
    inside the thought (a redundant `<think>` the model writes anyway is dropped). Otherwise a think block
    is recognized only at the very start (after whitespace).
    """

    def __init__(self, starts_in_think: bool = False, keep_answer_tags: bool = False) -> None:
        self._state = "start"
        self._forced = starts_in_think
        self._answer_tags = () if keep_answer_tags else (ANSWER_OPEN, ANSWER_CLOSE)
        self._pending = ""  # text not yet assigned to a field (it may hold the beginning of a tag)
        self._reasoning, self._content = _Field(), _Field()
        self.saw_reasoning = starts_in_think
        """True once the text is known to have a think block (reasoning_content is then not None)."""

    def feed(self, text: str) -> Delta:
        """Consume the next chunk of generated text; return the field text that became final."""
        self._pending += text
        delta = Delta()
        state = None
        while state != self._state:  # a state consumes all it can; only a switch gives the next one work
            state = self._state
            _STATES[state](self, delta, False)
        return delta

    def finish(self) -> Delta:
        """The generation ended: flush what was held back (a half tag is then just text)."""
        delta = Delta()
        _STATES[self._state](self, delta, True)
        self._reasoning.held = self._content.held = ""
        return delta

    # -- states: each consumes a prefix of _pending and may switch state --------------------------------
    def _in_start(self, delta: Delta, final: bool) -> None:
        text = self._pending.lstrip()
        if text.startswith(THINK_OPEN):
            self._state, self._pending, self.saw_reasoning = "think", text[len(THINK_OPEN):], True
        elif final or not THINK_OPEN.startswith(text):  # (empty text is a prefix: wait for more)
            self._state = "think" if self._forced else "content"
            _STATES[self._state](self, delta, final)

    def _in_think(self, delta: Delta, final: bool) -> None:
        end = self._pending.find(THINK_CLOSE)
        if end != -1:
            delta.reasoning += self._reasoning.push(self._pending[:end])
            self._reasoning.held = ""  # whitespace before </think> ends the field: dropped
            self._pending = self._pending[end + len(THINK_CLOSE):]
            self._state = "content"
            return
        keep = 0 if final else _partial_tag_length(self._pending, (THINK_CLOSE,))
        delta.reasoning += self._reasoning.push(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]

    def _in_content(self, delta: Delta, final: bool) -> None:
        text, out = self._pending, []
        while True:
            hits = [(text.find(tag), tag) for tag in self._answer_tags]
            hits = [(i, tag) for i, tag in hits if i != -1]
            if not hits:
                break
            index, tag = min(hits)
            out.append(text[:index])
            text = text[index + len(tag):]
        keep = 0 if final else _partial_tag_length(text, self._answer_tags)
        out.append(text[: len(text) - keep])
        self._pending = text[len(text) - keep:]
        delta.content += self._content.push("".join(out))


_STATES = {"start": ReasoningSplitter._in_start, "think": ReasoningSplitter._in_think,
           "content": ReasoningSplitter._in_content}


def split_reasoning(text: str, *, starts_in_think: bool = False,
                    keep_answer_tags: bool = False) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole completion; reasoning_content is None when there is no think
    block. Same rules (and the same result) as streaming it through `ReasoningSplitter`."""
    splitter = ReasoningSplitter(starts_in_think, keep_answer_tags)
    first, last = splitter.feed(text), splitter.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if splitter.saw_reasoning else None), first.content + last.content


# --------------------------------------------------------------------------------------------------------
# Prompt side
# --------------------------------------------------------------------------------------------------------


@dataclass
class RenderedPrompt:
    text: str
    """The prompt text to tokenize (with the forced think prefix when `starts_in_think`)."""
    starts_in_think: bool
    """The prompt ends inside an open think block: split completions with starts_in_think=True."""
    template: str
    """"chat" or "r1_zero"."""


def choose_template(tokenizer: Any, template: str = "auto", *, with_tools: bool = False) -> str:
    """"chat" or "r1_zero" for `template` = "auto" | "chat" | "r1_zero".

    auto: "chat" when the tokenizer carries a chat template of its own (a real instruct / R1-distill model),
    "r1_zero" when it has none or only r1lab's built-in ChatML fallback (r1lab's own base models, trained on
    R1-Zero-template documents, never saw ChatML). `with_tools` (the conversation has tools, tool calls or
    tool results, see `uses_tools`): always "chat", since the R1-Zero format has no place for them;
    ValueError for an explicit "r1_zero".
    """
    if template not in ("auto", "chat", "r1_zero"):
        raise ValueError(f"template must be 'auto', 'chat' or 'r1_zero', got {template!r}")
    if with_tools:
        if template == "r1_zero":
            raise ValueError("tools need a chat template; the R1-Zero format has no place for them")
        return "chat"
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "has_own_chat_template", False) else "r1_zero"


def uses_tools(messages: Sequence[dict], tools: Sequence[dict] | None) -> bool:
    """Whether the conversation involves function calling: tools offered, or tool calls / tool results in
    the history."""
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


# What hermes_chatml puts in the system turn when tools are offered: Qwen2.5's wording, so a model tuned on
# Qwen's template (most Hermes-style function-calling models) sees the instructions it was trained with.
_HERMES_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_HERMES_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n' + TOOL_CALL_CLOSE)


def hermes_chatml(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
    """ChatML with Hermes-style function calling, the chat format for a tokenizer without a template of its
    own (r1lab's built-in CHATML_TEMPLATE knows no tools). The same text as Qwen2.5's template, less Qwen's
    default system prompt; without tools and tool messages, exactly what CHATML_TEMPLATE renders:

    * tools (OpenAI's [{"type": "function", "function": {...}}]) are listed, one JSON object a line, in a
      system turn after the first system message's text, with the instruction to answer calls as
      `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
    * an assistant turn with `tool_calls` (arguments as objects) writes them as those blocks after its text;
    * consecutive `tool` messages become one user turn of `<tool_response>\\n{content}\\n</tool_response>`
      parts;
    * the prompt ends with the assistant's opening `<|im_start|>assistant\\n`.
    """
    parts, rest = [], list(messages)
    if tools:
        system = rest.pop(0)["content"] + "\n\n" if rest and rest[0]["role"] == "system" else ""
        listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        parts.append(f"<|im_start|>system\n{system}{_HERMES_TOOLS_HEADER}{listed}{_HERMES_TOOLS_FOOTER}<|im_end|>\n")
    for i, message in enumerate(rest):
        role, content = message["role"], message["content"]
        if role == "tool":
            if i == 0 or rest[i - 1]["role"] != "tool":
                parts.append("<|im_start|>user")
            parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(rest) - 1 or rest[i + 1]["role"] != "tool":
                parts.append("<|im_end|>\n")
        elif message.get("tool_calls"):
            parts.append(f"<|im_start|>{role}" + ("\n" + content if content else ""))
            for call in message["tool_calls"]:
                written = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                parts.append(f"\n{TOOL_CALL_OPEN}\n{json.dumps(written, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}")
            parts.append("<|im_end|>\n")
        else:
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _r1_zero_conversation(messages: Sequence[dict]) -> str:
    """Multi-turn text in the R1-Zero format: the paper's preamble once, then "User: q. Assistant: a" turns
    (earlier answers wrapped in <answer> tags, as the model wrote them), ending with "Assistant:".
    System messages come first, one paragraph each (DeepSeek advises against them; kept, not dropped)."""
    from r1lab.tasks.templates import R1_ZERO_TEMPLATE

    preamble = R1_ZERO_TEMPLATE.split(" User: {question}")[0]
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    parts = [*(s.strip() + "\n\n" for s in system), preamble]
    for message in messages:
        if message["role"] == "user":
            parts.append(f" User: {message['content']}. Assistant:")
        elif message["role"] == "assistant":
            parts.append(f" {ANSWER_OPEN} {message['content'].strip()} {ANSWER_CLOSE}")
    if messages and messages[-1]["role"] == "assistant":  # continue after the last answer: a new turn
        parts.append(" Assistant:")
    return "".join(parts)


def _knows_think_tag(tokenizer: Any) -> bool:
    lookup = getattr(tokenizer, "token_id", None)
    if lookup is None:
        return True  # cannot tell: follow the caller
    try:
        lookup(THINK_OPEN)
    except KeyError:
        return False
    return True


def render_chat_prompt(tokenizer: Any, messages: Sequence[dict], *, template: str = "auto",
                       force_think: bool = True, tools: Sequence[dict] | None = None) -> RenderedPrompt:
    """Prompt text for a conversation (`messages`: {"role", "content": str}, roles system / developer /
    user / assistant / tool; assistant turns hold only the final answers, since DeepSeek advises dropping
    earlier reasoning from the history, plus "tool_calls" ([{"id", "type": "function", "function": {"name",
    "arguments": dict}}]) when they called functions; tool turns also carry "tool_call_id").

    `tools` (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]) reach the
    model's chat template as its `tools` variable, the way transformers passes them; a tokenizer with no
    template of its own renders `hermes_chatml`. Function calling always takes the chat format (see
    `choose_template`).

    With `force_think` the prompt ends with an open think block (unless the chat template already ends
    with one, as the newer R1-distill templates do) and the result says `starts_in_think`. A tokenizer
    without a `<think>` token belongs to a model that was never taught to think in tags: nothing is forced.
    """
    with_tools = uses_tools(messages, tools)
    chosen = choose_template(tokenizer, template, with_tools=with_tools)
    force_think = force_think and _knows_think_tag(tokenizer)
    if chosen == "chat":
        if not with_tools:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        elif getattr(tokenizer, "has_own_chat_template", False):
            # tools=None when only the history has calls, as transformers passes it (templates test `tools is not none`)
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                 tools=list(tools) if tools else None)
        else:
            text = hermes_chatml(messages, tools)
        prefix = CHAT_THINK_PREFIX
    else:
        text = _r1_zero_conversation(messages)
        prefix = R1_ZERO_THINK_PREFIX
    opened = text.rstrip().endswith(THINK_OPEN)
    if force_think and not opened:
        text += prefix
    return RenderedPrompt(text, force_think or opened, chosen)
