"""Request validation (r1lab/serve/validation.py) on its own, without a server: what each check accepts, what it
fills in, and the OpenAI-shaped error it raises. The HTTP side of the same rules is in test_serve.py."""

from __future__ import annotations

import pytest

from r1lab.serve.server import ServerConfig
from r1lab.serve.validation import (
    RequestError,
    check_model,
    completion_prompts,
    parse_json_body,
    parse_messages,
    parse_sampling,
    token_budget,
)

CONFIG = ServerConfig(max_n=4, default_temperature=0.6, default_top_p=0.95)


class CharTokenizer:
    """One token per character (code point), BOS = 0, added to prompts no chat template rendered."""

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([0] if add_bos else []) + [ord(c) for c in text]

    def encode_prompts(self, texts, *, chat: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=not chat) for t in texts]


def raises(expected_param: str | None, fn, /, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as error:
        fn(*args, **kwargs)
    assert error.value.param == expected_param
    return error.value


def test_error_body_has_openais_shape():
    error = RequestError("bad", param="n", code="invalid_value")
    assert error.status == 400
    assert error.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n",
                                      "code": "invalid_value"}}


def test_json_body():
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{oops", b"[1]", b"\xff"):
        raises(None, parse_json_body, raw)


def test_model_id():
    check_model({}, "r1")
    check_model({"model": "r1"}, "r1")
    assert raises("model", check_model, {"model": "gpt"}, "r1").status == 404


def test_messages():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse_messages([{"role": "system", "content": "s"}, {"role": "assistant", "content": None},
                           {"role": "user", "content": parts}]) == [
        {"role": "system", "content": "s"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "ab"}]
    assert raises("messages", parse_messages, None).code == "missing_required_parameter"
    raises("messages", parse_messages, [{"role": "system", "content": "only a system prompt"}])
    raises("messages[0]", parse_messages, ["hi"])
    raises("messages[0].content[0]", parse_messages, [{"role": "user", "content": [{"type": "image_url"}]}])


def test_sampling_defaults_and_normalization():
    s = parse_sampling({}, CONFIG, limit=100)
    assert (s.n, s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop, s.seed, s.stream, s.include_usage) == (
        1, 0.6, 0.95, None, None, [], None, False, False)
    s = parse_sampling({"temperature": 0, "top_k": 0, "stop": "###", "max_completion_tokens": 7, "max_tokens": 99,
                        "stream": True, "stream_options": {"include_usage": True}, "best_of": 1}, CONFIG, limit=100)
    assert (s.temperature, s.top_k, s.stop, s.max_tokens, s.include_usage) == (0.0, None, ["###"], 7, True)
    assert parse_sampling({"top_k": 5}, CONFIG, limit=100).top_k == 5


@pytest.mark.parametrize("body, param", [
    ({"temperature": True}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"n": 5}, "n"),  # above max_n
    ({"max_tokens": 101}, "max_tokens"),  # above the limit
    ({"stop": ["a"] * 17}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"logprobs": True}, "logprobs"),
    ({"best_of": 2}, "best_of"),
])
def test_sampling_rejects(body, param):
    raises(param, parse_sampling, body, CONFIG, limit=100)


def test_completion_prompts():
    tok = CharTokenizer()
    assert completion_prompts("ab", tok, 1000) == [[0, 97, 98]]
    assert completion_prompts(["a", [5, 6]], tok, 1000) == [[0, 97], [5, 6]]
    assert completion_prompts([5, 6], tok, 1000) == [[5, 6]]
    assert raises("prompt", completion_prompts, None, tok, 1000).code == "missing_required_parameter"
    for bad in ([], [[5, 1000]], [[]], [{"x": 1}]):
        raises("prompt", completion_prompts, bad, tok, 1000)


def test_token_budget():
    s = parse_sampling({}, CONFIG, limit=50)
    assert token_budget(10, s, max_model_len=100, limit=50, param="prompt", default=None) == 50
    assert token_budget(10, s, max_model_len=100, limit=50, param="prompt", default=16) == 16
    assert token_budget(90, s, max_model_len=100, limit=50, param="prompt", default=None) == 10  # what is left
    assert raises("prompt", token_budget, 100, s, max_model_len=100, limit=50, param="prompt",
                  default=None).code == "context_length_exceeded"
    s = parse_sampling({"max_tokens": 20}, CONFIG, limit=50)
    assert token_budget(80, s, max_model_len=100, limit=50, param="messages", default=None) == 20
    raises("messages", token_budget, 81, s, max_model_len=100, limit=50, param="messages", default=None)
