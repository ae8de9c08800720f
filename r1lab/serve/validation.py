"""Request validation for the HTTP server: every check a request passes before it reaches the engine, and
the error it gets when it fails one, shaped like OpenAI's ({"error": {"message", "type", "param", "code"}},
status 400 unless said otherwise).

Pure Python (no FastAPI), so the rules can be read, and tested, without a server: `parse_messages`,
`parse_tools` and `parse_sampling` read the JSON body; `check_model`, `completion_prompts` and `token_budget`
check it against what the served model allows (its name, vocabulary and context length).

Hostile sizes are refused before they cost anything: the body's size is capped while it is read
(`body_too_large`, 413), JSON nested too deeply for the parser is a 400 (`parse_json_body`), and a prompt with
more characters than `max_model_len` tokens can hold is refused before it is tokenized (`check_prompt_chars`,
with the bound from `chars_per_token_bound`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import ServerConfig

__all__ = ["RequestError", "Sampling", "body_too_large", "chars_per_token_bound", "check_model", "check_prompt_chars",
           "completion_prompts", "encode", "parse_json_body", "parse_messages", "parse_sampling", "parse_tools",
           "token_budget", "Tools"]


class RequestError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def body_too_large(limit: int, size: int | None = None) -> RequestError:
    """413 for a body above `limit` bytes; `size` is the declared Content-Length, if there was one (a body
    read in pieces is refused at the first piece past the limit, so its full size is never known)."""
    size_text = f"is {size} bytes" if size is not None else f"is over {limit} bytes"
    return RequestError(f"The request body {size_text}; this server accepts at most {limit} bytes "
                        "(ServerConfig.max_body_bytes)", code="request_too_large", status=413)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"We could not parse the JSON body of your request: {error}") from None
    except RecursionError:
        # json's C parser recurses once per level and stops at the interpreter's recursion limit; left
        # unhandled this was a 500 (and Starlette closes the connection after one)
        raise RequestError("We could not parse the JSON body of your request: it nests arrays/objects more "
                           "deeply than this server parses") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def check_model(body: dict, served: str) -> None:
    """`model`, if given, must be the id this server serves (404 model_not_found otherwise)."""
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(f"The model '{model}' does not exist; this server serves '{served}'",
                           param="model", code="model_not_found", status=404)


_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text_content(content: Any, param: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{param}[{i}] must be a text part {{'type': 'text', 'text': ...}}; this "
                                   "server handles text only", param=f"{param}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts", param=param)


def _arguments_object(value: Any, param: str) -> dict:
    """A tool call's `arguments` (JSON text of an object, as OpenAI sends them) as the object itself: chat
    templates write it into the prompt with `tojson`, and transformers' convention is a dict there (a string
    would be written as a quoted, escaped string)."""
    try:
        arguments = json.loads(value) if isinstance(value, str) else None
    except (json.JSONDecodeError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError(f"{param} must be a string holding a JSON object, got {value!r:.80}", param=param)
    return arguments


def _tool_calls(value: Any, param: str) -> list[dict]:
    """An assistant message's `tool_calls` → [{"id", "type": "function", "function": {"name", "arguments":
    dict}}] (the shape chat templates expect)."""
    if not isinstance(value, list):
        raise RequestError(f"{param} must be a list of tool calls", param=param)
    calls = []
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise RequestError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                               "'arguments': ...}}}}", param=where)
        if not isinstance(call.get("id"), str):
            raise RequestError(f"{where}.id must be a string", param=f"{where}.id")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        calls.append({"id": call["id"], "type": "function", "function": {
            "name": function["name"],
            "arguments": _arguments_object(function.get("arguments"), f"{where}.function.arguments")}})
    return calls


def parse_messages(value: Any) -> list[dict]:
    """`messages` → [{"role", "content": str}], plus "tool_calls" on an assistant message that made calls
    (see `_tool_calls`) and "tool_call_id" on a tool message."""
    if value is None:
        raise RequestError("you must provide a 'messages' parameter", param="messages",
                           code="missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {list(_CHAT_ROLES)}, got {role!r}",
                               param=f"messages[{i}].role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        parsed = {"role": role, "content": _text_content(content, f"messages[{i}].content")}
        if role == "assistant" and message.get("tool_calls"):
            parsed["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"messages[{i}].tool_call_id must be the id of the tool call this message "
                                   "answers", param=f"messages[{i}].tool_call_id")
            parsed["tool_call_id"] = call_id
        messages.append(parsed)
    if not any(m["role"] == "user" for m in messages):
        raise RequestError("'messages' must contain at least one user message", param="messages")
    return messages


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass
class Tools:
    """A chat request's function-calling fields, validated."""

    definitions: list[dict]
    """`tools` as chat templates receive them: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}] ([] when none)."""
    choice: str
    """`tool_choice`: "auto" (the model decides; calls are parsed) or "none" (nothing is parsed)."""

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.definitions)

    @property
    def parses_calls(self) -> bool:
        """Whether the answer's <tool_call> blocks become `tool_calls`."""
        return bool(self.definitions) and self.choice == "auto"


