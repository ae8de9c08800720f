"""Training building blocks: GRPO math, chunked log-probs, packing, checkpoints, run directories.

Trainers (pretrain, SFT, GRPO, reward model) build on these; everything here is a small pure function or
a small class with its own unit test.
"""

from .batching import PackedBatch, micro_batches_by_tokens, pack_sequences, split_minibatches, unpack_to_sequences
from .checkpoint import load_latest_checkpoint, restore, save_checkpoint
from .grpo_math import (
    Objective,
    dynamic_sampling_filter,
    group_advantages,
    group_reward_std,
    k3_kl,
    overlong_filter_mask,
    policy_loss,
    soft_overlong_penalty,
    truncated_is_weights,
)
from .logprobs import entropy_from_logits, logprobs_from_hidden, token_logprobs
from .run_dir import RunDir, read_jsonl

__all__ = [
    "Objective", "PackedBatch", "RunDir", "dynamic_sampling_filter", "entropy_from_logits", "group_advantages",
    "group_reward_std", "k3_kl", "load_latest_checkpoint", "logprobs_from_hidden", "micro_batches_by_tokens",
    "overlong_filter_mask", "pack_sequences", "policy_loss", "read_jsonl", "restore", "save_checkpoint",
    "soft_overlong_penalty", "split_minibatches", "token_logprobs", "truncated_is_weights", "unpack_to_sequences",
]
