"""Small building blocks shared by every architecture: RMSNorm, rotary embeddings (plain, YaRN, llama3), SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the weight, as HF does: keeps bf16 logits bit-comparable.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP, the shared expert and the DeepSeek dense layers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- rotary embeddings
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim // 2] and the cos/sin amplitude factor for args' rope scaling."""
    dim, base = args.rope_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq.float(), 1.0
    if rope_type == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    if rope_type == "llama3":
        factor, low_ff = scaling["factor"], scaling.get("low_freq_factor", 1.0)
        high_ff, old_len = scaling.get("high_freq_factor", 4.0), scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled).float(), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(args, scaling, dim, base)
    raise ValueError(f"unknown rope_type {rope_type!r}")


def _yarn_frequencies(args: ModelArgs, scaling: dict, dim: int, base: float) -> tuple[torch.Tensor, float]:
    original_len = scaling.get("original_max_position_embeddings", args.max_position_embeddings)
    factor = scaling.get("factor") or args.max_position_embeddings / original_len
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    amplitude = scaling.get("attention_factor")
    if amplitude is None:
        amplitude = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else _yarn_mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate, interpolate = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_original = 1 - ramp  # high-frequency dims keep the original frequency
    inv_freq = interpolate * (1 - keep_original) + extrapolate * keep_original
    return inv_freq, float(amplitude)


def attention_softmax_scale(args: ModelArgs, qk_head_dim: int) -> float:
    """1/sqrt(d), times YaRN's mscale(all_dim)^2 as DeepSeek-V3 applies it to MLA scores."""
    scale = qk_head_dim**-0.5
    scaling = args.rope_scaling or {}
    if args.is_mla and scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        m = _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) tables [B, T, rope_dim // 2] for given positions, in fp32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq, self.amplitude = rope_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D/2].

    `interleaved` means the checkpoint pairs dims (0,1), (2,3), ... (DeepSeek); the output is then laid out
    as [rotated evens, rotated odds], which is HF's layout too. Queries and keys go through the same
    permutation, so their dot products are those of the reference.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    x1f, x2f = x1.float(), x2.float()
    out = torch.cat([x1f * cos - x2f * sin, x2f * cos + x1f * sin], dim=-1)
    return out.to(x.dtype)