def parse_tools(body: dict) -> Tools:
    """`tools` and `tool_choice` of a chat request. "required" and a named function are refused: forcing a
    call needs constrained decoding, which this server does not do."""
    value = body.get("tools")
    if value is None:
        value = []
    if not isinstance(value, list):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}} objects",
                           param="tools")
    definitions: list[dict] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f"{where}.type must be 'function' (the only tool type this server knows)",
                               param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function must be an object with a 'name'", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                               param=f"{where}.function.name")
        if name in names:
            raise RequestError(f"{where}.function.name {name!r} is the name of an earlier tool too",
                               param=f"{where}.function.name")
        names.add(name)
        description, parameters = function.get("description"), function.get("parameters")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON Schema object",
                               param=f"{where}.function.parameters")
        definitions.append({"type": "function", "function": {
            "name": name, **({"description": description} if description is not None else {}),
            **({"parameters": parameters} if parameters is not None else {})}})
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    if choice == "required" or isinstance(choice, dict):
        raise RequestError("'tool_choice' can be 'auto' or 'none' on this server: forcing a tool call "
                           "('required' or a named function) needs constrained decoding, which it does not do",
                           param="tool_choice", code="unsupported_value")
    if choice not in ("auto", "none"):
        raise RequestError(f"'tool_choice' must be 'auto' or 'none', got {choice!r}", param="tool_choice",
                           code="invalid_value")
    return Tools(definitions, choice)


@dataclass
class Sampling:
    """The sampling fields common to both endpoints, validated."""

    n: int
    temperature: float
    top_p: float
    top_k: int | None
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_sampling(body: dict, config: ServerConfig, limit: int) -> Sampling:
    def number(name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
        value = body.get(name)
        if value is None:
            return default
        if not _is_number(value) or not (low < value if low_open else low <= value) or value > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise RequestError(f"'{name}' must be a number in {interval}, got {value!r}", param=name,
                               code="invalid_value")
        return float(value)

    temperature = number("temperature", config.default_temperature, 0.0, 2.0)
    top_p = number("top_p", config.default_top_p, 0.0, 1.0, low_open=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise RequestError(f"'top_k' must be an integer >= -1 (-1 or 0: off), got {top_k!r}", param="top_k")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n) or not 1 <= n <= config.max_n:
        raise RequestError(f"'n' must be an integer in [1, {config.max_n}], got {n!r}", param="n", code="invalid_value")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise RequestError(f"'{name}' must be a positive integer, got {value!r}", param=name, code="invalid_value")
        if value > limit:
            raise RequestError(f"'{name}' is {value}, above this server's limit of {limit}", param=name,
                               code="invalid_value")
        max_tokens = value
        break
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of at most 16 non-empty strings",
                           param="stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", param="seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("'stream_options' must be an object and is only allowed with stream=true",
                           param="stream_options")
    unsupported = [name for name in ("logprobs", "top_logprobs", "echo", "suffix", "functions")
                   if body.get(name)] + (["best_of"] if body.get("best_of") not in (None, 1) else [])
    if unsupported:
        raise RequestError(f"'{unsupported[0]}' is not supported by this server", param=unsupported[0],
                           code="unsupported_parameter")
    return Sampling(n, temperature, top_p, None if not top_k or top_k < 1 else top_k, max_tokens, stop,
                    seed, stream, bool((options or {}).get("include_usage")))


