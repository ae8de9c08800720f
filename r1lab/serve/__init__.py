"""Inference for people: a streaming terminal chat and an OpenAI-compatible HTTP server, both showing R1's
chain of thought separately from its answer (`reasoning_content` / `content`, as DeepSeek's API does).

    from r1lab.serve import load_model_and_tokenizer, create_app, serve, chat_repl
    model, tokenizer = load_model_and_tokenizer()            # the embedded r1lab/assets/r1-tiny
    app = create_app(model, tokenizer, model_name="r1-tiny")  # FastAPI; or serve(path, host, port)

Importing this package is cheap: fastapi, uvicorn and rich load only when the server or chat is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .reasoning import ReasoningSplitter, RenderedPrompt, render_chat_prompt, split_reasoning

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "r1-tiny"
"""The embedded default model: a tiny base model r1lab pretrained itself (HF folder with its tokenizer)."""

_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def load_model_and_tokenizer(path: str | Path | None = None, *, device: str = "cpu",
                             dtype: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from an HF folder holding both; None → the embedded default model.

    dtype "auto" keeps the checkpoint's dtype on CPU and uses bfloat16 on CUDA.
    """
    import torch

    import r1lab.model as rm
    from r1lab.tokenizer import load_tokenizer

    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not folder.is_dir():
        hint = (" (the embedded default model is built by `r1lab pretrain`; pass a model folder instead)"
                if path is None else "")
        raise FileNotFoundError(f"model folder {folder} does not exist{hint}")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json: r1lab needs the tokenizer beside the model")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    name = _DTYPES[dtype] or ("bfloat16" if str(device).startswith("cuda") else None)
    model = rm.load(folder, dtype=getattr(torch, name) if name else None, device=device)
    return model.eval(), load_tokenizer(folder)


def build_random_checkpoint(folder: str | Path, preset: str = "tiny-dense", seed: int = 0) -> Path:
    """Write a randomly initialized model of `preset` with a small BPE tokenizer into `folder` (an HF folder
    that `load_model_and_tokenizer` reads). Its output is noise; it exists for tests and benchmarks of the
    serving machinery when no trained model is at hand."""
    import random

    import r1lab.model as rm
    from r1lab.tasks.templates import R1_ZERO_TEMPLATE
    from r1lab.tokenizer import train_bpe

    rng = random.Random(seed)
    words = ["the", "sum", "of", "and", "is", "so", "answer", "first", "then", "wait", "check", "add", "we", "get"]
    texts = []
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sentence = " ".join(rng.choice(words) for _ in range(6))
        texts.append(R1_ZERO_TEMPLATE.format(question=f"What is {a} + {b}?")
                     + f" <think> {sentence} {a} + {b} = {a + b} </think> <answer> {a + b} </answer><|endoftext|>")
    tokenizer = train_bpe(texts, vocab_size=400)
    model = rm.build(rm.preset(preset, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id), seed=seed)
    folder = Path(folder)
    rm.save(model, folder)
    tokenizer.save(folder)
    return folder


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
    "DEFAULT_MODEL_DIR",
    "build_random_checkpoint",
    "ReasoningSplitter",
    "RenderedPrompt",
    "ServerConfig",
    "chat_repl",
    "create_app",
    "load_model_and_tokenizer",
    "render_chat_prompt",
    "run_chat",
    "serve",
    "split_reasoning",
]
