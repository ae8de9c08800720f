"""Process lifecycle and collectives: which rank this process is, and the few reductions the layers above
need. Imports torch alone (never the model, the engine or a trainer), so tasks, evaluation, training and
the pipeline all learn their rank here.

Without torchrun (WORLD_SIZE unset or 1) every function is a cheap no-op: a single-process `DistInfo`, sums
of one, the object itself. Sharding (FSDP2) and sharded checkpoints live in r1lab/train/parallel.py and
r1lab/train/checkpoint.py; see docs/distributed.md for how a trainer uses them.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

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
