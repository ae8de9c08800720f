"""Read and write Hugging Face checkpoint folders (config.json + *.safetensors, single or sharded).

Checkpoint names differ from r1lab's module names in two places only:
- routed experts: per-expert `mlp.experts.E.{gate,up,down}_proj.weight` on disk (also accepted: the fused
  `mlp.experts.gate_up_proj` / `down_proj` that newer transformers hold in memory) ↔ stacked tensors here;
- MTP module i: `model.layers.{num_hidden_layers + i}.*` on disk ↔ `mtp.i.*` here; on disk it also carries
  copies of the embedding and head (`embed_tokens`, `shared_head.head`), which r1lab shares with the main
  model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1lab.fsutil import replace_dir

from ..errors import InputError
from .config import ConfigError, ModelArgs
from .layers import RotaryEmbedding
from .transformer import Transformer

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class CheckpointError(InputError):
    """A checkpoint folder whose files do not match its config; the message names the file and tensor."""


# ----------------------------------------------------------------------------- reading
def read_config(path: str | Path) -> ModelArgs:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: invalid JSON: {e}") from e
    return ModelArgs.from_hf_config(cfg, source=str(cfg_file))


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    if list(path.glob("*.bin")):
        raise CheckpointError(f"{path}: only PyTorch .bin weights found; r1lab reads safetensors")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _checkpoint_to_internal(name: str, args: ModelArgs) -> str | None:
    """Internal parameter name for a checkpoint tensor name; None for redundant copies to skip."""
    m = _LAYER_KEY.match(name)
    if m and int(m.group(1)) >= args.num_hidden_layers:
        i, rest = int(m.group(1)) - args.num_hidden_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # shared with the main model
        return f"mtp.{i}.{rest}"
    if name == "lm_head.weight" and args.tie_word_embeddings:
        return None
    return name


def load_state(path: str | Path, args: ModelArgs, model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
    """Copy every checkpoint tensor into `model` (materialized on `device`), checking names and shapes."""
    path = Path(path)
    targets = dict(model.state_dict())
    filled: set[str] = set()
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    unexpected: list[str] = []

    def put(internal: str, tensor: torch.Tensor, source: str) -> None:
        target = targets[internal]
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {internal} has shape {tuple(tensor.shape)}, config expects {tuple(target.shape)}"
            )
        keep_fp32 = internal.endswith("e_score_correction_bias")
        target.copy_(tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype))
        filled.add(internal)

    files = _tensor_files(path)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(f, "pt") as handle:
                for name in names:
                    m = _EXPERT_KEY.match(name)
                    if m:
                        experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = handle.get_tensor(name)
                        continue
                    internal = _checkpoint_to_internal(name, args)
                    if internal is None:
                        continue
                    if internal not in targets:
                        unexpected.append(name)
                        continue
                    put(internal, handle.get_tensor(name), f.name)
        for prefix, parts in experts.items():
            _stack_experts(prefix, parts, args, put)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors not in the {args.model_type} model: {_preview(unexpected)}")
    missing = [k for k in targets if k not in filled and not _derived(k, args)]
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {_preview(missing)}")


def _stack_experts(prefix: str, parts: dict, args: ModelArgs, put) -> None:
    internal_prefix = _checkpoint_to_internal(prefix + ".x", args)[:-2]
    E = args.n_routed_experts
    missing = [f"{prefix}.{e}.{p}.weight" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in parts]
    if missing:
        raise CheckpointError(f"missing expert tensors: {_preview(missing)}")
    gate_up = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(E)])
    put(f"{internal_prefix}.gate_up_proj", gate_up, prefix)
    put(f"{internal_prefix}.down_proj", torch.stack([parts[(e, "down_proj")] for e in range(E)]), prefix)


def _derived(name: str, args: ModelArgs) -> bool:
    """State entries that a checkpoint need not hold."""
    return name == "lm_head.weight" and args.tie_word_embeddings


def _preview(names: list[str], n: int = 8) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _checkpoint_dtype(path: Path, args: ModelArgs) -> torch.dtype:
    if args.torch_dtype and hasattr(torch, str(args.torch_dtype)):
        return getattr(torch, str(args.torch_dtype))
    files = _tensor_files(path)
    name, f = next(iter(files.items()))
    with safe_open(f, "pt") as handle:
        dtype = handle.get_slice(name).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **overrides) -> Transformer:
    """Read a Hugging Face folder of model_type llama / qwen2 / mistral / deepseek_v3 into a Transformer.

    dtype None keeps the checkpoint's dtype. `overrides` replace ModelArgs fields (e.g. moe_impl="loop").
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    args = read_config(path)
    if overrides:
        args = args.replace(**overrides)
    device = torch.device(device)
    dtype = dtype or _checkpoint_dtype(path, args)
    model = empty_model(args, device, dtype)
    load_state(path, args, model, device, dtype)
    return model.eval()


def empty_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """A Transformer with uninitialized weights (built on the meta device: no init cost), for a caller that
    fills every parameter (a checkpoint load, a broadcast); buffers are valid."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    model.rotary = RotaryEmbedding(args).to(device)  # non-persistent buffers come back uninitialized from meta
    for m in model.moe_layers():
        m.expert_load = torch.zeros_like(m.expert_load, dtype=torch.float32)
    return model


# ----------------------------------------------------------------------------- writing
def checkpoint_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names (per-expert weights, MTP as extra layers)."""
    args = model.args
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if name.startswith("mtp."):
            _, i, rest = name.split(".", 2)
            name = f"model.layers.{args.num_hidden_layers + int(i)}.{rest}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
            continue
        if name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e, w in enumerate(tensor):
                out[f"{prefix}.{e}.down_proj.weight"] = w
            continue
        out[name] = tensor
    for i in range(args.num_nextn_predict_layers):
        layer = f"model.layers.{args.num_hidden_layers + i}"
        out[f"{layer}.embed_tokens.weight"] = model.model.embed_tokens.weight
        out[f"{layer}.shared_head.head.weight"] = model.lm_head.weight
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save(model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors (sharded past max_shard_bytes) atomically: a crash leaves the old folder."""
    path = Path(path)
    state = checkpoint_state(model)
    dtype = next(iter(model.parameters())).dtype
    config = model.args.to_hf_config()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_shards(state, tmp, max_shard_bytes)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        # mkdtemp makes a private dir; a checkpoint is meant to be shared and read like any HF folder.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
