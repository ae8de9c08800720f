"""Block-quantized FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8): de-quantized to float when loaded.

Such a checkpoint stores a linear weight W [out, in] as float8_e4m3fn plus `<name>_scale_inv`, one float32 per
block of weight_block_size (128 x 128), shape [ceil(out/128), ceil(in/128)]; W ≈ fp8 * scale_inv, blockwise.
Embeddings, norms, the router and the head are not quantized. config.json says so in `quantization_config`:
{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}.
r1lab computes in bf16/fp32, so the weights are expanded once, tensor by tensor, as the shards are read.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InputError

SCALE_SUFFIX = "_scale_inv"
FLOAT8_DTYPES = ("F8_E4M3", "F8_E5M2")
"""safetensors' names of float8 dtypes: a tensor of one of these needs a scale to mean anything."""


class QuantizationError(InputError):
    """A quantization_config r1lab cannot de-quantize, or a quantized tensor without a usable scale."""


def weight_block_size(qcfg: Any, source: str) -> tuple[int, int] | None:
    """The (rows, cols) block of a config.json `quantization_config`; None when there is none. Anything but
    block-wise FP8 with dynamic activations is refused, naming the field."""
    if qcfg is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(qcfg, dict):
        raise QuantizationError(f"{where} must be an object, got {qcfg!r}")
    method = qcfg.get("quant_method")
    if method != "fp8":
        raise QuantizationError(f"{where}.quant_method {method!r} is not supported (r1lab de-quantizes only "
                                f"block-wise 'fp8'; de-quantize to bf16 first)")
    if qcfg.get("fmt", "e4m3") != "e4m3":
        raise QuantizationError(f"{where}.fmt {qcfg['fmt']!r} is not supported (only 'e4m3')")
    if qcfg.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantizationError(f"{where}.activation_scheme {qcfg['activation_scheme']!r} is not supported "
                                f"(only 'dynamic': static schemes carry activation scales r1lab does not use)")
    block = qcfg.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantizationError(f"{where}.weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """float32 W = weight * scale_inv, each scale covering one block (the last row/column of blocks may be
    partial: the expanded scales are cropped to W's shape)."""
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: a block-quantized weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = block
    expected = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expected:
        raise QuantizationError(f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}; weight {tuple(weight.shape)} "
                                f"in {br}x{bc} blocks needs {expected}")
    out = weight.float()
    # One row of blocks at a time: a full-size expanded scale would double the transient memory per weight.
    for i, row_scale in enumerate(scale_inv.float()):
        out[i * br:(i + 1) * br] *= row_scale.repeat_interleave(bc)[:cols]
    return out