def chars_per_token_bound(tokenizer: Any) -> int | None:
    """At most how many characters of input one token of `tokenizer` (an r1lab Tokenizer) stands for, so that
    a text of c characters has at least c / bound tokens; None if it cannot be told.

    The longest vocabulary entry, added tokens included: a byte-level BPE entry has one character per byte
    (and a character is at least one byte), a SentencePiece/WordPiece entry at least one per character
    ("##", "<0x41>" only add). A normalizer may shrink text before the model sees it (NFC/NFKC compose a
    few code points into one): with one, the bound is 4x, a margin no composition reaches; a normalizer that
    deletes whole runs of characters would break it."""
    backend = getattr(tokenizer, "backend", None)
    try:
        longest = max(map(len, backend.get_vocab(with_added_tokens=True)))
    except Exception:  # noqa: BLE001 - not an HF tokenizers backend: no bound, the exact check still applies
        return None
    return longest * (4 if getattr(backend, "normalizer", None) is not None else 1)


def check_prompt_chars(chars: int, chars_per_token: int | None, *, max_model_len: int, param: str) -> None:
    """Refuse, before tokenizing it, a prompt of `chars` characters that cannot fit in max_model_len tokens
    (it has at least chars / chars_per_token of them). Tokenizing costs about a second per megabyte: this
    keeps that cost to prompts that might be served."""
    if chars_per_token is not None and chars > max_model_len * chars_per_token:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, and the {param} alone has {chars} "
            f"characters: more than {max_model_len} tokens of at most {chars_per_token} characters each can hold",
            param=param, code="context_length_exceeded")


def encode(tokenizer: Any, texts: list[str], *, chat: bool) -> list[list[int]]:
    """Prompt ids of each text (the tokenizer's BOS rule; chat: a chat template rendered them). Through the
    batched `encode_prompts`: HF tokenizers' batch call lets go of the GIL while it works, the single `encode`
    does not, and a request handler's thread that holds the GIL for the second a megabyte takes stalls the
    event loop (every other request, /health) as surely as tokenizing on the loop itself."""
    return [list(ids) for ids in tokenizer.encode_prompts(texts, chat=chat)] if texts else []


def completion_prompts(value: Any, tokenizer: Any, vocab_size: int, *, max_model_len: int | None = None,
                       chars_per_token: int | None = None) -> list[list[int]]:
    """/v1/completions `prompt`: a string, a list of strings, a list of token ids, or a list of those.
    With max_model_len, a prompt longer than that is refused before it is tokenized where its length in
    characters (see check_prompt_chars) or in ids already says so; `token_budget` checks the rest."""
    if value is None:
        raise RequestError("you must provide a 'prompt' parameter", param="prompt",
                           code="missing_required_parameter")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError("'prompt' must be a string, a list of strings or a list of token-id lists",
                           param="prompt")
    prompts: list[list[int] | None] = []
    texts: dict[int, str] = {}
    for i, item in enumerate(value):
        if isinstance(item, str):
            if max_model_len is not None:
                check_prompt_chars(len(item), chars_per_token, max_model_len=max_model_len, param="prompt")
            texts[i] = item
            prompts.append(None)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            if any(not 0 <= t < vocab_size for t in item):
                raise RequestError(f"prompt[{i}] has token ids outside [0, {vocab_size})", param="prompt")
            prompts.append(list(item))
        else:
            raise RequestError(f"prompt[{i}] must be a string or a list of token ids", param="prompt")
    for i, ids in zip(texts, encode(tokenizer, list(texts.values()), chat=False)):
        prompts[i] = ids
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(f"prompt[{i}] is empty", param="prompt")
    return prompts


def token_budget(prompt_len: int, sampling: Sampling, *, max_model_len: int, limit: int, param: str,
                 default: int | None) -> int:
    """max_new_tokens for a prompt: the request's max_tokens (or `default`, else `limit`), checked against the
    context of max_model_len tokens; `param` names the prompt's field in the error."""
    free = max_model_len - prompt_len
    if sampling.max_tokens is None:
        wanted = min(default or limit, limit)
        if free < 1:
            raise RequestError(f"This model's maximum context length is {max_model_len} tokens, and the "
                               f"{param} alone has {prompt_len}", param=param, code="context_length_exceeded")
        return min(wanted, free)
    if prompt_len + sampling.max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + sampling.max_tokens} tokens ({prompt_len} in the {param}, {sampling.max_tokens} "
            "in the completion). Please reduce the length of the prompt or the completion.",
            param=param, code="context_length_exceeded")
    return sampling.max_tokens
