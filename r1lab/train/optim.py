"""The optimizer and LR schedule every r1lab trainer uses (pretrain, SFT, reward model, GRPO)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r1lab.config import check_ranges


@dataclass
class ScheduleConfig:
    """Optimizer, schedule and placement settings that pretraining, SFT and the reward model share (their
    recipes keep flat keys: lr=..., warmup_steps=...). GRPO has its own: a constant rate after warmup."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (not on norms, biases or embeddings)."""
    grad_clip: float = 1.0
    """Max global grad norm."""
    router_bias_gamma: float = 1e-3
    """Aux-loss-free MoE bias update speed γ after every optimizer step (0 freezes routing)."""
    seed: int = 0
    """Seeds the data order and fresh weights."""
    device: str = "cpu"
    """Torch device for training."""
    dtype: str = "float32"
    """Parameter dtype ('float32' or 'bfloat16')."""
    log_every: int = 1
    """Write metrics every this many steps (and at the last step)."""

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"min_lr_ratio": 0, "warmup_steps": 0, "weight_decay": 0, "router_bias_gamma": 0,
                                     "log_every": 1}, positive=("lr", "grad_clip"))

    def lr_at(self, step: int, total_steps: int) -> float:
        return warmup_cosine_lr(step, total_steps, self.lr, self.warmup_steps, self.min_lr_ratio)


@dataclass
class ResumableScheduleConfig(ScheduleConfig):
    """ScheduleConfig plus the checkpoints of a trainer that resumes (SFT, reward model)."""

    save_every: int = 100
    """Checkpoint every this many optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    resume: bool = True
    """Continue from the run directory's latest checkpoint when there is one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, at_least={"save_every": 0, "keep_checkpoints": 1})


def warmup_cosine_lr(step: int, total_steps: int, peak: float, warmup: int, floor_ratio: float) -> float:
    """Linear warmup to peak over `warmup` steps, then cosine decay to floor_ratio·peak at total_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norms, biases and embeddings are not decayed)."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas,
    )
