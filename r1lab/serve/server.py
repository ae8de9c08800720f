"""An OpenAI-compatible HTTP server over the rollout engine, with R1's reasoning kept apart from the answer.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not), GET /v1/models,
GET /health. Chat responses carry `message.reasoning_content` (the inside of <think>...</think>) beside
`message.content` (the answer), in streaming as `delta.reasoning_content` / `delta.content`, the way
DeepSeek's API does; see `reasoning.py` for the exact splitting rules. Function calling: a chat request's
`tools` reach the model's chat template, and the `<tool_call>` blocks of its answer come back as
`message.tool_calls` (streaming: `delta.tool_calls`, each call whole) with finish_reason "tool_calls";
see `tools.py` for the parsing rules.

Concurrency: one `EngineWorker` thread (worker.py) owns the rollout `Engine` and is the only code that touches it.
Request handlers (asyncio) put commands on its queue; it runs `engine.step()` in a loop while there is
work, so concurrent requests share decode steps (continuous batching), and never waits for the event loop.
Each step's new tokens, for every request, go into one `_Outbox` and wake the event loop once
(`loop.call_soon_threadsafe`), not once per token or per request. A request's handler then takes everything
that arrived since it last ran: when the loop falls behind the engine (many streams, a slow client), the
tokens of several steps become one text delta, one SSE event per choice, and one write. So per-token work
(detokenizing, splitting reasoning from content, JSON, HTTP framing, the client's parsing) shrinks to
per-event work exactly when it would otherwise cap throughput; with the loop keeping up, every token is still
sent as soon as it is sampled. A client that disconnects mid-stream has its request aborted, which frees its
cache slots.

Failure isolation: requests are validated before they reach the engine (`validation.py`: 400 errors shaped
like OpenAI's). No request can hold the event loop (and with it every stream and /health) for long: the body
is read in pieces up to `max_body_bytes` (413 past it, or at once from its Content-Length), and parsing,
prompt rendering and tokenization, which take about a second per megabyte, run on a thread, after a prompt
with more characters than the context can hold in tokens was refused without being tokenized. A refused
request leaves its keep-alive connection usable (uvicorn discards what is left of a refused body).
If `engine.step()` raises anyway, the requests submitted since the last good step are the suspects: they
fail alone (500), the engine is rebuilt, and every other request resumes where it was (its prompt plus the
tokens generated so far become the new prompt). When no request was new, all requests in flight fail. The
server itself keeps running either way.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_EXTRA = "the HTTP server needs fastapi and uvicorn (base dependencies of r1lab): pip install fastapi uvicorn"
try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(f"{_EXTRA} ({missing})", name=missing.name) from None

import jinja2

from r1lab.rollout import SamplingParams

from .reasoning import (
    IncrementalDetokenizer,
    ReasoningSplitter,
    StopStringFilter,
    render_chat_prompt,
    uses_tools,
)
from .tools import ToolCall, ToolCallParser
from .validation import (
    RequestError,
    Sampling,
    Tools,
    body_too_large,
    chars_per_token_bound,
    check_model,
    check_prompt_chars,
    completion_prompts,
    encode,
    parse_json_body,
    parse_messages,
    parse_sampling,
    parse_tools,
    token_budget,
)
from .worker import (
    EngineFailure,
    EngineJob,
    EngineWorker,
    _Outbox,
    default_engine_factory,
)

logger = logging.getLogger("r1lab.serve")

__all__ = ["BackgroundServer", "EngineWorker", "RequestError", "ServerConfig", "create_app", "serve"]


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model_name: str = "r1lab"
    """The id clients pass as `model` (any other id gets 404 model_not_found)."""
    max_model_len: int | None = None
    """Prompt + completion tokens per sequence (the KV cache length); None: min(model positions, 4096)."""
    max_tokens_limit: int | None = None
    """Largest max_tokens a request may ask for; None: max_model_len."""
    max_num_seqs: int | None = None
    """Sequences decoded together (cache slots); None: 64 on CPU, 256 on CUDA. More requests wait."""
    max_n: int = 16
    """Largest `n` (choices per request)."""
    default_temperature: float = 0.6
    """Used when a request gives none: DeepSeek's recommendation for R1 (OpenAI's default would be 1.0)."""
    default_top_p: float = 0.95
    default_completions_max_tokens: int = 16
    """/v1/completions without max_tokens generates this many tokens, as OpenAI's legacy endpoint does."""
    template: str = "auto"
    """Chat prompt format: "auto", "chat" (the tokenizer's chat template) or "r1_zero" (see reasoning.py)."""
    force_think: bool = True
    """End chat prompts with an open <think> block (DeepSeek's advice for R1 models)."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Largest request body (413 above it). 2 MiB holds a 128k-token prompt as text or as token ids."""
    max_chars_per_token: int | None = None
    """A prompt with more characters than max_model_len times this is refused before it is tokenized; None:
    the tokenizer's longest vocabulary entry (validation.chars_per_token_bound), which no text can beat."""
    freeze_gc: bool = True
    """At startup, collect garbage once and `gc.freeze()` what is left (model, torch, libraries: some 10^5
    objects), so that later full collections skip it. Without this, a full collection while streaming scans
    them all and stalls every stream (measured ~0.2 s on CPU). Process-wide, until shutdown (`gc.unfreeze()`);
    meanwhile the cycle collector does not reclaim those objects (reference counting still frees them)."""


