"""Trainers (pretraining, SFT, reward model, GRPO) and what they share.

    step.py        the one optimizer step: normalizers, padding passes, aux loss, clipping, MoE bias update
    parallel.py    FSDP2 sharding and the plain replicas rollout and the KL reference run on
    checkpoint.py  resumable checkpoints (plain or sharded) and consolidated HF folders
    grpo_math.py   GRPO's advantages, filters and the policy loss as small registered functions
    batching.py    packing and group-aware minibatches; logprobs.py / fused_head.py: the chunked head
"""

from .batching import PackedBatch, micro_batches_by_tokens, pack_sequences, split_minibatches, unpack_to_sequences
from .checkpoint import load_latest_checkpoint, restore, restore_checkpoint, save_checkpoint
from .grpo_math import (
    AGGREGATIONS,
    RATIO_LEVELS,
    Objective,
    dynamic_sampling_filter,
    group_advantages,
    group_reward_std,
    k3_kl,
    overlong_filter_mask,
    policy_loss,
    register_aggregation,
    register_ratio_level,
)
from .logprobs import entropy_from_logits, logprobs_from_hidden, token_logprobs
from .step import StepResult, train_step

__all__ = [
    "AGGREGATIONS", "Objective", "PackedBatch", "RATIO_LEVELS", "StepResult", "dynamic_sampling_filter",
    "entropy_from_logits", "group_advantages", "group_reward_std", "k3_kl", "load_latest_checkpoint",
    "logprobs_from_hidden", "micro_batches_by_tokens", "overlong_filter_mask", "pack_sequences", "policy_loss",
    "register_aggregation", "register_ratio_level", "restore", "restore_checkpoint", "save_checkpoint",
    "split_minibatches", "token_logprobs", "train_step", "unpack_to_sequences",
]
