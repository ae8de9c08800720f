"""`r1lab chat` core and the reasoning splitter: scripted input in, console text out."""

from __future__ import annotations

import io
import random
import re

import pytest
from rich.console import Console

from r1lab.rollout import StreamEvent
from r1lab.model import load_model_and_tokenizer
from r1lab.testing import build_random_checkpoint
from r1lab.serve.chat import chat_repl
from r1lab.serve.reasoning import (
    IncrementalDetokenizer,
    ReasoningSplitter,
    StopStringFilter,
    render_chat_prompt,
    split_reasoning,
)

SCRIPT = "Two plus two is four.</think>\n\n<answer> 4 </answer>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model_and_tokenizer(build_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model"))


# ------------------------------------------------------------------------------------ splitter
SPLIT_CASES = [
    # text, starts_in_think, expected (reasoning_content, content)
    ("<think>\nTwo plus two.\n</think>\n\n<answer> 4 </answer>", False, ("Two plus two.", "4")),
    (" <think> a b </think> <answer>5</answer>", False, ("a b", "5")),
    ("Let me see.\n</think>\n\nThe answer is 7.", True, ("Let me see.", "The answer is 7.")),
    ("<think>\nredundant open\n</think>\nok", True, ("redundant open", "ok")),  # model re-opens anyway
    ("no tags at all <answer>x</answer> tail", False, (None, "no tags at all x tail")),
    ("<think> truncated thought", False, ("truncated thought", "")),
    ("still thinking when max_tokens hit", True, ("still thinking when max_tokens hit", "")),
    ("<thi", False, (None, "<thi")),  # a half tag at the end is text
    ("a </think> b", False, (None, "a </think> b")),  # a close without an open is text when not forced
    ("x < y and y </thinker> z</think>ans", True, ("x < y and y </thinker> z", "ans")),
    ("思考中。</think>答案是 4", True, ("思考中。", "答案是 4")),
]


@pytest.mark.parametrize("text, forced, expected", SPLIT_CASES)
def test_split_reasoning(text, forced, expected):
    assert split_reasoning(text, starts_in_think=forced) == expected


@pytest.mark.parametrize("text, forced, expected", SPLIT_CASES)
def test_streaming_splitter_equals_one_shot_for_any_chunking(text, forced, expected):
    rng = random.Random(0)
    for _ in range(100):
        splitter, reasoning, content, i = ReasoningSplitter(forced), "", "", 0
        while i < len(text):
            j = i + rng.randint(1, 5)  # tags arrive cut anywhere ("</th" + "ink>")
            delta = splitter.feed(text[i:j])
            reasoning, content, i = reasoning + delta.reasoning, content + delta.content, j
        last = splitter.finish()
        reasoning, content = reasoning + last.reasoning, content + last.content
        assert ((reasoning if splitter.saw_reasoning else None), content) == expected


def test_answer_tags_can_be_kept():
    assert split_reasoning("<think>r</think> <answer>4</answer>", keep_answer_tags=True) == ("r", "<answer>4</answer>")


def test_streaming_never_emits_a_partial_tag():
    splitter = ReasoningSplitter(starts_in_think=True)
    assert splitter.feed("abc </th").reasoning == "abc"
    delta = splitter.feed("ink> <ans")
    assert delta.reasoning == "" and delta.content == ""
    assert splitter.feed("wer>4</answer>").content == "4"


def test_stop_string_filter_holds_back_possible_stops():
    stops = StopStringFilter(["STOP"])
    assert stops.feed("hello ST") == "hello "
    assert stops.feed("AY") == "STAY"
    assert stops.feed(" ok STO") == " ok "
    assert stops.feed("P after") == "" and stops.stopped
    assert StopStringFilter(["zz"]).feed("abz", final=True) == "abz"


def test_incremental_detokenizer_handles_multibyte_characters(tiny):
    tokenizer = tiny[1]
    text = "héllo 世界 🙂 <think> 2+2 </think>"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) / 3  # byte-level pieces: characters are split across tokens
    detokenizer, out = IncrementalDetokenizer(tokenizer), ""
    for token in ids:
        piece = detokenizer.add([token])
        assert "\ufffd" not in piece
        out += piece
    assert out + detokenizer.flush() == text