# --------------------------------------------------------------------------------------------------------
# One choice's text stream (consumer side, in the event loop)
# --------------------------------------------------------------------------------------------------------


class ChoiceStream:
    """Tokens of one choice → (reasoning delta, content delta) with stop strings applied. With a splitter
    (chat) text goes to reasoning/content; without one (completions) everything is content. With a
    tool-call parser the content's <tool_call> blocks are taken out of it and collected in `tool_calls`."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], stops: list[str], splitter: ReasoningSplitter | None,
                 tool_parser: ToolCallParser | None = None):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_ids = stop_ids
        self.stops = StopStringFilter(stops)
        self.splitter = splitter
        self.tool_parser = tool_parser
        self.tokens = 0
        self.finish_reason: str | None = None
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def push(self, token_ids: list[int], finished: bool, reason: str | None) -> tuple[str, str]:
        if self.finish_reason is not None:
            return "", ""  # tokens in flight after a stop string ended this choice
        self.tokens += len(token_ids)
        if finished and reason == "stop" and token_ids and token_ids[-1] in self.stop_ids:
            token_ids = token_ids[:-1]  # the stop token is counted but not shown
        text = self.detokenizer.add(token_ids)
        if finished:
            text += self.detokenizer.flush()
        text = self.stops.feed(text, final=finished)
        if self.stops.stopped:
            finished, reason = True, "stop"
        if self.splitter is None:
            reasoning, content = "", text
        else:
            delta = self.splitter.feed(text)
            if finished:
                last = self.splitter.finish()
                delta.reasoning += last.reasoning
                delta.content += last.content
            reasoning, content = delta.reasoning, delta.content
        if self.tool_parser is not None:
            content = self.tool_parser.feed(content, final=finished)
        if finished:
            # a truncated answer stays "length" even with calls: the client should know it was cut
            self.finish_reason = "length" if reason == "length" else "tool_calls" if self.tool_calls else "stop"
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls parsed so far, in the order written."""
        return self.tool_parser.calls if self.tool_parser is not None else []

    def message(self) -> dict:
        """The finished choice as a chat.completion `message`."""
        content = "".join(self.content)
        message = {"role": "assistant", "content": content,
                   "reasoning_content": "".join(self.reasoning) if self.splitter.saw_reasoning else None}
        if self.tool_calls:
            message["content"] = content or None  # OpenAI's null content beside tool calls
            message["tool_calls"] = [call.as_openai() for call in self.tool_calls]
        return message

    def push_many(self, pushes: Sequence[tuple[list[int], bool, str | None]]) -> tuple[str, str]:
        """Several deliveries' (token_ids, finished, finish_reason) at once, as one push of all their tokens.
        With stop strings they are pushed one by one instead: which push reveals the stop string decides how
        many tokens `usage` counts, and that must not depend on how deliveries were batched."""
        if len(pushes) == 1:
            return self.push(*pushes[0])
        if self.stops.stops or any(finished for _, finished, _ in pushes[:-1]):
            reasoning, content = [], []
            for tokens, finished, reason in pushes:
                r, c = self.push(tokens, finished, reason)
                reasoning.append(r)
                content.append(c)
            return "".join(reasoning), "".join(content)
        _, finished, reason = pushes[-1]
        return self.push([t for tokens, _, _ in pushes for t in tokens], finished, reason)


