"""`r1lab chat`: a streaming terminal chat that shows the model's thinking dimmed and its answer plainly.

Follows DeepSeek's usage notes for R1: the response is forced to start inside `<think>` (the prompt ends with
the opening tag), and earlier turns enter the history as final answers only, without their reasoning.
Commands: /exit (or /quit, or end of input) leaves, /reset forgets the conversation. Ctrl-C stops the
current answer and keeps the chat going.

The core, `chat_repl`, reads lines from any iterator and writes to any rich Console, so it runs under tests
with scripted input; `run_chat` loads a model folder and reads the keyboard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from r1lab.rollout import Engine, SamplingParams

from .reasoning import IncrementalDetokenizer, ReasoningSplitter, choose_template, render_chat_prompt

__all__ = ["ChatSession", "chat_repl", "run_chat"]

EXIT_COMMANDS = ("/exit", "/quit", "/bye")
RESET_COMMAND = "/reset"


class ChatSession:
    """A conversation with one model: history of (user, final answer) turns and one engine slot."""

    def __init__(self, model: Any, tokenizer: Any, *, temperature: float = 0.6, top_p: float = 0.95,
                 max_new_tokens: int = 1024, template: str = "auto", seed: int | None = None,
                 max_len: int | None = None, engine: Any = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_len = max_len or min(model.args.max_position_embeddings, 8192)
        # one slot: a chat generates one answer at a time (`engine` lets tests script the generation)
        self.engine = engine or Engine(model, num_slots=1, max_len=self.max_len)
        stop = sorted(set(tokenizer.stop_ids) | set(model.args.stop_token_ids))
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     stop_token_ids=stop, seed=seed)
        self.stop_ids = set(stop)
        self.messages: list[dict] = []
        self.last_tokens = 0
        """Tokens generated for the latest reply."""

    def reset(self) -> None:
        self.messages = []

    def _prompt(self, messages: list[dict]) -> tuple[list[int], bool]:
        rendered = render_chat_prompt(self.tokenizer, messages, template=self.template, force_think=True)
        ids = self.tokenizer.encode_prompt(rendered.text, chat=rendered.template == "chat")
        return ids, rendered.starts_in_think

    def fit_prompt(self, user_text: str) -> tuple[list[int], bool, int]:
        """Prompt ids for the next turn (oldest turns dropped until it fits), whether it opens a think block,
        and the tokens left for the reply."""
        history = self.messages
        while True:
            ids, in_think = self._prompt([*history, {"role": "user", "content": user_text}])
            room = self.max_len - len(ids)
            if room >= min(self.params.max_new_tokens, 16) or not history:
                break
            history = history[2:]  # forget the oldest exchange
        if room < 1:
            raise ValueError(f"the message is too long: {len(ids)} prompt tokens, the context holds {self.max_len}")
        self.messages = history
        return ids, in_think, min(room, self.params.max_new_tokens)

    def reply(self, user_text: str) -> Iterator[tuple[str, str]]:
        """Stream (reasoning delta, content delta) of the answer to `user_text`; records the turn at the end
        (the final answer only). Closing the iterator early (Ctrl-C) aborts the generation."""
        ids, in_think, budget = self.fit_prompt(user_text)
        params = dataclasses.replace(self.params, max_new_tokens=budget)
        request = self.engine.add_request(ids, params)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        splitter = ReasoningSplitter(starts_in_think=in_think)
        answer: list[str] = []
        self.last_tokens = 0
        try:
            finished = False
            while not finished:
                for event in self.engine.step():
                    tokens = event.new_token_ids
                    self.last_tokens += len(tokens)
                    if event.finished and event.finish_reason == "stop" and tokens and tokens[-1] in self.stop_ids:
                        tokens = tokens[:-1]
                    delta = splitter.feed(detokenizer.add(tokens))
                    if event.finished:
                        finished = True
                        last = splitter.feed(detokenizer.flush())
                        end = splitter.finish()
                        delta.reasoning += last.reasoning + end.reasoning
                        delta.content += last.content + end.content
                    answer.append(delta.content)
                    if delta:
                        yield delta.reasoning, delta.content
                if not self.engine.has_unfinished():
                    finished = True
        finally:
            if self.engine.has_unfinished():
                self.engine.abort(request)
                while self.engine.has_unfinished():
                    self.engine.step()
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(answer)}]


def chat_repl(model: Any, tokenizer: Any, *, inputs: Iterable[str] | None = None, console: Any = None,
              temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 1024, template: str = "auto",
              seed: int | None = None, show_thinking: bool = True, engine: Any = None) -> ChatSession:
    """Run the chat loop until /exit or the end of `inputs` (None: read the keyboard); returns the session.

    Thinking is printed dimmed (hidden with show_thinking=False), the answer in the normal style.
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    session = ChatSession(model, tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          template=template, seed=seed, engine=engine)
    lines = iter(inputs) if inputs is not None else _keyboard(console)
    console.print(f"[bold]r1lab chat[/] · {choose_template(tokenizer, template)} prompt format · temperature "
                  f"{temperature} · top_p {top_p} · /reset forgets the conversation, /exit leaves", highlight=False)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            break
        if text.lower() == RESET_COMMAND:
            session.reset()
            console.print("[dim](conversation reset)[/]", highlight=False)
            continue
        _print_reply(console, session, text, show_thinking)
    return session


def _print_reply(console: Any, session: ChatSession, text: str, show_thinking: bool) -> None:
    start = time.perf_counter()
    in_reasoning = in_answer = False
    stream = session.reply(text)
    try:
        for reasoning, content in stream:
            if reasoning and show_thinking:
                if not in_reasoning:
                    console.print("Thinking: ", style="dim italic", end="")
                    in_reasoning = True
                console.print(reasoning, style="dim", end="", markup=False, highlight=False)
            if content:
                if not in_answer:
                    console.print("\n" if in_reasoning else "", end="")
                    in_answer = True
                console.print(content, end="", markup=False, highlight=False)
    except KeyboardInterrupt:
        stream.close()
        console.print("\n[yellow](stopped)[/]", end="", highlight=False)
    except ValueError as error:
        console.print(str(error), markup=False, highlight=False, style="red")
        return
    seconds = time.perf_counter() - start
    tokens = session.last_tokens
    console.print(f"\n[dim]({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tok/s)[/]", highlight=False)


def _keyboard(console: Any) -> Iterator[str]:
    while True:
        try:
            yield console.input("[bold green]>>> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return


def run_chat(model_path: str | Path | None = None, *, device: str = "cpu", dtype: str = "auto",
             **options: Any) -> None:
    """Load a model folder (None: the embedded default, r1lab/assets/r1-tiny) and chat on the terminal."""
    from r1lab.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=dtype)
    chat_repl(model, tokenizer, **options)