def test_prompt_rendering_forces_think(tiny):
    tokenizer = tiny[1]
    rendered = render_chat_prompt(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}])
    assert rendered.template == "r1_zero"  # r1lab's own tokenizer: no chat template of its own
    assert rendered.text.endswith("User: What is 2 + 3?. Assistant: <think>") and rendered.starts_in_think
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "b"}]
    text = render_chat_prompt(tokenizer, turns).text
    assert "User: a. Assistant: <answer> 1 </answer> User: b. Assistant: <think>" in text

    class ChatTokenizer:  # a model with a real chat template
        chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
        has_own_chat_template = True

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"

    rendered = render_chat_prompt(ChatTokenizer(), [{"role": "user", "content": "hi"}])
    assert rendered.template == "chat" and rendered.text == "<|user|>hi<|assistant|><think>\n"
    no_force = render_chat_prompt(ChatTokenizer(), [{"role": "user", "content": "hi"}], force_think=False)
    assert not no_force.starts_in_think and no_force.text.endswith("<|assistant|>")

    class NoThinkTokenizer(ChatTokenizer):  # a model never taught <think> tags: nothing is forced
        def token_id(self, token):
            raise KeyError(token)

    plain = render_chat_prompt(NoThinkTokenizer(), [{"role": "user", "content": "hi"}])
    assert not plain.starts_in_think and plain.text == "<|user|>hi<|assistant|>"


# ------------------------------------------------------------------------------------ chat REPL
class ScriptedEngine:
    """One request at a time; emits SCRIPT + EOS token by token. Records the prompts it was given."""

    def __init__(self, tokenizer, interrupt_at: int | None = None):
        self.tokenizer, self.interrupt_at = tokenizer, interrupt_at
        self.tokens = tokenizer.encode(SCRIPT) + [tokenizer.eos_id]
        self.prompts: list[str] = []
        self.active: int | None = None
        self.position = 0
        self.aborted = 0

    def add_request(self, prompt, params):
        self.prompts.append(self.tokenizer.decode(prompt))
        self.active, self.position = len(self.prompts), 0
        return self.active

    def has_unfinished(self):
        return self.active is not None

    def abort(self, request_id):
        self.active, self.aborted = None, self.aborted + 1

    def step(self):
        if self.interrupt_at is not None and self.position == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        token = self.tokens[self.position]
        self.position += 1
        done = token == self.tokenizer.eos_id
        event = StreamEvent(self.active, 0, [token], [0.0], done, "stop" if done else None)
        if done:
            self.active = None
        return [event]


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system="standard", width=120), out


def test_chat_repl_streams_thinking_dimmed_and_keeps_answers_only(tiny):
    model, tokenizer = tiny
    engine = ScriptedEngine(tokenizer)
    console, out = _console()
    inputs = iter(["What is 2 + 2?", "", "And doubled?", "/exit", "never read"])
    session = chat_repl(model, tokenizer, inputs=inputs, console=console, engine=engine)
    assert next(inputs) == "never read"  # /exit stopped the loop
    text = out.getvalue().replace("\x1b[0m\x1b[2m", "")  # join the streamed pieces of one style
    assert re.search(r"\x1b\[2(;3)?mThinking: Two plus two is four\.\x1b\[0m", text)  # the thinking, dimmed
    assert "\n4\n" in text  # the answer, unstyled
    assert session.messages == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                                {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": "4"}]
    # the second prompt holds the first answer but not its reasoning, and forces <think> again
    assert "<answer> 4 </answer> User: And doubled?. Assistant: <think>" in engine.prompts[1]
    assert "Two plus two" not in engine.prompts[1]


def test_chat_repl_reset_and_interrupt(tiny):
    model, tokenizer = tiny
    engine = ScriptedEngine(tokenizer, interrupt_at=3)
    console, out = _console()
    session = chat_repl(model, tokenizer, inputs=["first", "second", "/reset", "third"], console=console,
                        engine=engine)
    assert "(stopped)" in out.getvalue() and engine.aborted == 1
    assert "(conversation reset)" in out.getvalue()
    # "first" was interrupted (not kept), "second" was answered, then /reset forgot it
    assert "User: first" not in engine.prompts[1]
    assert "User: second" not in engine.prompts[2]
    assert session.messages == [{"role": "user", "content": "third"}, {"role": "assistant", "content": "4"}]


def test_chat_repl_with_the_real_engine(tiny):
    model, tokenizer = tiny
    console, out = _console()
    session = chat_repl(model, tokenizer, inputs=["hello", "again"], console=console, max_new_tokens=6, seed=0)
    assert len(session.messages) == 4 and "tokens" in out.getvalue()
    assert not session.engine.has_unfinished()
