"""Resumable checkpoints: HF model folder + optimizer/scheduler/RNG/trainer state, written atomically.

Layout:
    run_dir/checkpoints/step_000200/model/             Hugging Face folder (config.json + safetensors)
    run_dir/checkpoints/step_000200/trainer_state.pt   optimizer, scheduler, step, RNG states, extra state
    run_dir/checkpoints/latest                         text: "step_000200"

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1lab.fsutil import atomic_write_text, fsync_tree, recover_replaced_dirs, replace_dir

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
) -> Path:
    """Write run_dir/checkpoints/step_{step:06d}/ atomically, point `latest` at it, keep the last
    keep_last checkpoints (by step). extra_state: plain Python values and tensors (e.g. the data iterator
    position, the reference model's last sync step). tokenizer: also saved into the checkpoint's model
    folder (inside the same atomic write), so the folder loads on its own. Returns the checkpoint dir."""
    from r1lab.model import save as save_model

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
    from r1lab.model.hf_io import load_state

    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (needs model/config.json and {STATE_FILE})")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - give the file name, not an unpickler traceback
        raise RuntimeError(f"{path / STATE_FILE}: cannot load trainer state ({e})") from e
    p = next(iter(model.parameters()))
    load_state(path / "model", model.args, model, p.device, p.dtype)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path}: checkpoint has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"{path}: checkpoint has no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {**state["extra"], "step": state["step"]}
