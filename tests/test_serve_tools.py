"""Function calling in the OpenAI-compatible server: `tools` in, `tool_calls` out, driven by the official
`openai` client against a real uvicorn server over a scripted engine whose answers (reasoning, then
Hermes-style <tool_call> blocks) are picked by a marker in the prompt; the prompts it received show what the
chat format rendered. Parser and prompt rendering are also tested on their own, without a server."""

from __future__ import annotations

import copy
import json
import time

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from r1lab.model import load_model_and_tokenizer
from r1lab.rollout import StreamEvent
from r1lab.serve.reasoning import hermes_chatml, render_chat_prompt
from r1lab.serve.server import BackgroundServer, ServerConfig, _Server, create_app
from r1lab.serve.tools import ToolCallParser
from r1lab.serve.validation import RequestError
from r1lab.testing import build_random_checkpoint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, CLOCK]

THOUGHT = "The user asks about Paris; the tool knows."


def _block(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


BAD_JSON_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
UNKNOWN_TOOL_BLOCK = _block("launch_rockets", {"count": 3})
FINAL_ANSWER = "It is 21 degrees in Paris."

# marker in the prompt → the completion the engine writes (after the prompt's forced "<think>\n")
SCRIPTS = {
    "@weather": f"{THOUGHT}</think>\n\nLet me check.\n{_block('get_weather', {'city': 'Paris'})}",
    "@two": f"{THOUGHT}</think>\n\n{_block('get_weather', {'city': 'Paris'})}\n"
            f"{_block('get_time', {'zone': 'Europe/Paris'})}",
    "@badjson": f"{THOUGHT}</think>\n\n{BAD_JSON_BLOCK}",
    "@unknown": f"{THOUGHT}</think>\n\n{UNKNOWN_TOOL_BLOCK}",
    "@done": f"{THOUGHT}</think>\n\n{FINAL_ANSWER}",
}


class ToolScriptedEngine:
    """Engine stand-in: each request's samples emit, one token per step, the tokens of the script whose marker
    comes last in the prompt, then EOS. Every prompt it was given is kept, as text, in `prompts`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompts: list[str] = []
        self.requests: dict[int, dict] = {}
        self.next_id = 0

    def add_request(self, prompt, params):
        text = self.tokenizer.decode(prompt)
        self.prompts.append(text)
        marker = max(SCRIPTS, key=text.rfind)
        assert marker in text, "a test prompt without a script marker"
        rid, self.next_id = self.next_id, self.next_id + 1
        script = self.tokenizer.encode(SCRIPTS[marker]) + [self.tokenizer.eos_id]
        self.requests[rid] = {"params": params, "script": script, "emitted": [0] * params.n,
                              "open": set(range(params.n))}
        return rid

    def has_unfinished(self):
        return bool(self.requests)

    def abort(self, rid):
        self.requests.pop(rid, None)

    def step(self):
        time.sleep(0.001)
        events = []
        for rid, req in list(self.requests.items()):
            for sample in sorted(req["open"]):
                token = req["script"][req["emitted"][sample]]
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
def tiny(tmp_path_factory):
    folder = build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
    return load_model_and_tokenizer(folder)


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    # the tools' system turn is longer than the tiny model's 512 positions; the scripted engine has no limit
    app = create_app(model, tokenizer, model_name="scripted", max_model_len=4096,
                     engine_factory=lambda: ToolScriptedEngine(tokenizer))
    with BackgroundServer(app) as background:
        background.engine = lambda: app.state.server.worker.engine
        background.client = openai.OpenAI(base_url=background.base_url, api_key="x", max_retries=0)
        yield background


def _ask(server, marker: str, **kwargs):
    request = {"model": "scripted", "messages": [{"role": "user", "content": f"{marker} Weather in Paris?"}],
               "tools": TOOLS, **kwargs}
    return server.client.chat.completions.create(**request)


def _stream(server, marker: str, **kwargs):
    """(the chunks, the completion ChatCompletionStreamState, openai's own accumulator, builds from them)."""
    chunks = list(_ask(server, marker, stream=True, stream_options={"include_usage": True}, **kwargs))
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    return chunks, state.get_final_completion()


def _calls(message) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]


def _script_tokens(tokenizer, marker: str) -> int:
    return len(tokenizer.encode(SCRIPTS[marker])) + 1  # the EOS is generated and counted


# ------------------------------------------------------------------------------------ responses
def test_a_tool_call_after_reasoning_streamed_or_not(server, tiny):
    response = _ask(server, "@weather")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == THOUGHT
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) > len("call_") and call.type == "function"
    assert _calls(choice.message) == [("get_weather", {"city": "Paris"})]
    assert response.usage.completion_tokens == _script_tokens(tiny[1], "@weather")

    chunks, streamed = _stream(server, "@weather")
    content_deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_deltas and not any("<" in d for d in content_deltas)  # no part of a <tool_call> tag leaks
    call_deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in call_deltas] == [(0, "get_weather")]
    assert call_deltas[0].id.startswith("call_") and call_deltas[0].type == "function"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]
    message = streamed.choices[0].message
    assert (message.content, _calls(message)) == ("Let me check.", _calls(choice.message))
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == THOUGHT


