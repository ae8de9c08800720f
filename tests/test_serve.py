"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server.

Two servers: one over a scripted engine (exact reasoning/content/usage, stop strings, crash isolation,
disconnects) and one over the real rollout engine with a tiny random model (wiring smoke tests, 64
concurrent streams through continuous batching, bad requests)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from r1lab.rollout import SamplingParams, StreamEvent
from r1lab.model import load_model_and_tokenizer
from r1lab.serve import ReasoningSplitter, render_chat_prompt
from r1lab.testing import build_random_checkpoint
from r1lab.serve.server import (
    BackgroundServer,
    ChoiceStream,
    EngineJob,
    EngineWorker,
    ServerConfig,
    _ChunkFormat,
    _delta,
    _EMPTY_DELTA,
    _json_text,
    _Outbox,
    _ROLE_DELTA,
    _Server,
    _Submission,
    create_app,
)

REASONING = "Two plus two is four."
ANSWER = "4"
SCRIPT = f"{REASONING}</think>\n\n<answer>{ANSWER}</answer>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
    return load_model_and_tokenizer(folder)


class ScriptedEngine:
    """Engine stand-in: every sample emits the tokens of SCRIPT + EOS, one per step. A prompt containing
    "POISON" makes the next step raise (as a crashing prefill would); "FOREVER" never emits EOS."""

    instances: list["ScriptedEngine"] = []

    def __init__(self, tokenizer, step_delay: float = 0.0):
        self.tokenizer, self.step_delay = tokenizer, step_delay
        self.script = tokenizer.encode(SCRIPT) + [tokenizer.eos_id]
        self.requests: dict[int, dict] = {}
        self.next_id = 0
        self.aborted: list[int] = []
        ScriptedEngine.instances.append(self)

    def add_request(self, prompt, params):
        text = self.tokenizer.decode(prompt)
        rid, self.next_id = self.next_id, self.next_id + 1
        self.requests[rid] = {"params": params, "poison": "POISON" in text, "forever": "FOREVER" in text,
                              "emitted": [0] * params.n, "open": set(range(params.n))}
        return rid

    def has_unfinished(self):
        return bool(self.requests)

    def abort(self, rid):
        if self.requests.pop(rid, None) is not None:
            self.aborted.append(rid)

    def step(self):
        if self.step_delay:
            time.sleep(self.step_delay)
        if any(r["poison"] for r in self.requests.values()):
            raise RuntimeError("scripted crash")
        events = []
        for rid, req in list(self.requests.items()):
            for sample in sorted(req["open"]):
                i = req["emitted"][sample]
                token = self.script[i % (len(self.script) - 1)] if req["forever"] else self.script[i]
                req["emitted"][sample] += 1
                reason = "stop" if token == self.tokenizer.eos_id else (
                    "length" if req["emitted"][sample] >= req["params"].max_new_tokens else None)
                if reason:
                    req["open"].discard(sample)
                events.append(StreamEvent(rid, sample, [token], [0.0], reason is not None, reason))
            if not req["open"]:
                del self.requests[rid]
        return events


@pytest.fixture(scope="module")
def scripted(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, model_name="scripted", max_model_len=256,
                     engine_factory=lambda: ScriptedEngine(tokenizer, step_delay=0.002))
    with BackgroundServer(app) as server:
        server.app = app
        server.client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        yield server


@pytest.fixture(scope="module")
def real(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, model_name="tiny", max_model_len=192, max_tokens_limit=64, max_num_seqs=64)
    with BackgroundServer(app) as server:
        server.app = app
        server.client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        yield server


def _prompt_tokens(tokenizer, content: str) -> int:
    rendered = render_chat_prompt(tokenizer, [{"role": "user", "content": content}])
    return len(tokenizer.encode_prompt(rendered.text, chat=rendered.template == "chat"))


# ------------------------------------------------------------------------------------ scripted engine
def test_chat_non_streaming_separates_reasoning_from_answer(scripted, tiny):
    tokenizer = tiny[1]
    r = scripted.client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "2+2?"}])
    message = r.choices[0].message
    assert message.reasoning_content == REASONING
    assert message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    script_tokens = len(tokenizer.encode(SCRIPT)) + 1  # the EOS is generated and counted, not shown
    assert r.usage.completion_tokens == script_tokens
    assert r.usage.prompt_tokens == _prompt_tokens(tokenizer, "2+2?")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "scripted"


def test_chat_streaming_deltas_and_usage(scripted, tiny):
    stream = scripted.client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "2+2?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (REASONING, ANSWER)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tiny[1].encode(SCRIPT)) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_stop_strings_and_length(scripted):
    r = scripted.client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}], n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER for c in r.choices)

    r = scripted.client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}],
                                                stop=["four"], n=2)
    assert all(c.message.reasoning_content == "Two plus two is" and c.message.content == "" for c in r.choices)
    assert all(c.finish_reason == "stop" for c in r.choices)

    r = scripted.client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}],
                                                max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == ""


