"""Hostile and oversized requests against the real server (uvicorn on 127.0.0.1, the tiny random model): each
is refused with a 4xx in well under a second, /health keeps answering meanwhile, the refused request's
keep-alive connection carries the next one, and streams in flight finish. Before these bounds a 1 MB prompt
held the event loop for the whole tokenization, a 20 MB body was buffered whole (RSS +3 GB) and a
200k-deep JSON body was a 500 that closed the connection.

Every request goes to 127.0.0.1 only, every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest

from r1lab.model import load_model_and_tokenizer
from r1lab.serve.server import BackgroundServer, create_app
from r1lab.serve.validation import (
    RequestError,
    body_too_large,
    chars_per_token_bound,
    check_prompt_chars,
    completion_prompts,
    encode,
    parse_json_body,
)
from r1lab.testing import build_random_checkpoint

MiB = 1024 * 1024
LIMIT = 2 * MiB  # ServerConfig.max_body_bytes by default
FAST = 1.0  # seconds a refusal may take
HEALTHY = 0.5  # seconds /health may take while an attack is handled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
    return load_model_and_tokenizer(folder)


@pytest.fixture(scope="module")
def real(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, model_name="tiny", max_model_len=192, max_tokens_limit=64, max_num_seqs=64)
    with BackgroundServer(app) as server:
        server.root = server.base_url.removesuffix("/v1")
        yield server


class IdleEngine:
    """An engine with nothing to do, for a server whose requests are all refused before they reach it."""

    def has_unfinished(self):
        return False


class HealthProbe:
    """Polls GET /health on its own connection every 10 ms while the block runs; `worst` is the slowest answer.
    A request that stalls the event loop shows here as one slow answer (or a timeout, counted as a failure)."""

    def __init__(self, root: str):
        self.root, self.latencies, self.failures = root, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(self.root + "/health").status_code
                    if status != 200:
                        self.failures.append(status)
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                self.latencies.append(time.monotonic() - start)
                self._stop.wait(0.01)

    @property
    def worst(self) -> float:
        return max(self.latencies)

    def _answers(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the probe has n answers (a loaded machine may take a while to open its connection)."""
        deadline = time.monotonic() + timeout
        while len(self.latencies) + len(self.failures) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        self._answers(1)  # a first answer before the attack
        self._mark = len(self.latencies) + len(self.failures)
        return self

    def __exit__(self, *exc):
        self._answers(self._mark + 2)  # answers that overlapped the attack or came right after it
        self._stop.set()
        self._thread.join(10)


def _chat(content: str) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()


def _deep(depth: int, endpoint_field: str) -> bytes:
    return (f'{{"model": "tiny", "{endpoint_field}": '.encode() + b"[" * depth + b"]" * depth + b"}")


