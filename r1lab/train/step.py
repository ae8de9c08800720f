"""The optimizer step every r1lab trainer takes (pretraining, SFT, reward model, GRPO).

A trainer brings its micro-batches and its loss; `train_step` owns everything else, once:

1. the step's normalizers: `counts(mb)` of every micro-batch, summed over the micro-batches of every rank
   (one collective), so a loss normalized by them is the loss of the whole global batch however it is cut
   into micro-batches and ranks;
2. one forward/backward per micro-batch: `loss_fn(mb, totals)` returns that micro-batch's share of the
   step's loss; the MoE sequence-balance loss (when the model has one) is added weighted by the micro-batch's
   share of the first normalizer, so it too is one mean over the step;
3. under FSDP, padding passes (a zero-gradient forward/backward) up to the largest number of micro-batches
   of any rank, since every rank must join every all-gather and reduce-scatter; FSDP averages gradients over
   ranks, so each loss is multiplied by the world size. Plain replicas (a data-parallel model that is not
   sharded) sum their gradients over ranks instead;
4. clipping by the global gradient norm;
5. the global MoE expert loads (summed over ranks), the optimizer and scheduler step, and the
   aux-loss-free router-bias update (DeepSeek-V3 §2.1.2) with speed `router_bias_gamma`.

The model must offer the MoE protocol of r1lab.model.Transformer (`aux_loss`, `moe_layers`,
`expert_load_balance`, `update_router_bias`) and, under FSDP, `forward_hidden`, `logits` and `mtp`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from r1lab.distributed import DistInfo, max_across_ranks, sums_across_ranks
from r1lab.train.logprobs import mtp_loss_sums
from r1lab.train.parallel import full_tensor, is_sharded

MicroBatch = TypeVar("MicroBatch")
LossFn = Callable[[Any, dict[str, float]], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class StepResult:
    grad_norm: float
    """Global gradient norm before clipping."""
    expert_balance: float | None
    """max/mean routed tokens per expert over this step's training forwards (None for dense models)."""
    totals: dict[str, float]
    """The step's normalizers: each count summed over all micro-batches of all ranks."""
    stats: list[dict[str, Any]] = field(default_factory=list)
    """What loss_fn returned beside the loss, one dict per micro-batch of this rank, in order."""


def train_step(model, optimizer: torch.optim.Optimizer, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, *,
               counts: Callable[[MicroBatch], dict[str, float]], normalizers: Sequence[str], info: DistInfo,
               grad_clip: float, router_bias_gamma: float, scheduler=None, dummy_mtp: bool = False) -> StepResult:
    """One optimizer step over this rank's `micro_batches` (see the module docstring for the protocol).

    counts(mb): the numbers this trainer's loss is normalized by, e.g. {"tokens": response tokens}, with the
        keys `normalizers` names; the first of them also weights the MoE balance loss of each micro-batch.
        A rank without micro-batches contributes zeros.
    loss_fn(mb, totals) → (loss, stats): a 0-dim loss already divided by the global totals it needs.
    grad_clip: max global gradient norm; 0 or less does not clip (the norm is still measured).
    dummy_mtp: the real passes run the MTP modules, so the FSDP padding passes must too (SFT, pretraining).
    """
    sharded = info.is_distributed and is_sharded(model)
    per_batch = [counts(mb) for mb in micro_batches]
    totals = dict(zip(normalizers, sums_across_ranks([sum(c[k] for c in per_batch) for k in normalizers], info)))
    share_key = normalizers[0]
    n_passes = max_across_ranks(len(micro_batches), info) if sharded else len(micro_batches)
    scale = info.world_size if sharded else 1

    optimizer.zero_grad(set_to_none=True)
    stats = []
    for mb, mb_counts in zip(micro_batches, per_batch):
        loss, mb_stats = loss_fn(mb, totals)
        aux = model.aux_loss()
        if aux is not None:
            loss = loss + aux * (mb_counts[share_key] / max(totals[share_key], 1e-12))
        (loss * scale).backward()
        stats.append(mb_stats)
    for _ in range(n_passes - len(micro_batches)):
        dummy_backward(model, info, mtp=dummy_mtp)
    if info.is_distributed and not sharded:
        _sum_replica_gradients(model, info)

    grad_norm = clip_grad_norm(model, grad_clip if grad_clip > 0 else float("inf"))
    all_reduce_expert_loads(model, info)  # global loads: every rank then moves its router bias the same way
    balance = model.expert_load_balance()  # loads counted since the last bias update
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    model.update_router_bias(router_bias_gamma)  # γ = 0 still resets the per-step load counts
    return StepResult(grad_norm, balance, totals, stats)


def dummy_backward(model, info: DistInfo, *, mtp: bool = False) -> None:
    """A forward/backward that contributes zero gradient, so a rank with fewer micro-batches still joins
    the FSDP all-gathers and reduce-scatters of the others. Runs in eval mode (MoE loads not counted).
    mtp=True: also through every MTP module, for trainers whose real passes run the MTP loss (SFT,
    pretraining); the dummy must touch the same FSDP units, in the same order, as a real pass."""
    was_training = model.training
    model.eval()
    try:
        depth = len(getattr(model, "mtp", [])) if mtp else 0
        ids = torch.zeros(1, 1 + (depth + 1 if depth else 0), dtype=torch.long, device=info.device)
        hidden = model.forward_hidden(ids)
        loss = model.logits(hidden).float().sum()
        if depth:
            loss = loss + mtp_loss_sums(model, hidden, ids)[0]
        (loss * 0.0).backward()
    finally:
        model.train(was_training)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip by the global gradient norm (over all shards) and return it as a float on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(full_tensor(norm))


def all_reduce_expert_loads(model, info: DistInfo) -> None:
    """Sum every MoE layer's `expert_load` over ranks (one collective), so the aux-loss-free bias update
    that follows sees the global load and moves the same way on every rank."""
    layers = model.moe_layers()
    if not info.is_distributed or not layers:
        return
    flat = torch.cat([m.expert_load.float().reshape(-1) for m in layers]).to(info.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for m, part in zip(layers, flat.split([m.expert_load.numel() for m in layers])):
        m.expert_load.copy_(part.view_as(m.expert_load))


def _sum_replica_gradients(model, info: DistInfo) -> None:
    """Data parallelism over plain replicas: add up the ranks' gradients (one collective for the flags, one
    for the values). A parameter gets a gradient when some rank produced one (the others count zeros), so
    parameters the model never uses keep none, as in one process."""
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([float(p.grad is not None) for p in params], device=info.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, has.tolist()) if h]
    if not used:
        return
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in used])
    dist.all_reduce(flat)
    for p, part in zip(used, flat.split([p.numel() for p in used])):
        p.grad.copy_(part.view_as(p.grad))
