"""Data-parallel scale-out of the trainers with FSDP2 under torchrun (see docs/distributed.md).

What a trainer does with these functions, per step, on every rank:

1. `rank_share(prompts, info)`: this rank's whole prompts (a prompt's G completions never leave the rank
   that generated them, so GRPO's group statistics are local; `check_whole_groups` asserts it).
2. `with gathered_for_rollout(model, info) as policy: generate(policy, ...)`: the sharded weights are
   gathered once into a plain, unsharded replica of the model that lives on this rank; the rollout engine
   runs on it with no collective at all, so ranks may generate different numbers of tokens.
3. Rewards and advantages on the rank's own completions.
4. Training: every rank must run the same number of forward/backward passes per optimizer step (FSDP
   all-gathers in forward and reduce-scatters in backward are collectives): `max_across_ranks(n_packs)` and
   `dummy_backward(model)` for the missing ones. FSDP averages gradients over ranks, so a loss normalized by
   a *global* count (`sum_across_ranks`) and multiplied by `info.world_size` reproduces the single-process
   gradient exactly. `clip_grad_norm` clips by the global norm.
5. `all_reduce_expert_loads(model, info)` before `model.update_router_bias` (every rank then applies the
   same bias update, so routing stays identical across ranks), `all_reduce_metrics` before logging.
6. Rank 0 writes logs; `save_checkpoint` writes one consolidated Hugging Face folder (rank 0,
   `save_consolidated`) and the resumable sharded model+optimizer state (every rank, `save_sharded`);
   `restore_checkpoint` reads it back with any number of processes (torch.distributed.checkpoint).

Without torchrun (WORLD_SIZE unset or 1) every function is a cheap no-op around the plain model.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from r1lab.model.hf_io import empty_model
from r1lab.train.logprobs import mtp_loss_sums

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs and checkpoints."""
        return self.rank == 0


# ----------------------------------------------------------------------------- process group
def init_distributed(device: str | torch.device | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_ADDR/PORT).

    device: "cuda" or "cpu" (None: cuda when available). NCCL on CUDA (device cuda:LOCAL_RANK), gloo on CPU.
    NCCL_NVLS_ENABLE defaults to 0 (NVLink multicast off) unless the environment already sets it.
    WORLD_SIZE unset or 1: no process group, a single-process DistInfo, unless R1LAB_FSDP=1 asks for the
    sharded code path anyway (a 1-process group: the same numerics as N processes, e.g. to compare 1 and N
    GPUs). An already initialized default group (e.g. a test that called init_process_group itself) is reused.
    """
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    one_process_fsdp = os.environ.get("R1LAB_FSDP") == "1"
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 or one_process_fsdp:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # torchrun sets these; a plain process may not
            os.environ.setdefault("MASTER_PORT", "29511")
            if kind == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=torch.device("cuda", local) if kind == "cuda" else None)
    dev = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev,
                    is_distributed=world > 1 or (one_process_fsdp and dist.is_initialized()))


def single_process(device: str | torch.device = "cpu") -> DistInfo:
    return DistInfo(device=torch.device(device))


def rank0_log(log: Callable[[str], None], info: DistInfo) -> Callable[[str], None]:
    """`log` on rank 0, a function that drops its message on the others (every rank runs the same code)."""
    return log if info.is_main else _drop


def _drop(_: str) -> None:
    pass


_torn_down_cleanly = False  # set by shutdown(clean=True); read by exit_after_teardown


def shutdown(*, clean: bool = True) -> None:
    """Tear the default process group down, if there is one. clean=True (every rank got here without an
    error): wait for all ranks first, since a gloo rank that destroys its group while a peer is still working
    can abort the process; after an error, don't wait for ranks that may never come."""
    global _torn_down_cleanly
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _torn_down_cleanly = clean


def exit_after_teardown(code: int | str | None) -> None:
    """End a process whose process group `shutdown()` tore down cleanly without finalizing the interpreter:
    atexit handlers run and stdio is flushed, then os._exit. Why: during finalization Python ends any thread
    that asks for the GIL with pthread_exit, and a torch/gloo C++ thread unwound that way aborts the process
    ("terminate called without an active exception", exit -6) after all its work was done and written
    (three CI runs saw it, never reproduced locally). Does nothing (returns) when no group was torn down
    cleanly, so single-process runs and failed runs exit the normal way."""
    if not _torn_down_cleanly:
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit(message) would have printed
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- sharding
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


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly DTensor) parameter or buffer; a collective for DTensors."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- rollout
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
        dst[name].copy_(_full(p.detach()))  # in place: the engine (and its CUDA graphs) keep their pointers
    dst_buf = dict(replica.named_buffers())
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # the only trained buffer (identical on every rank)
            dst_buf[name].copy_(_full(b))
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


def release_rollout_replica(model) -> None:
    """Free the replica (e.g. before evaluation at a larger batch or at the end of training)."""
    from r1lab.rollout import release_engines

    if _replicas.pop(id(model), None) is not None:
        release_engines()


# ----------------------------------------------------------------------------- data sharing
def share_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return start, start + base + (1 if info.rank < extra else 0)