# Digits are the tiny tokenizer's slowest text (one pre-token each): ~2 s per MB here, so a server that
# tokenizes on its event loop fails these checks by a wide margin rather than by a hair.
DIGITS = "0123456789" * (MiB // 10)

# Each: (name, endpoint, body, chunked, status, error code, param). Bodies are built once, before any probe runs,
# so that building them in the test's threads does not count against the server.
ATTACKS = [
    ("1 MB chat prompt", "/chat/completions", _chat(DIGITS), False, 400, "context_length_exceeded", "messages"),
    ("1 MB completions prompt", "/completions",
     json.dumps({"model": "tiny", "prompt": DIGITS, "max_tokens": 2}).encode(), False, 400,
     "context_length_exceeded", "prompt"),
    ("20 MB body", "/chat/completions", _chat("a" * (20 * MiB)), False, 413, "request_too_large", None),
    ("20 MB chunked body", "/chat/completions", _chat("a" * (20 * MiB)), True, 413, "request_too_large", None),
    ("200k-deep chat JSON", "/chat/completions", _deep(200_000, "messages"), False, 400, None, None),
    ("200k-deep completions JSON", "/completions", _deep(200_000, "prompt"), False, 400, None, None),
]


def _send(client: httpx.Client, url: str, body: bytes, chunked: bool) -> httpx.Response:
    # a generator has no length: httpx sends it chunked, so only reading it tells the server its size
    content = (body[i:i + 256 * 1024] for i in range(0, len(body), 256 * 1024)) if chunked else body
    return client.post(url, content=content, headers={"content-type": "application/json"})


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("name, endpoint, body, chunked, status, code, param", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_fast_and_health_keeps_answering(real, name, endpoint, body, chunked, status, code, param):
    with httpx.Client(timeout=30) as client:
        before = client.get(real.root + "/health")
        with HealthProbe(real.root) as probe:
            start = time.monotonic()
            response = _send(client, real.base_url + endpoint, body, chunked)
            took = time.monotonic() - start
        assert response.status_code == status, response.text[:300]
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert (error["code"], error["param"]) == (code, param)
        assert error["message"] and "\n" not in error["message"]
        assert took < FAST, f"{name}: answered after {took:.2f} s"
        assert not probe.failures and probe.worst < HEALTHY, f"/health took {probe.worst:.2f} s during {name}"
        # the refusal left the connection open: the next request rides on it and is served
        after = client.post(real.base_url + "/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
        assert _local_port(before) == _local_port(response) == _local_port(after)


def test_deep_json_message_says_what_is_wrong(real):
    response = httpx.post(real.base_url + "/chat/completions", content=_deep(5_000, "messages"))
    assert response.status_code == 400 and "nests arrays/objects more deeply" in response.json()["error"]["message"]
    # nesting the parser can take is an ordinary validation error, not a crash
    response = httpx.post(real.base_url + "/chat/completions", content=_deep(50, "messages"))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"


# ---------------------------------------------------------------------------------- the body limit on the wire
def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _connect(real) -> socket.socket:
    sock = socket.create_connection((real.host, real.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_declared_oversize_is_refused_before_the_body_is_sent(real):
    """A Content-Length over the limit is answered from the headers alone: the client never has to send the
    body (nor, with Expect: 100-continue, is it asked to)."""
    for expect in ("", "Expect: 100-continue\r\n"):
        with _connect(real) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"{expect}Content-Length: {20 * MiB}\r\n\r\n".encode())
            status, _, body = _read_response(sock)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        assert str(20 * MiB) in json.loads(body)["error"]["message"]


def test_streamed_oversize_is_refused_midway_and_the_connection_lives_on(real):
    """A chunked body is refused as soon as it passes the limit, while the client is still sending (nothing
    waits for, or holds, the whole body); once the client finishes it, the same connection serves again."""
    piece = b"a" * 65536
    with _connect(real) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for _ in range(LIMIT // len(piece) + 4):  # a little past the limit, and the body is not finished
            sock.sendall(frame)
        status, _, body = _read_response(sock)
        assert status == 413 and "over 2097152 bytes" in json.loads(body)["error"]["message"]
        for _ in range(64):  # the rest of a 6 MiB body, which the server discards as it arrives
            sock.sendall(frame)
        sock.sendall(b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"


# ---------------------------------------------------------------------------------- tokenizing off the loop
def test_big_legal_prompt_is_tokenized_off_the_event_loop(tiny):
    """A prompt the character bound lets through (the context is large) is tokenized in full, about a second
    for these 512 KiB of digits, then refused on its exact token count; /health answers throughout."""
    model, tokenizer = tiny
    app = create_app(model, tokenizer, model_name="tiny", max_model_len=300_000, engine_factory=IdleEngine)
    body = _chat(DIGITS[: MiB // 2])
    with BackgroundServer(app) as server, httpx.Client(timeout=30) as client:
        root = server.base_url.removesuffix("/v1")
        with HealthProbe(root) as probe:
            response = client.post(server.base_url + "/chat/completions", content=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded"
        prompt_tokens = int(error["message"].split("(")[1].split()[0])  # "... (N in the messages, ..."
        assert prompt_tokens > 300_000  # the exact count: the prompt really was tokenized
        assert not probe.failures and probe.worst < HEALTHY, f"/health took {probe.worst:.2f} s"


# ---------------------------------------------------------------------------------- streams under attack
def test_64_streams_finish_while_attacks_are_refused(real):
    """64 concurrent streams (the official client) all run to their end while every attack above is refused
    beside them; the 64-stream batching itself is checked in test_serve.py."""

    async def stream(client, i):
        chunks = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4, stream=True)
        finish = None
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    def attack():
        with httpx.Client(timeout=30) as client:
            return [_send(client, real.base_url + endpoint, body, chunked).status_code
                    for _, endpoint, body, chunked, *_ in ATTACKS]

    async def main():
        async with openai.AsyncOpenAI(base_url=real.base_url, api_key="x", max_retries=0, timeout=60) as client:
            return await asyncio.gather(asyncio.to_thread(attack), *(stream(client, i) for i in range(64)))

    statuses, *finishes = asyncio.run(main())
    assert statuses == [a[4] for a in ATTACKS]
    assert len(finishes) == 64 and all(f in ("stop", "length") for f in finishes)
    health = httpx.get(real.root + "/health").json()
    assert health["status"] == "ok" and health["active_requests"] == 0


# ---------------------------------------------------------------------------------- the bounds themselves
def test_chars_per_token_bound_holds_for_any_text(tiny):
    """No text has more characters than its token count times the bound, whatever it is made of: the
    pre-tokenization refusal never turns away a prompt that fits."""
    tokenizer = tiny[1]
    bound = chars_per_token_bound(tokenizer)
    vocab = list(tokenizer.backend.get_vocab(with_added_tokens=True))
    assert bound == max(map(len, vocab)) and 1 < bound < 64
    rng = random.Random(0)
    alphabet = list("abcdefghij 0123456789+=?\n\t") + ["  " * 8, "\u00e9", "\u4e2d", "\U0001f600", "e\u0301"]
    for _ in range(300):
        pieces = [rng.choice(alphabet) if rng.random() < 0.7 else rng.choice(vocab) for _ in range(rng.randint(1, 60))]
        text = "".join(pieces)
        assert len(text) <= len(tokenizer.encode(text)) * bound, repr(text)
    assert chars_per_token_bound(object()) is None  # no vocabulary to go by: no bound, only the exact check


def test_prompt_char_check_and_body_errors():
    check_prompt_chars(100, 10, max_model_len=10, param="prompt")  # exactly fits: 10 tokens of 10 characters
    check_prompt_chars(10**9, None, max_model_len=10, param="prompt")  # no bound known
    with pytest.raises(RequestError) as error:
        check_prompt_chars(101, 10, max_model_len=10, param="prompt")
    assert (error.value.param, error.value.code, error.value.status) == ("prompt", "context_length_exceeded", 400)
    error = body_too_large(100, 250)
    assert error.status == 413 and error.code == "request_too_large" and "250" in error.message
    with pytest.raises(RequestError) as failure:
        parse_json_body(b"[" * 100_000 + b"]" * 100_000)
    assert failure.value.status == 400 and "deeply" in failure.value.message


class CountingTokenizer:
    """One token per character; counts the characters it was asked to tokenize."""

    def __init__(self):
        self.seen = 0

    def encode(self, text, add_bos=False):
        self.seen += len(text)
        return ([0] if add_bos else []) + [ord(c) % 50 for c in text]

    def encode_prompts(self, texts, *, chat=False):
        return [self.encode(t, add_bos=not chat) for t in texts]


def test_completion_prompts_refuse_long_text_before_tokenizing():
    tokenizer = CountingTokenizer()
    with pytest.raises(RequestError) as error:
        completion_prompts(["ok", "y" * 1000], tokenizer, 50, max_model_len=100, chars_per_token=2)
    assert error.value.code == "context_length_exceeded" and tokenizer.seen == 0
    mixed = completion_prompts(["ab", [1, 2, 3], "c"], tokenizer, 50, max_model_len=100, chars_per_token=2)
    assert mixed == [[0, 47, 48], [1, 2, 3], [0, 49]]  # order kept across text and id prompts
    assert encode(tokenizer, [], chat=False) == []
