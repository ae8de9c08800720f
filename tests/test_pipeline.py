"""The R1 pipeline's stage machinery: stages run in order, a finished stage is never rerun, and a
pipeline killed mid-stage (SIGKILL) completes when the same command is run again."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ["zero.steps=3", "reasoning_rl.steps=2", "final_rl.steps=2", "cold_start_examples=8", "traces.prompts=8",
        "reward_model.pairs=32", "eval.k=2", "task.test_size=8", "zero.save_every=1"]


def _cmd(out):
    return [sys.executable, "-m", "r1lab", "pipeline", "r1", "--out", str(out), *TINY]


@pytest.mark.slow
def test_pipeline_survives_sigkill_and_skips_finished_stages(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it in the middle of the zero stage, once that stage has written a checkpoint.
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "stages" / "zero" / "checkpoints").glob("step_*")):
        time.sleep(0.2)
    assert proc.poll() is None, "pipeline finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "zero" / "done.json").exists()

    subprocess.run(_cmd(out), env=env, check=True, capture_output=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", "zero", "cold_start", "reasoning_rl", "rejection_sft", "final_rl",
                                       "distill_student", "rl_student"]
    metrics = [json.loads(line) for line in (out / "stages" / "zero" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]  # resumed, no step lost or logged twice

    # A finished pipeline rerun recomputes nothing: every done.json is left untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")}
    result = subprocess.run(_cmd(out), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert result.stdout.count("already done, skipped") == 7
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")}