def test_two_tool_calls_in_one_answer(server):
    message = _ask(server, "@two").choices[0].message
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Europe/Paris"})]
    assert _calls(message) == expected
    assert message.content is None  # nothing outside the blocks
    assert len({call.id for call in message.tool_calls}) == 2
    chunks, streamed = _stream(server, "@two")
    indexes = [d.index for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert indexes == [0, 1]
    assert _calls(streamed.choices[0].message) == expected and streamed.choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


@pytest.mark.parametrize("marker, block", [("@badjson", BAD_JSON_BLOCK), ("@unknown", UNKNOWN_TOOL_BLOCK)])
def test_a_block_that_is_no_valid_call_stays_content(server, marker, block):
    choice = _ask(server, marker).choices[0]
    assert choice.message.content == block and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    chunks, streamed = _stream(server, marker)
    assert streamed.choices[0].message.content == block and not streamed.choices[0].message.tool_calls
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_tool_choice_none_parses_nothing(server):
    choice = _ask(server, "@weather", tool_choice="none").choices[0]
    assert choice.message.content == "Let me check.\n" + _block("get_weather", {"city": "Paris"})
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"


def test_an_answer_cut_inside_a_block_is_content(server, tiny):
    budget = _script_tokens(tiny[1], "@weather") - 4  # stops inside the closing tag
    choice = _ask(server, "@weather", max_tokens=budget).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("Let me check.\n<tool_call>\n{")
    assert not choice.message.content.endswith("</tool_call>")


def test_a_round_trip_sends_the_tool_result_back(server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "@weather Weather in Paris?"}]
    first = server.client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    [call] = first.choices[0].message.tool_calls
    messages.append(first.choices[0].message)  # as OpenAI's guide does: the response's message object itself
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21} @done'})
    second = server.client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == FINAL_ANSWER
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None

    prompt = server.engine().prompts[-1]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "\n" + json.dumps(WEATHER) + "\n" + json.dumps(CLOCK) + "\n</tools>" in prompt
    assert ("<|im_start|>assistant\nLet me check.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n') in prompt
    assert prompt.endswith('<|im_start|>user\n<tool_response>\n{"celsius": 21} @done\n</tool_response><|im_end|>\n'
                           "<|im_start|>assistant\n<think>\n")
    assert THOUGHT not in prompt  # earlier reasoning stays out of the history


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("fields, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
     "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "@done"}, {"role": "tool", "content": "21"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "@done"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "@done"}, {"role": "assistant", "tool_calls": [{"id": "call_1"}]}]},
     "messages[1].tool_calls[0]"),
])
def test_bad_tool_fields_get_a_400_naming_the_field(server, fields, param):
    request = {"model": "scripted", "messages": [{"role": "user", "content": "@done"}], "tools": TOOLS, **fields}
    with pytest.raises(openai.BadRequestError) as error:
        server.client.chat.completions.create(**request)
    body = error.value.response.json()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert param in body["message"].replace("'", "") and "\n" not in body["message"]


def test_r1_zero_prompts_refuse_tools(tiny):
    model, tokenizer = tiny
    config = ServerConfig(template="r1_zero", max_model_len=4096)
    server = _Server(model, tokenizer, config, engine_factory=lambda: None)
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    with pytest.raises(RequestError) as error:
        server.prepare_chat(json.dumps(body).encode())
    assert error.value.param == "tools" and "chat template" in error.value.message
    assert server.prepare_chat(json.dumps({**body, "tools": []}).encode())[1].template == "r1_zero"


