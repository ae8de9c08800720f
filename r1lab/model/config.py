"""ModelArgs: one dataclass describing every architecture r1lab runs (Llama, Qwen2, Mistral, DeepSeek-V3).

Field names follow Hugging Face's config.json so that reading and writing a checkpoint's config is a
rename-free copy. `from_hf_config` accepts both the transformers v4 form (`rope_theta` + `rope_scaling`)
and the v5 form (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .fp8 import weight_block_size

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "deepseek_v3")

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "*": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    # Each of these shapes tensors, or has a transformers default unlike r1lab's (q_lora_rank 1536, 256 experts,
    # n_group 8, ...): left out, r1lab and transformers would build different models from one config.json.
    "deepseek_v3": ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group",
                    "routed_scaling_factor", "first_k_dense_replace"),
}
"""config.json fields with no default: every config transformers writes carries them (it writes all of a model's
own attributes), as do the released ones and r1lab's own; a missing one is a damaged or hand-written file."""

# transformers' default where it differs from ModelArgs' and a released config may leave the field out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {"mistral": {"num_key_value_heads": 8}}


class ConfigError(InputError):
    """A config.json (or preset) that r1lab cannot build a model from; the message names the field."""


@dataclass
class ModelArgs:
    model_type: str = "llama"
    """Architecture family: 'llama', 'qwen2', 'mistral' (dense GQA) or 'deepseek_v3' (MLA + MoE + MTP)."""
    vocab_size: int = 32000
    """Rows of the embedding and of the output head."""
    hidden_size: int = 512
    """Model width d."""
    intermediate_size: int = 1376
    """Width of the dense SwiGLU MLP (DeepSeek-V3: only the first `first_k_dense_replace` layers use it)."""
    num_hidden_layers: int = 4
    """Decoder blocks in the main model (MTP modules are extra)."""
    num_attention_heads: int = 8
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads for GQA (dense models); None means equal to num_attention_heads."""
    head_dim: int | None = None
    """Per-head dim for dense attention; None means hidden_size // num_attention_heads."""
    hidden_act: str = "silu"
    """Activation of the gated MLPs; only SiLU (SwiGLU) is supported."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling as {'rope_type': 'yarn'|'llama3'|'linear', ...}; None or 'default' means plain RoPE."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant for (also the YaRN target length)."""
    qkv_bias: bool | None = None
    """Bias on the q/k/v projections; None means the family's own choice (True for Qwen2, else False)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama's attention_bias sets both)."""
    tie_word_embeddings: bool = False
    """Output head shares the embedding matrix."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id (informational)."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s); the rollout engine's default stop tokens."""
    pad_token_id: int | None = None
    """Padding id (informational)."""
    initializer_range: float = 0.02
    """Std of the normal init for fresh weights."""
    torch_dtype: str | None = None
    """dtype the checkpoint was saved in ('float32', 'bfloat16', ...)."""

    # --- Multi-head Latent Attention (deepseek_v3) ---
    q_lora_rank: int | None = None
    """Query compression rank d'_c; None means a full q_proj (DeepSeek-V2-Lite style)."""
    kv_lora_rank: int = 512
    """Key/value latent rank d_c: the only per-token state MLA caches besides the rope key."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dims without RoPE."""
    qk_rope_head_dim: int = 64
    """Per-head query dims with RoPE; the rope key of this size is shared by all heads."""
    v_head_dim: int = 128
    """Per-head value dim."""
    rope_interleave: bool = True
    """Checkpoint stores RoPE dims as interleaved pairs (DeepSeek's layout; HF's default True)."""

    # --- DeepSeekMoE (deepseek_v3) ---
    n_routed_experts: int | None = None
    """Routed experts per MoE layer; None for dense models."""
    n_shared_experts: int = 1
    """Shared experts, fused into one SwiGLU of width moe_intermediate_size * n_shared_experts."""
    num_experts_per_tok: int = 8
    """Routed experts each token is sent to (K_r)."""
    moe_intermediate_size: int = 2048
    """Width of each expert's SwiGLU."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups kept per token."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the (normalized) routed weights (2.5 in DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Normalize the top-k gate values to sum to one."""
    first_k_dense_replace: int = 0
    """The first k layers use the dense MLP instead of MoE."""
    moe_layer_freq: int = 1
    """Every moe_layer_freq-th layer (after the dense ones) is MoE."""
    scoring_func: str = "sigmoid"
    """Router affinity: 'sigmoid' (V3) or 'softmax' (V2)."""
    num_nextn_predict_layers: int = 0
    """Multi-token-prediction modules (D); stored at layer indices num_hidden_layers + i."""

    # --- r1lab-only knobs (not part of HF configs) ---
    seq_aux_loss_alpha: float = 0.0
    """Weight α of the complementary sequence-wise balance loss (0 disables; V3 used 1e-4)."""
    moe_impl: str = "auto"
    """Expert compute: 'loop' (reference), 'grouped' (sort + grouped GEMM), 'auto' (grouped on CUDA in bf16; on CUDA
    otherwise every expert densely for small token counts, so decode steps can be graph-captured)."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Unknown config.json fields, kept so that a save writes them back."""

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2"
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ConfigError("qwen2 has biases on q/k/v and none on o_proj; set model_type llama for other layouts")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.is_moe:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
            if self.scoring_func not in ("sigmoid", "softmax"):
                raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.moe_impl not in ("auto", "loop", "grouped"):
            raise ConfigError(f"moe_impl {self.moe_impl!r}: expected 'auto', 'loop' or 'grouped'")

    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def is_moe(self) -> bool:
        return self.model_type == "deepseek_v3" and bool(self.n_routed_experts)

    @property
    def rope_dim(self) -> int:
        """Dims each head rotates: the decoupled rope part for MLA, the whole head for GQA."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def layer_is_moe(self, layer_idx: int) -> bool:
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx - self.first_k_dense_replace) % self.moe_layer_freq == 0
        )

    @property
    def stop_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a parsed HF config.json (v4 or v5 rope form); errors name `source` and the field."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        required = REQUIRED_FIELDS["*"] + REQUIRED_FIELDS.get(model_type, ())
        missing = [name for name in required if name not in cfg]
        if missing:
            raise ConfigError(f"{source}: required field(s) missing: {', '.join(missing)} (model_type {model_type})")
        for name, value in _HF_DEFAULTS.get(model_type, {}).items():
            cfg.setdefault(name, value)
        rope_theta, rope_scaling = _normalize_rope(cfg, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {k: v for k, v in cfg.items() if k in known}
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = rope_scaling
        if model_type == "qwen2":
            kwargs["qkv_bias"], kwargs["o_bias"] = True, False
            if cfg.get("use_sliding_window"):
                raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        elif model_type in ("llama", "mistral"):
            bias = bool(cfg.get("attention_bias", False))
            kwargs["qkv_bias"], kwargs["o_bias"] = bias, bias
            if model_type == "mistral" and cfg.get("sliding_window") not in (None, 0):
                window, max_pos = cfg["sliding_window"], cfg.get("max_position_embeddings", 0)
                if window < max_pos:
                    raise ConfigError(f"{source}: sliding_window={window} < max_position_embeddings is not supported")
        elif model_type == "deepseek_v3":
            if cfg.get("attention_bias"):
                raise ConfigError(f"{source}: attention_bias=true is not supported for deepseek_v3")
            if cfg.get("topk_method", "noaux_tc") not in ("noaux_tc", "greedy", "group_limited_greedy"):
                raise ConfigError(f"{source}: topk_method {cfg['topk_method']!r} is not supported")
        if "torch_dtype" not in kwargs and "dtype" in cfg:
            kwargs["torch_dtype"] = cfg["dtype"]
        # The loader de-quantizes what quantization_config describes (fp8.py), so the weights r1lab holds and
        # saves are plain floats: the field must not travel into a saved config.json.
        weight_block_size(cfg.get("quantization_config"), source)
        skip = known | {"rope_parameters", "rope_scaling", "rope_theta", "attention_bias", "architectures", "dtype",
                        "quantization_config"}
        kwargs["extra"] = {k: v for k, v in cfg.items() if k not in skip}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json written by `save` (v4-style rope keys, which transformers 4 and 5 both read)."""
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM",
        }[self.model_type]
        out: dict[str, Any] = dict(self.extra)
        out.update(architectures=[arch], model_type=self.model_type)
        common = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
        ]
        for name in common:
            out[name] = getattr(self, name)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        if self.model_type in ("llama", "mistral"):
            out["attention_bias"] = self.qkv_bias
            out["head_dim"] = self.head_dim
        if self.model_type == "deepseek_v3":
            for name in [
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "rope_interleave", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "moe_intermediate_size", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                "first_k_dense_replace", "moe_layer_freq", "scoring_func", "num_nextn_predict_layers",
            ]:
                out[name] = getattr(self, name)
            out["topk_method"] = "noaux_tc"
            out["attention_bias"] = False
        return out

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


