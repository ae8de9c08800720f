"""The run directory every command writes: config.yaml, metrics.jsonl, samples.jsonl, TensorBoard events,
summary.json (and checkpoints/, written by `checkpoint.py`).

metrics.jsonl holds one JSON object per logged step, {"step": s, "name": value, ...}, values are floats and
non-finite values are written as null (strict JSON readers reject NaN). Lines are flushed as written so a
crash loses at most the line being written. Resuming from step s drops metric and sample lines with a
step > s (written after that checkpoint) so curves do not show a step twice, and tells TensorBoard to
purge its later events too.

A command that starts a run refuses a folder that already holds one (`refuse_used_run_dir`): appending a
second run's steps to the first's metrics.jsonl would mix two runs in one file for good.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from r1lab.errors import InputError
from r1lab.fsutil import atomic_write_text

# What a started run leaves behind; config.yaml alone is not one (it is written before anything can fail).
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints")


class RunDirInUse(InputError):
    """--out names a folder that already holds a run, and the command was not asked to continue it."""


def run_markers(path: str | Path) -> list[str]:
    """Which of RUN_MARKERS `path` holds (checkpoints/ shown with its slash); [] for a fresh or absent folder."""
    path = Path(path)
    return [name + ("/" if (path / name).is_dir() else "") for name in RUN_MARKERS if (path / name).exists()]


def refuse_used_run_dir(path: str | Path, command: str, *, markers: list[str] | None = None,
                        resumable: bool = False) -> None:
    """Raise RunDirInUse when `path` holds a run (markers: run_markers(path), computed by the caller when the
    ranks of a torchrun job must agree on one answer). The message names the folder and what to do instead."""
    found = run_markers(path) if markers is None else markers
    if not found:
        return
    what = f"--out {path} already holds a run ({', '.join(found)})"
    if resumable:
        raise RunDirInUse(f"{what}; continue it with `r1lab {command} --out {path} --resume`, or pick another --out")
    raise RunDirInUse(f"{what}; `r1lab {command}` has no --resume, so pick another --out (or delete that folder)")


def _scalar(key: str, value: Any) -> float | None:
    """A metric value as a float (None for NaN/inf); tensors and numpy scalars must hold one element."""
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise TypeError(f"metric {key!r} is not a scalar ({e})") from None
    if not isinstance(value, numbers.Real):  # bool is a Real: logged as 0.0 / 1.0
        raise TypeError(f"metric {key!r} must be a real number, got {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(obj: Any) -> Any:
    """Recursively make samples JSON-serializable: NaN/inf → None, tensors → lists, unknown → str."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, numbers.Real):
        return _json_safe(float(obj))
    return str(obj)


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append lines and flush; first end a torn last line (crash mid-write) so it cannot swallow ours."""
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + "".join(line + "\n" for line in lines))
        f.flush()


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only lines whose "step" is <= max_step (and that parse: a torn last line is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= max_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunDir:
    """A run directory. resume_step=s (resuming from the checkpoint of step s) drops logs after step s."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.path / "metrics.jsonl"
        self.samples_file = self.path / "samples.jsonl"
        self.tb_dir = self.path / "tensorboard"
        self.resume_step = resume_step
        self._writer = None
        if resume_step is not None:
            _truncate_jsonl(self.metrics_file, resume_step)
            _truncate_jsonl(self.samples_file, resume_step)

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    # ------------------------------------------------------------------ logs
    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            purge = None if self.resume_step is None else self.resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge, flush_secs=10)
        return self._writer

    def log_metrics(self, step: int, metrics: dict[str, Any], *, tensorboard: bool = True) -> dict[str, float | None]:
        """Append {"step": step, **metrics} to metrics.jsonl and write TensorBoard scalars; returns the row."""
        row = {name: _scalar(name, value) for name, value in metrics.items()}
        _append_lines(self.metrics_file, [json.dumps({"step": int(step), **row}, allow_nan=False)])
        if tensorboard:
            writer = self._tb()
            for name, value in row.items():
                writer.add_scalar(name, float("nan") if value is None else value, int(step))
        return row

    def log_samples(self, step: int, records: Iterable[dict[str, Any]]) -> None:
        """Append one line per record (prompt, completion, reward, ...) with the step added to samples.jsonl."""
        rows = [{"step": int(step), **_json_safe(dict(r))} for r in records]
        lines = [json.dumps(row, allow_nan=False, ensure_ascii=False) for row in rows]
        _append_lines(self.samples_file, lines)

    # ------------------------------------------------------------------ one-shot files
    def write_config(self, cfg: Any) -> Path:
        """config.yaml: the fully resolved config (a dataclass or a dict)."""
        from r1lab.config import to_dict

        data = cfg if isinstance(cfg, dict) else to_dict(cfg)
        path = self.path / "config.yaml"
        atomic_write_text(path, yaml.safe_dump(_json_safe(data), sort_keys=False, allow_unicode=True))
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """summary.json (atomic): final numbers of the run."""
        path = self.path / "summary.json"
        atomic_write_text(path, json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All parseable lines of a JSONL file (a torn last line from a crash is skipped)."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