@dataclass(eq=False)
class _Submission:
    """What one HTTP request put into the worker: its jobs, where each job's samples land, and the
    deliveries (job number, payload) that arrived and were not taken yet."""

    jobs: list[EngineJob] = field(default_factory=list)
    first_choice: list[int] = field(default_factory=list)
    pending: list[tuple[int, Any]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def receive(self, number: int, payload: Any) -> None:
        """(In the event loop.) A delivery for job `number`."""
        self.pending.append((number, payload))
        self.ready.set()

    async def take(self) -> list[tuple[int, Any]]:
        """Every delivery that arrived since the last take (waits for at least one)."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        items, self.pending = self.pending, []
        return items


# --------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------


class _Server:
    """State behind the routes: model facts, the worker, and the request → engine plumbing."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig,
                 engine_factory: Callable[[], Any] | None) -> None:
        self.tokenizer, self.config = tokenizer, config
        args = model.args
        cuda = model.lm_head.weight.is_cuda
        self.max_model_len = config.max_model_len or min(args.max_position_embeddings, 4096)
        self.limit = min(config.max_tokens_limit or self.max_model_len, self.max_model_len)
        self.vocab_size = args.vocab_size
        self.chars_per_token = config.max_chars_per_token or chars_per_token_bound(tokenizer)
        self.stop_ids = sorted(set(tokenizer.stop_ids) | set(args.stop_token_ids))
        num_seqs = config.max_num_seqs or (256 if cuda else 64)
        self.worker = EngineWorker(engine_factory or default_engine_factory(model, num_seqs, self.max_model_len))
        self.created = int(time.time())
        self._outbox: _Outbox | None = None  # the worker → event loop hand-off (one per loop)

    # -- request → prompts (on a thread: see read_prepared) -----------------------------------------------------
    def prepare_chat(self, raw: bytes) -> tuple[Sampling, Any, list[int], int, Tools]:
        """A chat request's body → (sampling, rendered prompt, prompt ids, max_new_tokens, tools)."""
        config = self.config
        body = parse_json_body(raw)
        check_model(body, config.model_name)
        messages = parse_messages(body.get("messages"))
        tools = parse_tools(body)
        sampling = parse_sampling(body, config, self.limit)
        if config.template == "r1_zero" and uses_tools(messages, tools.definitions):
            raise RequestError("function calling needs a chat template, and this server renders R1-Zero prompts "
                               "(ServerConfig.template='r1_zero')", param="tools" if tools.definitions else "messages")
        try:
            rendered = render_chat_prompt(self.tokenizer, messages, template=config.template,
                                          force_think=config.force_think, tools=tools.definitions)
        except jinja2.TemplateError as error:
            # templates refuse conversations they cannot write (raise_exception), e.g. a tool message to a
            # model without function calling: the request's fault, not the server's
            raise RequestError(f"the model's chat template refused these messages: {error}",
                               param="messages") from None
        check_prompt_chars(len(rendered.text), self.chars_per_token, max_model_len=self.max_model_len,
                           param="messages")
        [prompt] = encode(self.tokenizer, [rendered.text], chat=rendered.template == "chat")
        budget = token_budget(len(prompt), sampling, max_model_len=self.max_model_len, limit=self.limit,
                              param="messages", default=None)
        return sampling, rendered, prompt, budget, tools

    def prepare_completions(self, raw: bytes) -> tuple[Sampling, list[list[int]], list[int]]:
        """A completions request's body → (sampling, prompt ids, max_new_tokens of each prompt)."""
        config = self.config
        body = parse_json_body(raw)
        check_model(body, config.model_name)
        sampling = parse_sampling(body, config, self.limit)
        prompts = completion_prompts(body.get("prompt"), self.tokenizer, self.vocab_size,
                                     max_model_len=self.max_model_len, chars_per_token=self.chars_per_token)
        budgets = [token_budget(len(p), sampling, max_model_len=self.max_model_len, limit=self.limit,
                                param="prompt", default=config.default_completions_max_tokens) for p in prompts]
        return sampling, prompts, budgets

    # -- submission -----------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], sampling: Sampling, max_new_tokens: list[int]) -> _Submission:
        """One job per prompt with all n samples (they share the prefill), or, when stop strings may end a
        sample early, one job per sample, so that finishing one frees its slot without touching its siblings."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        submission = _Submission()
        split = bool(sampling.stop) and sampling.n > 1
        jobs, first = submission.jobs, submission.first_choice
        for p, (prompt, budget) in enumerate(zip(prompts, max_new_tokens)):
            for s in range(sampling.n) if split else [0]:
                params = SamplingParams(
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_new_tokens=budget, stop_token_ids=list(self.stop_ids), n=1 if split else sampling.n,
                    # prompt p as generate() seeds it; split samples get seeds of their own
                    seed=None if sampling.seed is None else sampling.seed + p + s * len(prompts))
                number = len(jobs)

                def deliver(payload: Any, number: int = number) -> None:
                    submission.receive(number, payload)

                jobs.append(EngineJob(prompt, params, deliver, self._outbox))
                first.append(p * sampling.n + s)
        for job in jobs:
            self.worker.submit(job)
        return submission

    def cancel(self, submission: _Submission) -> None:
        for job in submission.jobs:
            self.worker.cancel(job)

    async def run(self, submission: _Submission,
                  choices: list[ChoiceStream]) -> AsyncIterator[list[tuple[int, str, str]]]:
        """Lists of (choice index, reasoning delta, content delta) as tokens arrive, one list per batch of
        deliveries: everything that arrived since the previous list, with one entry per choice that advanced
        (its tokens of several engine steps decoded together). Ends when every choice finished. Raises
        EngineFailure if the engine failed on this request (after the text that arrived before the failure).
        Cancels the jobs if abandoned."""
        finished_jobs = 0
        open_choices = [set(range(job.params.n)) for job in submission.jobs]
        try:
            while finished_jobs < len(submission.jobs):
                failure: Exception | None = None
                arrived: dict[int, tuple[int, int, list]] = {}  # choice → (job number, sample, [pushes])
                for number, payload in await submission.take():
                    if isinstance(payload, Exception):
                        failure = payload
                        break
                    first = submission.first_choice[number]
                    for sample, tokens, finished, reason in payload:
                        index = first + sample
                        entry = arrived.get(index)
                        if entry is None:
                            arrived[index] = (number, sample, [(tokens, finished, reason)])
                        else:
                            entry[2].append((tokens, finished, reason))
                updates = []
                for index, (number, sample, pushes) in arrived.items():
                    choice = choices[index]
                    if choice.finish_reason is not None:
                        continue
                    reasoning, content = choice.push_many(pushes)
                    updates.append((index, reasoning, content))
                    if choice.finish_reason is not None:
                        open_choices[number].discard(sample)
                        if not open_choices[number]:
                            finished_jobs += 1
                            if choice.stops.stopped:  # a stop string ended it; the engine may still run it
                                self.worker.cancel(submission.jobs[number])
                if updates:
                    yield updates
                if failure is not None:
                    raise failure
        except BaseException:
            self.cancel(submission)  # disconnect, failure or shutdown: free the slots
            raise


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_json_text = json.JSONEncoder(ensure_ascii=False).encode  # a str → its JSON string literal (C encoder)
_ROLE_DELTA = '"delta": {"role": "assistant", "content": ""}'
_EMPTY_DELTA = '"delta": {}'


def _delta(reasoning: str, content: str) -> str:
    """The `"delta": {...}` member of a chat chunk carrying text (either field may be "": it is left out)."""
    if not reasoning:
        return '"delta": {"content": ' + _json_text(content) + "}"
    if not content:
        return '"delta": {"reasoning_content": ' + _json_text(reasoning) + "}"
    return '"delta": {"reasoning_content": ' + _json_text(reasoning) + ', "content": ' + _json_text(content) + "}"


def _tool_call_delta(position: int, call: ToolCall) -> str:
    """The `"delta": {...}` member of a chat chunk carrying one whole call; `position`: the call's number in
    its choice (OpenAI's `index`, by which clients join a call's pieces; here there is one piece)."""
    return '"delta": {"tool_calls": ' + json.dumps([{"index": position, **call.as_openai()}], ensure_ascii=False) + "}"


class _ChunkFormat:
    """SSE events of one streamed response, `data: {head..., "object": kind, "choices": [{"index": i, <body>,
    "logprobs": null, "finish_reason": ...}](, "usage": null)}`: the same JSON as json.dumps of that dict,
    with the constant parts rendered once per response instead of once per event."""

    def __init__(self, head: dict, kind: str, include_usage: bool) -> None:
        fixed = json.dumps({**head, "object": kind}, ensure_ascii=False)
        self._open = "data: " + fixed[:-1] + ', "choices": [{"index": '
        self._close = '}], "usage": null}\n\n' if include_usage else "}]}\n\n"

    def chunk(self, index: int, body: str, finish_reason: str | None = None) -> str:
        """`body`: the choice's members before "logprobs", e.g. '"delta": {...}' or '"text": "..."'."""
        finish = "null" if finish_reason is None else _json_text(finish_reason)
        return f'{self._open}{index}, {body}, "logprobs": null, "finish_reason": {finish}{self._close}'


