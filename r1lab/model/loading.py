"""The one way r1lab gets a model and its tokenizer: an HF folder, a preset name, or the embedded default.

    model, tokenizer = load_model_and_tokenizer()                          # r1lab/assets/r1-tiny
    model, tokenizer = load_model_and_tokenizer("runs/zero-x/model", device="cuda")
    model, tokenizer = load_model_and_tokenizer("tiny-dense", tokenizer=tok)   # fresh weights sized to tok

Every command, trainer, evaluation and the server go through `load_model_and_tokenizer`; nothing else
decides dtypes, devices or where the tokenizer comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1lab.errors import InputError
from r1lab.tokenizer import Tokenizer, load_tokenizer

from .config import ModelArgs
from .hf_io import load
from .presets import PRESETS, preset
from .transformer import Transformer

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "r1-tiny"
"""The embedded default model: a tiny base model r1lab pretrained itself (HF folder with its tokenizer)."""
DEFAULT_STUDENT_DIR = ASSETS_DIR / "r1-tiny-student"
"""The embedded dense student (Qwen2 architecture) that the pipeline distills into."""

_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The torch dtype a dtype setting names; "auto" is bfloat16 on CUDA and None (keep the checkpoint's) on CPU."""
    if name not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    resolved = _DTYPES[name] or ("bfloat16" if str(device).startswith("cuda") else None)
    return getattr(torch, resolved) if resolved else None


def build(args: ModelArgs, seed: int = 0, dtype=None, device="cpu") -> Transformer:
    """A freshly initialized model (normal(0, initializer_range) weights) for `args`."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    model.init_weights(gen)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def load_model_and_tokenizer(source: str | Path | None = None, *, tokenizer: str | Path | Tokenizer | None = None,
                             device: str | torch.device = "cpu", dtype: str = "auto", seed: int = 0,
                             preset_overrides: dict[str, Any] | None = None) -> tuple[Transformer, Tokenizer]:
    """(model in eval mode, tokenizer).

    source: an HF model folder, a preset name (fresh weights seeded by `seed`, vocabulary and special ids
        taken from the tokenizer, `preset_overrides` applied to the preset's ModelArgs), or None for the
        embedded default model.
    tokenizer: a Tokenizer, a folder holding tokenizer.json, or None for the model folder's own.
    dtype: "auto" (the checkpoint's dtype on CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16".
    """
    folder = Path(source) if source is not None else DEFAULT_MODEL_DIR
    is_preset = source is not None and not folder.is_dir() and str(source) in PRESETS
    if not is_preset and not folder.is_dir():
        hint = (" (the embedded default model is built by `r1lab pretrain`; pass a model folder instead)"
                if source is None else f" (and it is not a preset: {', '.join(PRESETS)})")
        raise FileNotFoundError(f"model folder {folder} does not exist{hint}")
    wanted = torch_dtype(dtype, device)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else _load_tokenizer(tokenizer, folder, is_preset, source)
    if is_preset:
        args = preset(str(source), **{**(preset_overrides or {}), "vocab_size": tok.vocab_size,
                                      "eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id,
                                      "pad_token_id": tok.pad_id})
        model = build(args, seed=seed).to(device=torch.device(device), dtype=wanted or torch.float32)
    else:
        model = load(folder, dtype=wanted, device=device)
    check_vocabulary(model, tok)
    return model.eval(), tok


def _load_tokenizer(path: str | Path | None, folder: Path, is_preset: bool, source) -> Tokenizer:
    if path is not None:
        return load_tokenizer(path)
    if is_preset:
        raise InputError(f"model {source!r} is a preset: give a tokenizer folder (tokenizer=...)")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json: r1lab needs the tokenizer beside the model")
    return load_tokenizer(folder)


def check_vocabulary(model: Transformer, tokenizer: Tokenizer) -> None:
    """A tokenizer whose ids the model's embedding cannot hold does not belong to it."""
    if tokenizer.vocab_size > model.args.vocab_size:
        raise InputError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                         f"{model.args.vocab_size}: they do not belong together")
