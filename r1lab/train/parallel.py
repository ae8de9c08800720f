"""FSDP2 sharding of a model and the plain replicas the rollout engine and the KL reference run on.

`shard_model` applies FSDP2 once, before a trainer builds its optimizer. Generation never runs on the
sharded module: `gathered_for_rollout` yields a persistent plain replica (refreshed in place from the shards,
so the engine's KV cache and CUDA graphs stay valid), on which ranks decode without any collective. One
process: every function here returns the model itself. Processes and collectives: r1lab/distributed.py;
the optimizer step: train/step.py; sharded checkpoints: train/checkpoint.py.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from r1lab.distributed import DistInfo
from r1lab.model.hf_io import empty_model


def shard_model(model, info: DistInfo, *, mixed_precision: bool = True, reshard_after_forward: bool = True,
                sync_from_rank0: bool = True):
    """FSDP2 (`fully_shard`) on every decoder block and MTP module, then the root (embedding, final norm,
    head: the tied embedding/head stays in one group); `forward_hidden` is registered as a forward method
    so it gathers the root's parameters like `forward` does (call logits / mtp_loss_sums only after it).
    Parameters become DTensors sharded on dim 0 over all ranks; buffers (router correction bias, rotary
    tables, expert loads) stay whole on every rank. MTP modules are not resharded after their forward (their
    loss uses `shared_head.norm` outside the module's forward); reshard_after_forward applies to the blocks.

    On CUDA with mixed_precision: bf16 compute parameters (all-gathered in bf16), fp32 gradient reduction,
    fp32 master shards. On CPU: plain fp32. Build the optimizer *after* this call. Returns the model
    (sharded in place); with a single process it is only moved to info.device.
    sync_from_rank0: first broadcast rank 0's parameters and buffers (each rank shards its own copy, so the
    copies must be identical; this guards against ranks that initialized or loaded differently).
    """
    model.to(info.device)
    if not info.is_distributed:
        return model
    if sync_from_rank0:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs: dict = dict(mesh=mesh)
    if info.device.type == "cuda" and mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # MTP modules stay gathered from their forward to their backward: the MTP loss (logprobs.mtp_loss_sums)
    # calls the module's own `shared_head.norm` *after* its forward returns, which
    # must see the full weight, not the shard. An MTP module is one block per depth, so this costs little.
    for block in getattr(model, "mtp", []):
        fully_shard(block, reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # root: gathered again at once by backward
    # The trainers call forward_hidden, then the head / MTP losses on its output, never model(...): make
    # forward_hidden gather the root's parameters like forward does. They stay gathered (root:
    # reshard_after_forward=False) for the head and MTP losses and are reduce-scattered once, at the end of
    # the backward. logits / mtp_loss_sums must NOT be registered too: their input (the hidden state)
    # requires grad, so FSDP would reduce-scatter and free the head in the middle of the backward, once per
    # logits chunk.
    register_fsdp_forward_method(model, "forward_hidden")
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly DTensor) parameter or buffer; a collective for DTensors."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


_replicas: dict[int, torch.nn.Module] = {}  # id(sharded model) → its rollout replica


def _rollout_dtype(model, info: DistInfo) -> torch.dtype:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        try:  # what the sharded forward computes in (a private attribute: fall back to the master dtype)
            param_dtype = model._get_fsdp_state()._mp_policy.param_dtype
        except AttributeError:
            param_dtype = None
        if param_dtype is not None:
            return param_dtype
    return next(model.parameters()).dtype


def _frozen_plain_copy(model, info: DistInfo):
    """An unsharded, gradient-free model of `model`'s shape on this rank, in the rollout dtype (weights unset)."""
    replica = empty_model(model.args, info.device, _rollout_dtype(model, info))
    for p in replica.parameters():
        p.requires_grad_(False)
    return replica


@torch.no_grad()
def refresh_replica(model, info: DistInfo, replica=None):
    """Copy the current full weights of the sharded `model` into its rollout replica (created on the first
    call) and return the replica. Every rank must call this at the same point: one all-gather per
    parameter, in named_parameters order."""
    if replica is None:
        replica = _replicas.get(id(model))
    if replica is None:
        replica = _replicas[id(model)] = _frozen_plain_copy(model, info)
    dst = dict(replica.named_parameters())
    for name, p in model.named_parameters():
        dst[name].copy_(full_tensor(p.detach()))  # in place: the engine (and its CUDA graphs) keep their pointers
    dst_buf = dict(replica.named_buffers())
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # the only trained buffer (identical on every rank)
            dst_buf[name].copy_(full_tensor(b))
    replica.gradient_checkpointing = False
    return replica.eval()


@contextlib.contextmanager
def gathered_for_rollout(model, info: DistInfo) -> Iterator[torch.nn.Module]:
    """`with gathered_for_rollout(model, info) as policy:` — a module with the full current weights for
    r1lab.rollout.generate on this rank.

    Single process: the model itself. Sharded: a persistent plain replica (refreshed on entry, in the
    rollout dtype = FSDP's param dtype, bf16 on CUDA), so generation runs without any collective and ranks
    may decode different numbers of steps. Memory: one full copy of the weights per rank in the rollout
    dtype, kept between steps (the engine's KV cache and CUDA graphs stay valid because the replica's
    tensors are updated in place), plus one parameter gathered at a time during the refresh. Enter it once
    per step on every rank (the refresh is a collective), around all of the step's generate calls.
    """
    if not info.is_distributed or not is_sharded(model):
        yield model
        return
    yield refresh_replica(model, info)


def reference_replica(model, info: DistInfo, replica=None):
    """GRPO's KL reference under FSDP: a frozen, plain (unsharded) copy of the sharded `model`'s current
    weights on this rank, in the rollout dtype (bf16 on CUDA with mixed precision, else the master dtype).
    Pass the previous replica to refresh it in place (a reference reset) instead of allocating a new one.
    A collective (one all-gather per parameter): every rank calls it at the same point. Using the replica
    afterwards involves no collective, so ranks may score different numbers of sequences with it.
    Memory: one more full copy of the weights per rank (besides the rollout replica), kept for the run."""
    return refresh_replica(model, info, replica if replica is not None else _frozen_plain_copy(model, info))


def release_rollout_replica(model) -> bool:
    """Forget the model's rollout replica (e.g. before a later stage loads another model, or before
    evaluation at a larger batch). Returns whether there was one: the caller then releases the rollout
    engines that ran on it (`r1lab.rollout.release_engines`), which this module does not import."""
    return _replicas.pop(id(model), None) is not None