# ------------------------------------------------------------------------------------ parts on their own
PARSER_CASES = [
    ("Let me check.\n" + _block("get_weather", {"city": "Paris"}), "Let me check.", ["get_weather"]),
    (_block("get_weather", {}) + "\n\nDone.\n", "Done.", ["get_weather"]),
    ("A\n" + _block("get_time", {}) + "\nB", "A\n\nB", ["get_time"]),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', "", ["get_weather"]),
    ("x " + BAD_JSON_BLOCK, "x " + BAD_JSON_BLOCK, []),
    ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', []),
    ("cut <tool_call>\n{\"name\": \"get_weather\"", "cut <tool_call>\n{\"name\": \"get_weather\"", []),
    ("ends with <tool_ca", "ends with <tool_ca", []),
    ("a < b <tool_callx>", "a < b <tool_callx>", []),
]


@pytest.mark.parametrize("text, content, names", PARSER_CASES)
def test_parser_is_the_same_whole_or_one_character_at_a_time(text, content, names):
    whole = ToolCallParser(["get_weather", "get_time"])
    assert whole.feed(text, final=True) == content
    assert [call.name for call in whole.calls] == names
    pieces = ToolCallParser(["get_weather", "get_time"])
    streamed = "".join(pieces.feed(ch) for ch in text) + pieces.feed("", final=True)
    assert streamed == content
    assert [(c.name, c.arguments) for c in pieces.calls] == [(c.name, c.arguments) for c in whole.calls]


def test_parser_holds_back_a_partial_tag_and_an_open_block():
    parser = ToolCallParser(["get_weather"])
    assert parser.feed("Sure <tool") == "Sure"
    assert parser.feed('_call>{"name": "get_weather", ') == ""
    assert parser.feed('"arguments": {"city": "Oslo"}}</tool_call>') == ""
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Oslo"})]


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "21"},
    {"role": "tool", "tool_call_id": "call_b", "content": "25"},
]


def test_hermes_chatml_is_chatml_extended(tiny):
    tokenizer = tiny[1]
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert hermes_chatml(plain) == tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    text = hermes_chatml(CONVERSATION, [WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools\n")  # no system message: the tools' turn alone
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
            "<|im_end|>\n") in text
    # consecutive tool results share one user turn
    assert text.endswith("<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n"
                         "</tool_response><|im_end|>\n<|im_start|>assistant\n")


OWN_TEMPLATE = (
    "{% if tools is not none %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}={{ m.content }}"
    # the newline is an expression: one written right after a block tag would be dropped (trim_blocks)
    "{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}[assistant]")


def test_a_tokenizer_with_its_own_template_gets_tools_through_it(tiny):
    tokenizer = copy.copy(tiny[1])
    tokenizer.chat_template = OWN_TEMPLATE
    rendered = render_chat_prompt(tokenizer, CONVERSATION, tools=[WEATHER])
    assert rendered.template == "chat" and rendered.starts_in_think
    assert rendered.text == (f"TOOLS {json.dumps([WEATHER])}\n[user]Weather in Paris and Rome?\n"
                             '[assistant]CALL get_weather {"city": "Paris"}CALL get_weather {"city": "Rome"}\n'
                             "[tool]RESULT call_a=21\n[tool]RESULT call_b=25\n[assistant]<think>\n")
    # calls in the history but no tools offered: the template's `tools` is None, as transformers passes it
    assert not render_chat_prompt(tokenizer, CONVERSATION).text.startswith("TOOLS")


def test_a_template_that_refuses_the_messages_gives_a_400(tiny):
    model, tokenizer = tiny
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}"
                               "{{ raise_exception('this model has no tool role') }}{% endif %}{{ m.content }}"
                               "{% endfor %}")
    server = _Server(model, tokenizer, ServerConfig(max_model_len=4096), engine_factory=lambda: None)
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "21"}]}
    with pytest.raises(RequestError) as error:
        server.prepare_chat(json.dumps(body).encode())
    assert error.value.param == "messages" and "this model has no tool role" in error.value.message