_INT_FIELDS_MIN = {
    # field: smallest valid value
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1, "q_lora_rank": 1, "kv_lora_rank": 1,
    "qk_nope_head_dim": 1, "qk_rope_head_dim": 1, "v_head_dim": 1, "n_routed_experts": 1, "n_shared_experts": 0,
    "num_experts_per_tok": 1, "moe_intermediate_size": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 0, "bos_token_id": 0, "pad_token_id": 0,
}
_NULLABLE = {"num_key_value_heads", "head_dim", "q_lora_rank", "n_routed_experts", "bos_token_id", "pad_token_id",
             "eos_token_id", "qkv_bias", "rope_scaling", "torch_dtype"}
_FLOAT_FIELDS = {"rms_norm_eps": True, "rope_theta": True, "initializer_range": False, "routed_scaling_factor": True,
                 "seq_aux_loss_alpha": False}  # field: must be > 0 (else >= 0)
_BOOL_FIELDS = {"qkv_bias", "o_bias", "tie_word_embeddings", "rope_interleave", "norm_topk_prob"}
_STR_FIELDS = {"model_type", "hidden_act", "scoring_func", "moe_impl", "torch_dtype"}


def _check_field_types(args: ModelArgs) -> None:
    """A wrong-typed field fails here, named with its value, not later as a TypeError deep in a layer's __init__."""

    def bad(name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{name} must be {expected}, got {value!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name in _INT_FIELDS_MIN.keys() | _FLOAT_FIELDS.keys() | _BOOL_FIELDS | _STR_FIELDS | {"eos_token_id",
                                                                                              "rope_scaling"}:
        value = getattr(args, name)
        if value is None and name in _NULLABLE:
            continue
        if name in _INT_FIELDS_MIN:
            low = _INT_FIELDS_MIN[name]
            if not is_int(value) or value < low:
                raise bad(name, value, f"an integer >= {low}" + (" or null" if name in _NULLABLE else ""))
        elif name in _FLOAT_FIELDS:
            positive = _FLOAT_FIELDS[name]
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0 or (positive and value == 0):
                raise bad(name, value, "a number > 0" if positive else "a number >= 0")
        elif name in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise bad(name, value, "true or false")
        elif name in _STR_FIELDS:
            if not isinstance(value, str):
                raise bad(name, value, "a string")
        elif name == "eos_token_id":
            ids = value if isinstance(value, (list, tuple)) else [value]
            if not all(is_int(i) and i >= 0 for i in ids):
                raise bad(name, value, "a token id, a list of token ids or null")
        elif name == "rope_scaling" and not isinstance(value, dict):
            raise bad(name, value, "an object or null")


def _normalize_rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) from either the v4 or the v5 config form."""
    params = cfg.get("rope_parameters")
    for name in ("rope_parameters", "rope_scaling"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise ConfigError(f"{source}: {name} must be an object or null, got {cfg[name]!r}")
    if isinstance(params, dict) and params:
        if "rope_type" not in params and any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported")
        params = dict(params)
        theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        scaling["rope_type"] = rope_type
        if scaling.pop("partial_rotary_factor", None) not in (None, 1.0):
            raise ConfigError(f"{source}: partial_rotary_factor is not supported")
        if rope_type == "default":
            scaling = None
        elif rope_type not in ("yarn", "llama3", "linear"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (yarn, llama3, linear)")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{source}: rope_theta must be a number > 0, got {theta!r}")
    return float(theta), scaling