def rank_share(items: Sequence[T], info: DistInfo, group_size: int = 1) -> list[T]:
    """This rank's contiguous share of `items`, in whole groups of `group_size` consecutive items
    (group_size=1: items are prompts, each one a group-to-be). Shares differ by at most one group."""
    if len(items) % group_size:
        raise ValueError(f"{len(items)} items do not form whole groups of {group_size}")
    start, stop = share_bounds(len(items) // group_size, info)
    return list(items[start * group_size : stop * group_size])


def check_whole_groups(prompt_index: Sequence[int], group_size: int) -> None:
    """The invariant that makes group advantages local: the rank's completions are prompt-major, in whole
    groups of exactly group_size completions of one prompt each. Raises AssertionError otherwise."""
    n = len(prompt_index)
    assert n % group_size == 0, f"{n} completions are not whole groups of {group_size}"
    seen: set[int] = set()
    for g in range(n // group_size):
        members = set(prompt_index[g * group_size : (g + 1) * group_size])
        assert len(members) == 1, f"group {g} mixes prompts {sorted(members)}"
        assert not members & seen, f"prompt {prompt_index[g * group_size]} is split across groups"
        seen |= members


def all_gather_objects(obj: T, info: DistInfo) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process. A collective."""
    if not info.is_distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's `obj` on every rank (e.g. a run directory named from the clock). A collective."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- reductions
def _reduce(values: list[float], info: DistInfo, op) -> list[float]:
    if not info.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def sums_across_ranks(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sums over ranks of a few numbers, in one collective (float64; the values as given
    with a single process)."""
    return _reduce([float(v) for v in values], info, dist.ReduceOp.SUM)


def sum_across_ranks(x: float, info: DistInfo) -> float:
    """E.g. the global count of loss tokens / sequences that normalizes the GRPO loss."""
    return sums_across_ranks([x], info)[0]


def max_across_ranks(x: int, info: DistInfo) -> int:
    """E.g. the number of micro-batches every rank runs (pad with dummy_backward up to it)."""
    return int(_reduce([float(x)], info, dist.ReduceOp.MAX)[0])


def min_across_ranks(x: int, info: DistInfo) -> int:
    return int(_reduce([float(x)], info, dist.ReduceOp.MIN)[0])


def minibatch_plan(n_groups: int, group_size: int, num_minibatches: int, info: DistInfo,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """split_minibatches of this rank's completions into the same number of optimizer steps on every rank
    (min(num_minibatches, fewest completions on any rank that has some), at least 1); a rank with no groups
    gets that many empty minibatches (it still joins every step with dummy passes). A collective."""
    from r1lab.train.batching import split_minibatches

    n = n_groups * group_size
    fewest = -max_across_ranks(-n if n else -(10**12), info)  # min over ranks with completions
    k = max(1, min(num_minibatches, fewest))
    if n == 0:
        return [[] for _ in range(k)]
    return split_minibatches(n_groups, group_size, num_minibatches=k, generator=generator)


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
    return float(_full(norm))


def all_reduce_expert_loads(model, info: DistInfo) -> None:
    """Sum every MoE layer's `expert_load` over ranks (one collective), so the aux-loss-free bias update
    that follows sees the global load and moves the same way on every rank. Call right before
    model.expert_load_balance() / model.update_router_bias()."""
    layers = model.moe_layers()
    if not info.is_distributed or not layers:
        return
    flat = torch.cat([m.expert_load.float().reshape(-1) for m in layers]).to(info.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for m, part in zip(layers, flat.split([m.expert_load.numel() for m in layers])):
        m.expert_load.copy_(part.view_as(m.expert_load))


def all_reduce_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Combine per-rank metrics: mean over the ranks that report a key; keys ending in `_max` take the max,
    `_min` the min, and throughputs (`_per_s`) the sum. Ranks may report different key sets."""
    if not info.is_distributed:
        return dict(metrics)
    key_sets: list = [None] * info.world_size
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted(set().union(*key_sets))
    present = [1.0 if k in metrics else 0.0 for k in keys]
    vals = [float(metrics.get(k, 0.0)) for k in keys]
    sums = _reduce(vals + present, info, dist.ReduceOp.SUM)
    inf = float("inf")
    maxes = _reduce([v if k in metrics else -inf for k, v in zip(keys, vals)], info, dist.ReduceOp.MAX)
    mins = _reduce([v if k in metrics else inf for k, v in zip(keys, vals)], info, dist.ReduceOp.MIN)
    out = {}
    for i, k in enumerate(keys):
        if k.endswith("_max"):
            out[k] = maxes[i]
        elif k.endswith("_min"):
            out[k] = mins[i]
        elif k.endswith("_per_s"):
            out[k] = sums[i]
        else:
            out[k] = sums[i] / sums[len(keys) + i]
    return out


# ----------------------------------------------------------------------------- checkpoints
def consolidated_state_dict(model, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) model state on CPU on rank 0, None on the others. A collective."""
    if not info.is_distributed or not is_sharded(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if info.is_main else None


def save_consolidated(model, info: DistInfo, path: str | Path, *, dtype: torch.dtype | None = None,
                      extra_files: dict[str, str] | None = None) -> Path | None:
    """One Hugging Face folder (config.json + safetensors) that r1lab.model.load reads, written by rank 0;
    every rank must call it (it gathers) and all return once the folder exists. dtype: of the saved
    weights (default: the master parameters' dtype, fp32 under FSDP mixed precision)."""
    from r1lab.model import save as save_model

    path = Path(path)
    if not is_sharded(model) and (dtype is None or dtype == next(model.parameters()).dtype):
        out = save_model(model, path, extra_files=extra_files) if info.is_main else None  # one writer
        barrier(info)
        return out if info.is_main else path
    state = consolidated_state_dict(model, info)
    out = None
    if state is not None and info.is_main:
        dtype = dtype or next(iter(v for k, v in state.items() if v.is_floating_point())).dtype
        plain = empty_model(model.args, torch.device("cpu"), dtype)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.args.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"consolidated state does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        out = save_model(plain, path, extra_files=extra_files)
    barrier(info)
    return out if info.is_main else path


def save_model_folder(model, tokenizer, info: DistInfo, path: str | Path) -> Path:
    """A trainer's final HF folder: the consolidated weights (save_consolidated) and the tokenizer, written by
    rank 0; every rank must call it and all return once the folder is complete. Plain save in one process."""
    path = Path(path)
    save_consolidated(model, info, path)
    if info.is_main:
        tokenizer.save(path)
    barrier(info)
    return path


def save_sharded(model, optimizer, info: DistInfo, path: str | Path, extra: dict | None = None) -> Path:
    """Resumable model + optimizer state with torch.distributed.checkpoint: each rank writes its shards
    (a plain model in one process writes everything). Loadable by any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(path))
    if extra is not None and info.is_main:
        torch.save(extra, Path(path) / "extra.pt")
    barrier(info)
    return Path(path)


def load_sharded(model, optimizer, info: DistInfo, path: str | Path) -> dict | None:
    """Load save_sharded's state into `model` (sharded or not, any process count) and `optimizer` (built
    on that model, before its first step); returns the saved `extra` dict (None if none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # partial: parameters that never had a gradient (e.g. the MTP module during GRPO) have no optimizer
    # state in the checkpoint; they keep the fresh (zero) state get_state_dict initialized
    with warnings.catch_warnings():
        if not info.is_distributed:  # loading in one process is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = Path(path) / "extra.pt"
    return torch.load(extra, weights_only=False) if extra.is_file() else None


# ----------------------------------------------------------------------------- trainer checkpoints
SHARDED_DIR = "sharded"


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, info: DistInfo, *,
                    extra_state: dict | None = None, keep_last: int = 3, tokenizer=None) -> Path:
    """checkpoint.save_checkpoint's layout, for a sharded model (every rank calls it):
        step_N/model/            one consolidated Hugging Face folder (rank 0), with the tokenizer if given
        step_N/sharded/          model + optimizer, torch.distributed.checkpoint shards (every rank)
        step_N/trainer_state.pt  scheduler, RNG, extra state, step (rank 0; optimizer=None: it is sharded)
    then `latest` and pruning as usual. Multi-node: run_dir must be one shared filesystem.
    In a single process (not info.is_distributed) this is checkpoint.save_checkpoint itself."""
    from r1lab.fsutil import atomic_write_text, fsync_tree, replace_dir
    from r1lab.train import checkpoint as ck

    if not info.is_distributed:
        return ck.save_checkpoint(run_dir, step, model, optimizer, scheduler, extra_state, keep_last=keep_last,
                                  tokenizer=tokenizer)

    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-dist"  # the same path on every rank
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    save_consolidated(model, info, tmp / "model")
    save_sharded(model, optimizer, info, tmp / SHARDED_DIR)
    final = root / name
    if info.is_main:
        if tokenizer is not None:
            tokenizer.save(tmp / "model")
        torch.save({"step": int(step), "optimizer": None, "world_size": info.world_size,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": ck.rng_state(), "extra": dict(extra_state or {})}, tmp / ck.STATE_FILE)
        fsync_tree(tmp)
        replace_dir(tmp, final)
        atomic_write_text(root / "latest", name + "\n")
        ck._prune(root, keep_last, keep=final)
    barrier(info)
    return final


def restore_checkpoint(path: str | Path, model, optimizer, scheduler, info: DistInfo) -> dict:
    """Resume from a checkpoint dir with any number of processes: one written by save_checkpoint above
    (sharded state, any world size) or by the single-process checkpoint.save_checkpoint (plain model only).
    Returns the extra state with "step" added, like checkpoint.restore."""
    from r1lab.train import checkpoint as ck

    path = Path(path)
    if not (path / SHARDED_DIR).is_dir():
        if is_sharded(model):
            raise ValueError(f"{path}: a single-process checkpoint; resume it with one process, save, then scale out")
        return ck.restore(path, model, optimizer, scheduler)
    state = torch.load(path / ck.STATE_FILE, map_location="cpu", weights_only=True)
    load_sharded(model, optimizer, info, path / SHARDED_DIR)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    ck.set_rng_state(state["rng"])
    return {**state["extra"], "step": state["step"]}
