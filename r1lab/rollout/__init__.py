"""The rollout engine: generation from token ids with a slotted or paged KV cache, continuous batching, sampling.

    from r1lab.rollout import SamplingParams, generate
    completions = generate(model, [[1, 2, 3], [4, 5]], SamplingParams(temperature=1.0, max_new_tokens=64, n=4))

`generate` keeps one Engine per model between calls (the cache and captured CUDA graphs are reused, e.g. by
every GRPO step); `release_engines()` frees it. For live requests use an `Engine` directly:
`add_request(prompt, params) → request_id`, then `step() → [StreamEvent]` while `has_unfinished()`.
Tools: `SamplingParams(tool=PythonTool().hook(tokenizer), detokenize=tokenizer.decode)` lets samples call a
tool mid-generation (the sample pauses, the others go on; the reply's ids join token_ids, marked in
Completion.tool_mask).
"""

from __future__ import annotations

import torch

from r1lab.model import KVCache

from .engine import Completion, Engine, EngineStats, StreamEvent
from .sampling import SamplingParams

_engines: dict[int, Engine] = {}  # id(model) → the engine generate() reuses (one model at a time)


def generate(model, prompts: list[list[int]], params: SamplingParams, *, engine: Engine | None = None,
             **engine_options) -> list[Completion]:
    """Sample params.n completions of every prompt; returns len(prompts) * n completions, prompt-major.

    Without `engine`, reuses the model's cached engine when its cache is long and wide enough, else builds
    one sized for this call (engine_options go to Engine, e.g. num_slots, kv_cache_bytes, cuda_graphs, paged).
    """
    if not prompts:
        return []
    if engine is None:
        engine = _engine_for(model, prompts, params, engine_options)
    return engine.generate(prompts, params)


def _engine_for(model, prompts, params: SamplingParams, options: dict) -> Engine:
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    weight = model.lm_head.weight
    wanted_slots = min(len(prompts) * params.n, 512 if weight.is_cuda else 64)
    paged = options.get("paged", False)
    engine = _engines.get(id(model))
    if (engine is not None and engine.model is model and engine.options == options and engine.max_len >= longest
            and (paged or engine.num_slots >= wanted_slots) and engine.device == weight.device):
        return engine
    release_engines()  # free the old cache before allocating the new one
    sized = dict(options)
    if paged:  # rows and blocks: the Engine's defaults; max_len only bounds one sequence
        sized.setdefault("max_len", max(longest, model.args.max_position_embeddings))
    elif "num_slots" not in sized and "kv_cache_bytes" not in sized:
        sized.setdefault("max_len", -(-longest // 64) * 64)
        sized["num_slots"] = wanted_slots
        if weight.is_cuda:  # never take more than half the free memory for the cache
            per_seq = sized["max_len"] * KVCache.bytes_per_token(model.args, weight.dtype)
            sized["num_slots"] = max(1, min(wanted_slots, torch.cuda.mem_get_info(weight.device)[0] // 2 // per_seq))
    engine = Engine(model, **sized)
    engine.options = dict(options)
    _engines[id(model)] = engine
    return engine


def release_engines() -> None:
    """Drop the engines generate() keeps (and their KV caches, CUDA graphs and tool threads)."""
    for engine in _engines.values():
        engine.close()
    _engines.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Completion", "Engine", "EngineStats", "SamplingParams", "StreamEvent", "generate", "release_engines"]
