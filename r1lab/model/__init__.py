"""r1lab's one transformer (Llama / Qwen2 / Mistral / DeepSeek-V3), its Hugging Face checkpoint I/O, and the
one place models and tokenizers are loaded (`load_model_and_tokenizer`)."""

from .cache import KVCache
from .config import ConfigError, ModelArgs
from .hf_io import CheckpointError, load, read_config, save
from .loading import (
    ASSETS_DIR,
    DEFAULT_MODEL_DIR,
    DEFAULT_STUDENT_DIR,
    build,
    check_vocabulary,
    load_model_and_tokenizer,
    torch_dtype,
)
from .presets import PRESETS, preset
from .transformer import Transformer

__all__ = [
    "ASSETS_DIR", "CheckpointError", "ConfigError", "DEFAULT_MODEL_DIR", "DEFAULT_STUDENT_DIR", "KVCache",
    "ModelArgs", "PRESETS", "Transformer", "build", "check_vocabulary", "load", "load_model_and_tokenizer",
    "preset", "read_config", "save", "torch_dtype",
]