def create_app(model: Any, tokenizer: Any, *, model_name: str = "r1lab", max_model_len: int | None = None,
               max_tokens_limit: int | None = None, engine_factory: Callable[[], Any] | None = None,
               **options: Any):
    """A FastAPI app serving `model` (an r1lab Transformer) with `tokenizer` (r1lab Tokenizer).

    Options are ServerConfig fields (max_num_seqs, max_n, default_temperature, default_top_p, template,
    force_think, ...). `engine_factory` builds the engine the worker owns (tests script one); by default a
    rollout Engine with max_num_seqs slots of max_model_len positions. The worker thread starts with the app
    (or at the first request) and stops at shutdown; `app.state.server.worker` exposes it.
    """
    from contextlib import asynccontextmanager

    config = ServerConfig(model_name=model_name, max_model_len=max_model_len, max_tokens_limit=max_tokens_limit,
                          **options)
    if config.max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {config.max_body_bytes}")
    server = _Server(model, tokenizer, config, engine_factory)

    @asynccontextmanager
    async def lifespan(_app):
        server.worker.start()
        if config.freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if config.freeze_gc:
                gc.unfreeze()  # let interpreter shutdown collect them as usual
            await asyncio.to_thread(server.worker.stop)

    app = FastAPI(title="r1lab", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def request_error(_request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(RequestError(str(error.detail), code=code, status=error.status_code).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        return JSONResponse(RequestError(f"invalid request: {error.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        logger.exception("unhandled error")
        body = RequestError(f"internal server error: {type(error).__name__}: {error}", type="server_error",
                            status=500).body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        if server.worker.error is not None:
            return JSONResponse({"status": "error", "message": f"the engine worker stopped: {server.worker.error}"},
                                status_code=503)
        return {"status": "ok", "active_requests": server.worker.active_jobs, "engine_steps": server.worker.steps,
                "engine_failures": server.worker.failures}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": server.created,
                                            "owned_by": "r1lab", "max_model_len": server.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        sampling, rendered, prompt, budget, tools = await read_prepared(request, server.prepare_chat)
        choices = [ChoiceStream(tokenizer, set(server.stop_ids), sampling.stop,
                                ReasoningSplitter(starts_in_think=rendered.starts_in_think),
                                ToolCallParser(tools.names) if tools.parses_calls else None)
                   for _ in range(sampling.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        submission = server.submit([prompt], sampling, [budget])
        if sampling.stream:
            return _stream(request, submission, choices, sampling, head, len(prompt), chat=True)
        await _collect(request, submission, choices)
        return {**head, "object": "chat.completion", "choices": [
            {"index": i, "message": c.message(), "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], "usage": _usage(len(prompt), choices)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        sampling, prompts, budgets = await read_prepared(request, server.prepare_completions)
        choices = [ChoiceStream(tokenizer, set(server.stop_ids), sampling.stop, None)
                   for _ in range(len(prompts) * sampling.n)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        prompt_tokens = sum(len(p) for p in prompts)
        submission = server.submit(prompts, sampling, budgets)
        if sampling.stream:
            return _stream(request, submission, choices, sampling, head, prompt_tokens, chat=False)
        await _collect(request, submission, choices)
        return {**head, "object": "text_completion", "choices": [
            {"index": i, "text": "".join(c.content), "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], "usage": _usage(prompt_tokens, choices)}

    async def read_prepared(request: Request, prepare: Callable[[bytes], Any]) -> Any:
        """`prepare(body)` of the request's body, read up to max_body_bytes. Bodies past a few KiB are
        prepared on a thread: the cheap bounds (body size, prompt characters) still leave up to a second
        or so of parsing and tokenizing for a legal one, which must not stop the event loop."""
        raw = await read_body(request, config.max_body_bytes)
        if len(raw) <= _INLINE_BODY_BYTES:
            return prepare(raw)
        return await asyncio.to_thread(prepare, raw)

    async def _collect(request: Request, submission: _Submission, choices: list[ChoiceStream]) -> None:
        """Run a non-streaming request to the end; a client that went away cancels it."""
        async def drain() -> None:
            async for _ in server.run(submission, choices):
                pass

        task = asyncio.ensure_future(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    break
            error = task.exception() if task.done() and not task.cancelled() else None
        finally:
            if not task.done():
                task.cancel()
        if isinstance(error, EngineFailure):
            raise RequestError(str(error), type="server_error", code="engine_error", status=500)
        if error is not None:
            raise error

    def _stream(request: Request, submission: _Submission, choices: list[ChoiceStream], sampling: Sampling,
                head: dict, prompt_tokens: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        sse = _ChunkFormat(head, kind, sampling.include_usage)

        async def events() -> AsyncIterator[str]:
            # One write per batch of deliveries: the SSE events of every choice that advanced, joined.
            calls_sent = [0] * len(choices)
            try:
                if chat:
                    yield "".join(sse.chunk(i, _ROLE_DELTA) for i in range(len(choices)))
                async for updates in server.run(submission, choices):
                    out = []
                    for index, reasoning, content in updates:
                        finish_reason = choices[index].finish_reason
                        if chat:
                            if reasoning or content:
                                out.append(sse.chunk(index, _delta(reasoning, content)))
                            calls = choices[index].tool_calls
                            for position in range(calls_sent[index], len(calls)):
                                out.append(sse.chunk(index, _tool_call_delta(position, calls[position])))
                            calls_sent[index] = len(calls)
                            if finish_reason is not None:
                                out.append(sse.chunk(index, _EMPTY_DELTA, finish_reason))
                        elif content or finish_reason is not None:
                            out.append(sse.chunk(index, '"text": ' + _json_text(content), finish_reason))
                    if out:
                        yield "".join(out)
                if sampling.include_usage:
                    yield _sse({**head, "object": kind, "choices": [], "usage": _usage(prompt_tokens, choices)})
            except EngineFailure as error:
                yield _sse(RequestError(str(error), type="server_error", code="engine_error", status=500).body())
            yield "data: [DONE]\n\n"

        return ClosingStreamingResponse(events(), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


_INLINE_BODY_BYTES = 4 * 1024
"""Bodies up to this size are prepared on the event loop: a few milliseconds at most, tokenizing included,
about what a hop to a thread costs when the engine thread contends for the GIL; and they never queue
behind big bodies in the thread pool."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 RequestError once it passes `limit` bytes: at once when its Content-Length says so
    (the body is never read, and a client that sent `Expect: 100-continue` never sends it), else at the first
    piece past the limit, so nothing more than `limit` bytes is ever held."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator however the response ends (a disconnect may leave it suspended), so the
    generator's cleanup (cancelling the request in the engine) runs now rather than at garbage collection."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _usage(prompt_tokens: int, choices: Sequence[ChoiceStream]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ModuleNotFoundError as missing:
        raise ModuleNotFoundError(f"{_EXTRA} ({missing})", name=missing.name) from None
    return uvicorn


def serve(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, *, device: str = "cpu",
          dtype: str = "auto", model_name: str | None = None, log_level: str = "info", **options: Any) -> None:
    """Load a model folder (None: the embedded default) and serve it with uvicorn until interrupted."""
    uvicorn = _uvicorn()

    from r1lab.model import DEFAULT_MODEL_DIR, load_model_and_tokenizer

    if not str(device).startswith("cuda"):
        # Leave a core to the HTTP event loop: torch's intra-op threads spin, and on a CPU where they
        # share every core with the event loop each decode step waits on them (measured: 20x slower on 2 cores).
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=dtype)
    from pathlib import Path

    name = model_name or Path(model_path or DEFAULT_MODEL_DIR).name
    app = create_app(model, tokenizer, model_name=name, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Serve an app with uvicorn on a thread (tests, benchmarks, notebooks): `with BackgroundServer(app) as s:`
    then talk to `s.base_url` ("http://127.0.0.1:PORT/v1"). The socket is bound before the thread starts
    (port 0 picks a free port), so there is no race for the port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket

        uvicorn = _uvicorn()

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
