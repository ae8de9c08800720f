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
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1lab.fsutil import read_json_object, staged_dir

from ..errors import InputError
from .config import ConfigError, ModelArgs
from .fp8 import FLOAT8_DTYPES, SCALE_SUFFIX, QuantizationError, dequantize, weight_block_size
from .layers import RotaryEmbedding
from .transformer import Transformer

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
logger = logging.getLogger("r1lab.model")


class CheckpointError(InputError):
    """A checkpoint folder whose files do not match its config; the message names the file and tensor."""


# ----------------------------------------------------------------------------- reading
def _read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return read_json_object(cfg_file, ConfigError)


def read_config(path: str | Path) -> ModelArgs:
    path = Path(path)
    return ModelArgs.from_hf_config(_read_config_json(path), source=str(path / "config.json"))


def _open(f: Path):
    """safe_open, with a damaged file (truncated, empty, a corrupt header, not safetensors at all) reported in one
    line naming it: safetensors checks the header and that the tensors cover the file exactly, so this is where a
    partial download or copy shows."""
    try:
        return safe_open(f, "pt")
    except SafetensorError as e:
        size = f.stat().st_size
        raise CheckpointError(f"{f}: safetensors header unreadable ({_reason(e)}; the file has {size:,} bytes): "
                              f"it is truncated or damaged, copy or save it again") from None


def _reason(e: Exception) -> str:
    return str(e).removeprefix("Error while deserializing header: ").strip().splitlines()[0] or type(e).__name__


class _Shards:
    """One open handle per safetensors file, opened when first needed (a weight and its FP8 scale may sit in
    different shards)."""

    def __init__(self) -> None:
        self._handles: dict[Path, object] = {}

    def __getitem__(self, f: Path):
        if f not in self._handles:
            self._handles[f] = _open(f)
        return self._handles[f]

    def tensor(self, f: Path, name: str) -> torch.Tensor:
        try:
            return self[f].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: tensor {name} cannot be read: {_reason(e)}") from None

    def dtype(self, f: Path, name: str) -> str:
        return self[f].get_slice(name).get_dtype()

    def close(self) -> None:
        self._handles.clear()


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid JSON or not an object ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> file name")
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in _open(single).keys()}
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


def _has_mtp_tensors(names, args: ModelArgs) -> bool:
    return any((m := _LAYER_KEY.match(n)) and int(m.group(1)) >= args.num_hidden_layers for n in names)


