"""`torchrun -m r1lab pipeline r1` end to end on CPU (2 gloo processes), rerun by one process; and the two
pieces of the pipeline that are data-parallel without FSDP, each against one process: the reward-model
trainer (plain replicas, summed gradients) and rejection sampling (shares sampled per rank, filters
applied to the gathered samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_distributed import join_group, spawn_ranks

import r1lab.model as rm
from r1lab.pipeline.r1 import METRICS, PIPELINES

ASSETS = Path(rm.__file__).parents[1] / "assets"
RL = ("zero", "reasoning_rl", "final_rl")
TINY = ([f"{s}.steps=2" for s in RL] + [f"{s}.prompts_per_step=4" for s in RL] + [f"{s}.group_size=4" for s in RL]
        + ["traces.prompts=20", "reward_model.pairs=50", "eval.k=2", "task.test_size=10", "task.train_size=64",
           "cold_start_examples=10"])
TEST_SIZE = 10


def _pipeline(out: Path, nproc: int | None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(launcher + ["-m", "r1lab", "pipeline", "r1", "--out", str(out), *TINY],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_torchrun_pipeline_then_rerun_in_one_process_skips_every_stage(tmp_path):
    out = tmp_path / "run"
    proc = _pipeline(out, nproc=2)
    stages = PIPELINES["r1"]
    assert proc.stdout.count("[stage zero] running") == 1  # rank 0 alone prints
    assert proc.stdout.count("r1lab pipeline r1: held-out") == 1

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", *stages]
    for name, result in summary["stages"].items():
        assert set(METRICS) <= set(result), name
    for name in ["base", *stages]:  # every rank's share of the questions, gathered in order, written once
        items = _lines(out / "eval" / f"{name}.jsonl")
        assert [item["index"] for item in items] == list(range(TEST_SIZE)), name
        assert all(len(item["completions"]) == 2 for item in items)
    for name in stages:
        stage = out / "stages" / name
        assert (stage / "model" / "config.json").is_file() and (stage / "model" / "tokenizer.json").is_file()
        assert json.loads((stage / "done.json").read_text())["pass@1"] == summary["stages"][name]["pass@1"]
        steps = [m["step"] for m in _lines(stage / "metrics.jsonl")]
        assert steps == sorted(set(steps)), (name, steps)  # logged once (rank 0), not once per rank
        if name in RL or name == "rl_student":
            assert steps == [0, 1]
    assert rm.load(out / "stages" / "distill_student" / "model").args.model_type == "qwen2"  # the student

    # the reward model: trained data-parallel, written once; the traces: gathered, then filtered
    assert json.loads((out / "reward_model" / "summary.json").read_text())["world_size"] == 2
    assert [m["step"] for m in _lines(out / "reward_model" / "metrics.jsonl")] == [0, 1]
    for tag in ("cold_start", "rejection_sft", "distill_student"):
        stats = json.loads((out / "data" / f"{tag}.stats.json").read_text())
        assert stats["prompts"] == 20 and stats["samples"] == 20 * 4
        records = _lines(out / "data" / f"{tag}.jsonl")
        assert len(records) == stats["kept"] == stats["prompts_with_kept"]  # at most one per prompt
        kept = [r["source"]["prompt_index"] for r in records]
        assert kept == sorted(set(kept)) and all(0 <= i < 20 for i in kept)

    # The same command in one process: every stage is done, nothing is recomputed or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")}
    assert len(stamps) == len(stages)
    rerun = _pipeline(out, nproc=None)
    assert rerun.stdout.count("already done, skipped") == len(stages)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")}
    assert json.loads((out / "summary.json").read_text())["stages"] == summary["stages"]


# ----------------------------------------------------------------------------- reward model + rejection
K = 3
N_PROMPTS = 7  # shares of 4 and 3 prompts


def _rm_cfg(**kw):
    from r1lab.train.reward_model import RewardModelConfig

    # 31 pairs: 3 held out, 28 trained in steps of 9, 9, 9 and 1 pairs (rank 1 has none in the last step);
    # a checkpoint after step 2 (written by rank 0)
    return RewardModelConfig(**{**dict(model=str(ASSETS / "r1-tiny-student"), synthetic_pairs=31, pairs_per_step=9,
                                       lr=3e-4, warmup_steps=1, eval_every=2, save_every=2, seed=3), **kw})


def _sample(model, tok, info=None):
    from r1lab.pipeline.rejection import FilterConfig, rejection_sample
    from r1lab.train.grpo import TaskConfig

    problems = TaskConfig(train_size=N_PROMPTS).load("train").problems
    # greedy: the K samples of a prompt are identical, so de-duplication has work to do; every sample
    # counts as correct and the format is not required (greedy, the tiny student leaves its thought empty)
    result = rejection_sample(model, tok, problems, k=K, temperature=0.0, max_new_tokens=48,
                              scorer=lambda problem, text: 1.0,
                              filters=FilterConfig(max_per_prompt=2, require_format=False),
                              prompts_per_batch=3, dist=info)
    return {"records": result.records, "stats": result.stats, "rejected": result.rejected}


def _rank(rank: int, port: int, tmp: str) -> None:
    from r1lab.model import load_model_and_tokenizer
    from r1lab.train.reward_model import train_reward_model

    info = join_group(rank, port)
    train_reward_model(_rm_cfg(), Path(tmp) / "rm2", log=lambda s: None, dist=info)
    model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny-student", dtype="float32")
    (Path(tmp) / f"sample{rank}.json").write_text(json.dumps(_sample(model, tok, info)))


def test_reward_model_and_rejection_sampling_on_two_ranks(tmp_path):
    from r1lab.train.reward_model import RewardModelNet, train_reward_model

    spawn_ranks(_rank, str(tmp_path))
    train_reward_model(_rm_cfg(), tmp_path / "rm1", log=lambda s: None)

    # reward model: the replicas took the single-process steps (loss, held-out numbers, weights)
    two, one = _lines(tmp_path / "rm2" / "metrics.jsonl"), _lines(tmp_path / "rm1" / "metrics.jsonl")
    assert [m["step"] for m in two] == [m["step"] for m in one] == [0, 1, 2, 3]
    for a, b in zip(two, one):
        for key in ("loss", "accuracy", "margin", "grad_norm", "eval_accuracy", "eval_loss"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    net2 = RewardModelNet.load(tmp_path / "rm2" / "reward_model")
    net1 = RewardModelNet.load(tmp_path / "rm1" / "reward_model")
    for (name, p2), p1 in zip(net2.state_dict().items(), net1.state_dict().values()):
        if name != "head.bias":  # the loss ignores a common offset: its gradient is rounding noise, which
            torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0, msg=name)  # AdamW turns into ±lr steps
    assert (tmp_path / "rm2" / "checkpoints" / "step_000002").is_dir()

    # rejection sampling: both ranks return the same selection, made over every rank's samples
    r0, r1 = (json.loads((tmp_path / f"sample{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    stats = r0["stats"]
    assert stats["prompts"] == N_PROMPTS and stats["samples"] == N_PROMPTS * K
    seen = [row["prompt_index"] for row in r0["rejected"]] + [r["source"]["prompt_index"] for r in r0["records"]]
    assert sorted(set(seen)) == list(range(N_PROMPTS))  # both shares, global prompt indices
    kept = [r["source"]["prompt_index"] for r in r0["records"]]
    assert kept and kept == sorted(set(kept))  # identical greedy samples: one kept per prompt at most, despite the cap of 2
    assert stats["rejected_duplicate"] == stats["kept"] * (K - 1)
    # greedy samples do not depend on how the prompts were batched, so one process selects the same
    from r1lab.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny-student", dtype="float32")
    assert json.loads(json.dumps(_sample(model, tok))) == r0
