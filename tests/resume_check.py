"""Shared check for trainers that checkpoint: a run killed after a logged-but-not-checkpointed step and then
rerun in the same directory ends with the same weights and the same metric rows as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from r1lab.run_dir import read_jsonl


class Crash(Exception):
    pass


def assert_resume_after_crash_equals_uninterrupted(train: Callable, cfg, tmp_path: Path, crash_step: int = 2):
    """train(cfg, run_dir, log=..., on_step=...) -> model. Returns the resumed model."""
    full = train(cfg, tmp_path / "full", log=lambda s: None)

    def crash(step, metrics):
        if step == crash_step:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "crashed", log=lambda s: None, on_step=crash)
    resumed = train(cfg, tmp_path / "crashed", log=lambda s: None)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [m["step"] for m in read_jsonl(tmp_path / "crashed" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) == [m["step"] for m in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    return resumed
