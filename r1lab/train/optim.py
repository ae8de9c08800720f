"""The optimizer and LR schedule every r1lab trainer uses (pretrain, SFT, reward model, GRPO)."""

from __future__ import annotations

import math

import torch


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
