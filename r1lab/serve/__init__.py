"""Inference for people: a streaming terminal chat and an OpenAI-compatible HTTP server, both showing R1's
chain of thought separately from its answer (`reasoning_content` / `content`, as DeepSeek's API does).

    from r1lab.model import load_model_and_tokenizer
    from r1lab.serve import create_app, serve, chat_repl
    model, tokenizer = load_model_and_tokenizer()            # the embedded r1lab/assets/r1-tiny
    app = create_app(model, tokenizer, model_name="r1-tiny")  # FastAPI; or serve(path, host, port)

Nothing in the library imports this package; only the CLI does. Importing it is cheap: fastapi, uvicorn
and rich load only when the server or chat is used.
"""

from __future__ import annotations

from typing import Any

from .reasoning import ReasoningSplitter, RenderedPrompt, render_chat_prompt, split_reasoning


def __getattr__(name: str) -> Any:
    # Heavy parts (fastapi/uvicorn, rich) are imported on first use.
    if name in ("create_app", "serve", "ServerConfig"):
        from . import server

        return getattr(server, name)
    if name in ("chat_repl", "run_chat"):
        from . import chat

        return getattr(chat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ReasoningSplitter",
    "RenderedPrompt",
    "ServerConfig",
    "chat_repl",
    "create_app",
    "render_chat_prompt",
    "run_chat",
    "serve",
    "split_reasoning",
]
