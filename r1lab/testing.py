"""Fixtures for r1lab's tests and benchmarks (not used by the library itself)."""

from __future__ import annotations

import random
from pathlib import Path

import r1lab.model as rm
from r1lab.tasks.templates import R1_ZERO_TEMPLATE
from r1lab.tokenizer import train_bpe


def build_random_checkpoint(folder: str | Path, preset: str = "tiny-dense", seed: int = 0) -> Path:
    """Write a randomly initialized model of `preset` with a small BPE tokenizer into `folder` (an HF folder
    that `r1lab.model.load_model_and_tokenizer` reads). Its output is noise; it exists for tests and
    benchmarks of the serving and evaluation machinery when no trained model is at hand."""
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