_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def load_state(path: str | Path, args: ModelArgs, model: Transformer, device: torch.device, dtype: torch.dtype,
               block: tuple[int, int] | None = None, files: dict[str, Path] | None = None) -> None:
    """Copy every checkpoint tensor into `model` (materialized on `device`), checking names and shapes.

    Tensors go straight into their place (routed experts into their slice of the stacked weight), so memory
    beyond the model is one tensor at a time, plus the pages of the shard being read. `block`: the FP8 block
    size when config.json has a quantization_config; float8 weights are then de-quantized with their scales.
    """
    path = Path(path)
    targets = dict(model.state_dict())
    filled: set[str] = set()
    experts_filled: dict[str, set[tuple[int, str]]] = {}
    unexpected: list[str] = []
    files = files if files is not None else _tensor_files(path)
    shards = _Shards()

    def check_shape(internal: str, shape, expected, source: str) -> None:
        if tuple(shape) != tuple(expected):
            raise CheckpointError(f"{source}: tensor {internal} has shape {tuple(shape)}, config expects {tuple(expected)}")

    def put(internal: str, tensor: torch.Tensor, source: str) -> None:
        target = targets[internal]
        check_shape(internal, tensor.shape, target.shape, source)
        keep_fp32 = internal.endswith("e_score_correction_bias")
        target.copy_(tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype))
        filled.add(internal)

    def read(name: str, f: Path) -> torch.Tensor:
        kind = shards.dtype(f, name)
        if kind in FLOAT8_DTYPES:
            scale_name = name + SCALE_SUFFIX
            if block is None:
                raise CheckpointError(f"{f}: tensor {name} is {kind} but config.json has no quantization_config "
                                      f"to de-quantize it with")
            if scale_name not in files:
                raise CheckpointError(f"{f}: tensor {name} is {kind} and its scale {scale_name} is missing")
            try:
                return dequantize(shards.tensor(f, name), shards.tensor(files[scale_name], scale_name), block, name)
            except QuantizationError as e:
                raise CheckpointError(f"{f}: {e}") from None
        if kind not in _FLOAT_DTYPES:
            raise CheckpointError(f"{f}: tensor {name} has dtype {kind}; r1lab expects floating-point weights")
        return shards.tensor(f, name)

    def put_expert(prefix: str, e: int, part: str, tensor: torch.Tensor, source: str) -> None:
        internal = _checkpoint_to_internal(prefix + ".x", args)[:-2]
        gate_up, down = targets[f"{internal}.gate_up_proj"], targets[f"{internal}.down_proj"]
        if e >= gate_up.shape[0]:
            unexpected.append(f"{prefix}.{e}.{part}.weight")
            return
        half = gate_up.shape[1] // 2
        slot = {"gate_proj": gate_up[e, :half], "up_proj": gate_up[e, half:], "down_proj": down[e]}[part]
        check_shape(f"{prefix}.{e}.{part}.weight", tensor.shape, slot.shape, source)
        slot.copy_(tensor.to(device=device, dtype=dtype))
        experts_filled.setdefault(prefix, set()).add((e, part))

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    try:
        with torch.no_grad():
            for f, names in by_file.items():
                for name in names:
                    if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in files:
                        continue  # consumed with its weight
                    m = _EXPERT_KEY.match(name)
                    if m:
                        if f"{_checkpoint_to_internal(m.group(1) + '.x', args)[:-2]}.down_proj" not in targets:
                            unexpected.append(name)
                        else:
                            put_expert(m.group(1), int(m.group(2)), m.group(3), read(name, f), f.name)
                        continue
                    internal = _checkpoint_to_internal(name, args)
                    if internal is None:
                        continue
                    if internal not in targets:
                        unexpected.append(name)
                        continue
                    put(internal, read(name, f), f.name)
                shards.close()  # let the finished shard's pages go before the next one is read
    finally:
        shards.close()
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors not in the {args.model_type} model: {_preview(unexpected)}")
    for prefix, done in experts_filled.items():
        internal = _checkpoint_to_internal(prefix + ".x", args)[:-2]
        gate_up_missing = [f"{prefix}.{e}.{p}.weight" for e in range(args.n_routed_experts)
                           for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in done]
        if gate_up_missing:
            raise CheckpointError(f"{path}: missing expert tensors: {_preview(gate_up_missing)}")
        filled.update({f"{internal}.gate_up_proj", f"{internal}.down_proj"})
    missing = [k for k in targets if k not in filled and not _derived(k, args)]
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {_preview(missing)}")


def _derived(name: str, args: ModelArgs) -> bool:
    """State entries that a checkpoint need not hold."""
    return name == "lm_head.weight" and args.tie_word_embeddings


def _preview(names: list[str], n: int = 8) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _checkpoint_dtype(files: dict[str, Path], args: ModelArgs) -> torch.dtype:
    if args.torch_dtype and isinstance(getattr(torch, str(args.torch_dtype), None), torch.dtype):
        return getattr(torch, str(args.torch_dtype))
    name, f = next(iter(files.items()))
    kind = _open(f).get_slice(name).get_dtype()
    # an FP8 checkpoint without torch_dtype: bf16 is what it was trained in and de-quantizes to losslessly enough
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.bfloat16}.get(
        kind, torch.float32)


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **overrides) -> Transformer:
    """Read a Hugging Face folder of model_type llama / qwen2 / mistral / deepseek_v3 into a Transformer.

    dtype None keeps the checkpoint's dtype. `overrides` replace ModelArgs fields (e.g. moe_impl="loop").
    Block-wise FP8 weights (quantization_config quant_method "fp8") are de-quantized. A DeepSeek-V3 folder
    whose config asks for MTP modules but that holds no MTP tensors (transformers saves none) loads without
    them, with a warning; a partial set of MTP tensors is an error.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    raw = _read_config_json(path)
    args = ModelArgs.from_hf_config(raw, source=str(path / "config.json"))
    block = weight_block_size(raw.get("quantization_config"), str(path / "config.json"))
    if overrides:
        args = args.replace(**overrides)
    files = _tensor_files(path)
    if args.num_nextn_predict_layers and not _has_mtp_tensors(files, args):
        logger.warning("%s: config.json sets num_nextn_predict_layers=%d but the checkpoint holds no MTP weights "
                       "(transformers does not save them); loaded without MTP", path, args.num_nextn_predict_layers)
        args = args.replace(num_nextn_predict_layers=0)
    device = torch.device(device)
    dtype = dtype or _checkpoint_dtype(files, args)
    model = empty_model(args, device, dtype)
    load_state(path, args, model, device, dtype, block=block, files=files)
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
    with staged_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_shards(state, tmp, max_shard_bytes)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
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