def test_completions_endpoint(scripted):
    r = scripted.client.completions.create(model="scripted", prompt=["a", "b c"], n=2, max_tokens=64)
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == SCRIPT and c.finish_reason == "stop" for c in r.choices)
    stream = scripted.client.completions.create(model="scripted", prompt="a", max_tokens=64, stream=True)
    assert "".join(c.choices[0].text for c in stream) == SCRIPT


def test_crashing_request_fails_alone(scripted):
    client = scripted.client
    results = {}

    def healthy():
        results["healthy"] = client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "FOREVER"}], max_tokens=60)

    thread = threading.Thread(target=healthy)
    thread.start()
    time.sleep(0.05)  # the healthy request is decoding when the poison one arrives
    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "POISON"}])
    assert failure.value.response.json()["error"]["code"] == "engine_error"
    thread.join(30)
    assert results["healthy"].choices[0].finish_reason == "length"
    assert results["healthy"].usage.completion_tokens == 60  # resumed on the rebuilt engine, nothing lost
    after = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "2+2?"}])
    assert after.choices[0].message.content == ANSWER
    health = httpx.get(scripted.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["engine_failures"] >= 1


def test_client_disconnect_cancels_the_request(scripted):
    worker = scripted.app.state.server.worker
    with httpx.Client(timeout=30) as http:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "FOREVER"}], "max_tokens": 150,
                "stream": True}
        with http.stream("POST", scripted.base_url + "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
    deadline = time.monotonic() + 10
    while worker.active_jobs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.active_jobs == 0
    assert worker.engine.aborted  # the engine was told to free the request's slot
    assert not worker.engine.has_unfinished()


# ------------------------------------------------------------------------------------ batching of deliveries
class RecordingLoop:
    """Stands in for the event loop an _Outbox wakes: records the callbacks instead of running them."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, callback, *args):
        self.calls.append((callback, args))


def test_worker_wakes_the_event_loop_once_per_step(tiny):
    tokenizer = tiny[1]
    loop = RecordingLoop()
    outbox = _Outbox(loop)
    worker = EngineWorker(lambda: ScriptedEngine(tokenizer))
    worker.engine = worker.engine_factory()
    received = []
    for i in range(3):
        worker._add(EngineJob([1, 2], SamplingParams(max_new_tokens=8, n=2),
                              lambda payload, i=i: received.append((i, payload)), outbox))
    worker._step()
    worker._flush()
    assert len(loop.calls) == 1 and not received  # one wake-up for 3 requests x 2 samples; nothing ran yet
    worker._step()
    worker._flush()
    assert len(loop.calls) == 1  # the loop has not run: the second step rides on the pending wake-up
    callback, args = loop.calls.pop()
    callback(*args)
    assert [i for i, _ in received] == [0, 1, 2, 0, 1, 2]  # in order, each step's samples together
    assert all([s for s, *_ in payload] == [0, 1] for _, payload in received)
    worker._step()
    worker._flush()
    assert len(loop.calls) == 1


def test_tokens_of_several_steps_stream_as_one_delta(tiny):
    """Deliveries that piled up while the handler was busy become one delta per choice with the same text and
    usage as when they are taken one at a time; with stop strings too."""
    model, tokenizer = tiny
    server = _Server(model, tokenizer, ServerConfig(max_model_len=256), engine_factory=lambda: None)
    script = tokenizer.encode(SCRIPT) + [tokenizer.eos_id]
    deliveries = [[(0, [t], i == len(script) - 1, "stop" if i == len(script) - 1 else None)]
                  for i, t in enumerate(script)]

    def start(stops):
        choice = ChoiceStream(tokenizer, set(server.stop_ids), stops, ReasoningSplitter(starts_in_think=True))
        job = EngineJob([1], SamplingParams(max_new_tokens=64), lambda payload: None)
        submission = _Submission([job], [0])
        return submission, choice, server.run(submission, [choice])

    async def one_at_a_time(stops):
        submission, choice, updates = start(stops)
        out = []
        for payload in deliveries:
            submission.receive(0, payload)
            out.append(await updates.__anext__())
            if choice.finish_reason is not None:
                break
        await updates.aclose()
        return out, choice

    async def all_at_once(stops):
        submission, choice, updates = start(stops)
        for payload in deliveries:
            submission.receive(0, payload)
        return [u async for u in updates], choice

    for stops in ([], ["four"]):
        single, c1 = asyncio.run(one_at_a_time(stops))
        merged, c2 = asyncio.run(all_at_once(stops))
        assert len(merged) == 1 and len(merged[0]) == 1  # one batch, one entry for the one choice
        _, reasoning, content = merged[0][0]
        assert reasoning == "".join(r for batch in single for _, r, _ in batch)
        assert content == "".join(c for batch in single for _, _, c in batch)
        assert (c1.tokens, c1.finish_reason) == (c2.tokens, c2.finish_reason)
        if stops:
            assert (reasoning, content, c2.finish_reason) == ("Two plus two is", "", "stop")
            assert c2.tokens < len(script)  # counted up to the stop string, as one at a time does
        else:
            assert (reasoning, content, c2.tokens) == (REASONING, ANSWER, len(script))


def test_sse_events_are_the_json_of_the_chunk():
    head = {"id": "chatcmpl-1", "created": 7, "model": 'm\u00e9"x'}
    cases = [(_ROLE_DELTA, {"delta": {"role": "assistant", "content": ""}}, None),
             (_delta('a"\n\u4e2d', ""), {"delta": {"reasoning_content": 'a"\n\u4e2d'}}, None),
             (_delta("", "x\\y"), {"delta": {"content": "x\\y"}}, None),
             (_delta("r", "c"), {"delta": {"reasoning_content": "r", "content": "c"}}, None),
             (_EMPTY_DELTA, {"delta": {}}, "stop"),
             ('"text": ' + _json_text("t\u2028"), {"text": "t\u2028"}, "length")]
    for usage in (False, True):
        sse = _ChunkFormat(head, "chat.completion.chunk", usage)
        for body, members, finish in cases:
            choice = {"index": 3, **members, "logprobs": None, "finish_reason": finish}
            data = {**head, "object": "chat.completion.chunk", "choices": [choice], **({"usage": None} if usage else {})}
            assert sse.chunk(3, body, finish) == f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 65}, "max_tokens"),  # above max_tokens_limit
    ({"n": 0}, "n"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 10}, "messages"),  # context
    ({"stop": [""]}, "stop"),
])
def test_bad_chat_requests_get_openai_400(real, kwargs, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        real.client.chat.completions.create(**request)
    body = error.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"]
    assert set(body) == {"message", "type", "param", "code"}


def test_malformed_and_unknown_requests(real):
    base = real.base_url
    for raw in (b"{not json", b"[1, 2]"):
        r = httpx.post(base + "/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/chat/completions", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as error:
        real.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert error.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # token ids outside the vocabulary never reach the engine
        real.client.completions.create(model="tiny", prompt=[[1, 2, 10**6]], max_tokens=2)
    assert real.client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(base + "/nope").json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------------ real engine
def test_real_engine_chat_and_models(real, tiny):
    tokenizer = tiny[1]
    assert [m.id for m in real.client.models.list().data] == ["tiny"]
    r = real.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                            max_tokens=8, seed=1, stop=None)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.reasoning_content is not None
    assert r.usage.prompt_tokens == _prompt_tokens(tokenizer, "What is 2 + 3?")
    assert 1 <= r.usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8

    stream = real.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True},
                                                 n=2)
    chunks = list(stream)
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]
    assert 2 <= chunks[-1].usage.completion_tokens <= 12


def test_64_concurrent_streams_are_batched(real):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        return finish, usage.completion_tokens

    seeded = dict(model="tiny", messages=[{"role": "user", "content": "What is 7 + 8?"}], max_tokens=16,
                  temperature=1.0, seed=77, n=2)

    def texts(response):
        return [(c.message.reasoning_content, c.message.content) for c in response.choices]

    alone = texts(real.client.chat.completions.create(**seeded))  # nothing else running

    async def main():
        async with openai.AsyncOpenAI(base_url=real.base_url, api_key="x", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)), client.chat.completions.create(**seeded))

    engine = real.app.state.server.worker.engine
    steps_before, rows_before = engine.stats.decode_steps, engine.stats.decode_rows
    *results, busy = asyncio.run(main())
    # a seeded request samples the same completions amid 64 others as alone (its noise is keyed per sequence)
    assert texts(busy) == alone and alone[0] != alone[1]
    assert len(results) == 64 and all(f in ("stop", "length") and 1 <= n <= 8 for f, n in results)
    steps = engine.stats.decode_steps - steps_before
    assert steps < 64 * 8 / 4, "requests were not decoded together"
    assert (engine.stats.decode_rows - rows_before) / steps > 4
    health = httpx.get(real.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["active_requests"] == 0


def test_streaming_wire_format(real):
    """Raw SSE: `data: {...}` events, a chat.completion.chunk object each, ending with `data: [DONE]`."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", real.base_url + "/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        assert line.startswith("data: ")
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"
