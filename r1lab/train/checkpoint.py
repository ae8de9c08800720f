"""Resumable checkpoints: HF model folder + optimizer/scheduler/RNG/trainer state, written atomically.

Layout:
    run_dir/checkpoints/step_000200/model/             Hugging Face folder (config.json + safetensors)
    run_dir/checkpoints/step_000200/trainer_state.pt   optimizer, scheduler, step, RNG states, extra state
    run_dir/checkpoints/latest                         text: "step_000200"

Under torchrun (a sharded model; every rank calls save_checkpoint with its DistInfo) the same layout holds
one consolidated Hugging Face folder (rank 0) and the resumable sharded model + optimizer state:
    run_dir/checkpoints/step_000200/sharded/           torch.distributed.checkpoint shards (every rank)
    run_dir/checkpoints/step_000200/trainer_state.pt   scheduler, RNG, extra state, step (optimizer: sharded)
`restore_checkpoint` reads either kind back with any number of processes.

Crash safety: a checkpoint is built in a hidden temp dir (`.tmp-step_000200-*`), every file is fsynced,
then the dir is renamed into place (atomic on one filesystem) and only then is `latest` replaced
(atomically). A crash at any point leaves the previous checkpoint and a `latest` naming a complete one;
loaders ignore hidden dirs, and the next save deletes leftovers.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1lab.distributed import DistInfo, barrier
from r1lab.fsutil import atomic_write_text, fsync_tree, recover_replaced_dirs, replace_dir, staged_dir
from r1lab.model.hf_io import empty_model, load_state
from r1lab.model.hf_io import save as save_model
from r1lab.train.parallel import is_sharded

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states, as plain tensors/containers so the
    file loads with torch.load(weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:  # resumed on a different number of GPUs: restore what matches
            for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def _as_tuple(x):
    """random.setstate needs tuples; be robust to a loader that returns lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    extra_state: dict[str, Any] | None = None,
    *,
    keep_last: int = 3,
    tokenizer=None,
    info: DistInfo | None = None,
) -> Path:
    """Write run_dir/checkpoints/step_{step:06d}/ atomically, point `latest` at it, keep the last
    keep_last checkpoints (by step). extra_state: plain Python values and tensors (e.g. the data iterator
    position, the reference model's last sync step). tokenizer: also saved into the checkpoint's model
    folder (inside the same atomic write), so the folder loads on its own. Returns the checkpoint dir.
    info (under torchrun, every rank calls it): the sharded layout of the module docstring."""
    if info is not None and info.is_distributed:
        return _save_sharded_checkpoint(run_dir, step, model, optimizer, scheduler, info,
                                        extra_state=extra_state, keep_last=keep_last, tokenizer=tokenizer)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    recover_replaced_dirs(root)
    for stale in root.glob(".tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        save_model(model, tmp / "model")
        if tokenizer is not None:
            tokenizer.save(tmp / "model")
        state = {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": dict(extra_state or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        fsync_tree(tmp)
        final = root / name
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps the old one out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep_last, keep=final)
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under root, ascending by step."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and _is_complete(d):
                found.append((int(m.group(1)), d))
    return sorted(found)


def _is_complete(d: Path) -> bool:
    return (d / STATE_FILE).is_file() and (d / "model" / "config.json").is_file()


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    if keep_last < 1:
        return
    for _, d in _complete_checkpoints(root)[:-keep_last]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """(step, checkpoint dir) of the newest usable checkpoint, or None.

    Follows `latest` when it names a complete checkpoint; otherwise (pointer missing or damaged) falls back
    to the highest-step complete `step_*` dir. Hidden temp dirs of interrupted saves are never considered.
    """
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        recover_replaced_dirs(root)  # a step re-saved when the run crashed may sit aside
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        m = _STEP_DIR.match(name)
        if m and _is_complete(root / name):
            return int(m.group(1)), root / name
    found = _complete_checkpoints(root)
    return found[-1] if found else None


def restore(path: str | Path, model, optimizer: torch.optim.Optimizer | None = None, scheduler=None,
            *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint dir into existing objects (weights in place, optimizer, scheduler, RNG states) and
    return its extra_state (with "step" added). After this a run continues exactly as if never stopped."""
    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (needs model/config.json and {STATE_FILE})")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - give the file name, not an unpickler traceback
        raise RuntimeError(f"{path / STATE_FILE}: cannot load trainer state ({e})") from e
    p = next(iter(model.parameters()))
    load_state(path / "model", model.args, model, p.device, p.dtype)
    for key, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None:
            if state[key] is None:
                raise ValueError(f"{path}: checkpoint has no {key} state")
            target.load_state_dict(state[key])
    if restore_rng:
        set_rng_state(state["rng"])
    return {**state["extra"], "step": state["step"]}


# ----------------------------------------------------------------------------- sharded models
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


def publish_checkpoint_model(checkpoint: str | Path, path: str | Path, info: DistInfo | None = None) -> Path:
    """Make a checkpoint's HF model folder (model/, with its tokenizer) the run's final `path` without writing
    the weights twice: its files are hard-linked (copied across filesystems), so pruning the checkpoint later
    leaves the folder whole. Rank 0 does it; every rank returns once it is in place."""
    import os

    path = Path(path)
    if info is None or info.is_main:
        with staged_dir(path, shared=False) as tmp:  # links keep the checkpoint files' modes
            for f in (Path(checkpoint) / "model").iterdir():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
    if info is not None:
        barrier(info)
    return path


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


SHARDED_DIR = "sharded"


def _save_sharded_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, info: DistInfo, *,
                             extra_state: dict | None = None, keep_last: int = 3, tokenizer=None) -> Path:
    """The sharded layout (every rank calls it): model/ consolidated by rank 0 with the tokenizer if given,
    sharded/ by every rank, trainer_state.pt by rank 0 (optimizer None: it is in the shards); then `latest`
    and pruning as usual. Multi-node: run_dir must be one shared filesystem."""
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
                    "rng": rng_state(), "extra": dict(extra_state or {})}, tmp / STATE_FILE)
        fsync_tree(tmp)
        replace_dir(tmp, final)
        atomic_write_text(root / "latest", name + "\n")
        _prune(root, keep_last, keep=final)
    barrier(info)
    return final


def restore_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, info: DistInfo | None = None) -> dict:
    """Resume from a checkpoint dir with any number of processes: a sharded one (any world size) or a
    single-process one (into a plain model only). Returns the extra state with "step" added, like restore."""
    path = Path(path)
    if not (path / SHARDED_DIR).is_dir():
        if is_sharded(model):
            raise ValueError(f"{path}: a single-process checkpoint; resume it with one process, save, then scale out")
        return restore(path, model, optimizer, scheduler)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    load_sharded(model, optimizer, info or DistInfo(), path / SHARDED_DIR)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {**state["extra"], "step": state["step"]}
