"""r1lab's one transformer (Llama / Qwen2 / Mistral / DeepSeek-V3) and its Hugging Face checkpoint I/O."""

from .cache import KVCache
from .config import ConfigError, ModelArgs
from .hf_io import CheckpointError, load, read_config, save
from .presets import PRESETS, preset
from .transformer import Transformer


def build(args: ModelArgs, seed: int = 0, dtype=None, device="cpu") -> Transformer:
    """A freshly initialized model (normal(0, initializer_range) weights) for `args`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    model.init_weights(gen)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelArgs", "PRESETS", "Transformer", "build", "load", "preset",
    "read_config", "save",
]
