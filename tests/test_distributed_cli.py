"""`torchrun -m r1lab zero` end to end on CPU (2 gloo processes), then resumed by a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import r1lab.model as rm

TINY = ["grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24", "grpo.save_every=0",
        "eval.k=2", "eval.max_new_tokens=24", "grpo.task.test_size=9", "grpo.task.train_size=64"]


def _run(args: list[str], nproc: int | None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(launcher + ["-m", "r1lab", "zero", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_zero_then_resume_in_one_process(tmp_path):
    run = tmp_path / "zero"
    proc = _run(["--out", str(run), "grpo.steps=2", *TINY], nproc=2)
    assert proc.stdout.count("R1-Zero on chain_sum") == 1  # rank 0 alone prints the table

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    before = [json.loads(line) for line in (run / "eval" / "before.jsonl").read_text().splitlines()]
    assert [item["index"] for item in before] == list(range(9))  # both ranks' shares, gathered in order
    assert summary["before"]["n_questions"] == 9 and summary["before"]["k"] == 2
    assert _steps(run) == [0, 1]  # logged once (rank 0), not once per rank
    sharded = run / "checkpoints" / "step_000002" / "sharded"
    assert sharded.is_dir() and any(sharded.iterdir())
    saved = rm.load(run / "model")
    assert saved.num_parameters() == rm.load(Path(rm.__file__).parents[1] / "assets" / "r1-tiny").num_parameters()

    # The same run continued by one process from the 2-process checkpoint (resharded on load).
    _run(["--out", str(run), "--resume", "grpo.steps=3", *TINY], nproc=None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 3
    assert _steps(run) == [0, 1, 2]


def test_torchrun_eval_equals_one_process(tmp_path):
    """`r1lab eval` on 2 processes: each rank samples its share of the questions (k = 4, T = 0.6, top-p
    0.95). A question's draws depend only on its global index (the seed), not on the batch or the rank, so
    every item and number must equal the single-process run's."""
    def run(nproc, out):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                    if nproc else [sys.executable])
        cmd = launcher + ["-m", "r1lab", "eval", "--bench", "chain_sum@9", "--k", "4", "--temperature", "0.6",
                          "--max-new-tokens", "32", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        items = [json.loads(line) for line in (out / "eval" / "chain_sum.jsonl").read_text().splitlines()]
        return json.loads((out / "summary.json").read_text()), items

    one, one_items = run(None, tmp_path / "one")
    two, two_items = run(2, tmp_path / "two")
    assert [i["index"] for i in two_items] == list(range(9))
    assert [i["completions"] for i in two_items] == [i["completions"] for i in one_items]
    assert any(len(set(i["completions"])) > 1 for i in one_items)  # really sampled
    assert two["chain_sum/pass@1"] == one["chain_sum/pass@1"]
