"""Checkpoints resume bit-exactly, survive interrupted saves, and run-dir logs stay consistent on resume."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import r1lab.model as rm
from r1lab.tokenizer import load_tokenizer, train_bpe
from r1lab.train import checkpoint as ckpt
from r1lab.train.checkpoint import load_latest_checkpoint, restore, save_checkpoint
from r1lab.train.logprobs import mtp_loss_sums
from r1lab.run_dir import RunDir, read_jsonl


def _objects(preset, seed):
    model = rm.build(rm.preset(preset), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _train_step(model, opt, sched):
    """Data from all three RNGs, so a resume that forgets one of them diverges."""
    V = model.args.vocab_size
    ids = torch.randint(0, V, (2, 9))
    ids[0, 0] = random.randrange(V)
    ids[1, 0] = int(np.random.randint(V))
    hidden = model.forward_hidden(ids[:, :-1])
    loss = F.cross_entropy(model.logits(hidden).flatten(0, 1), ids[:, 1:].flatten())
    if model.args.is_moe:
        mtp_sum, mtp_count = mtp_loss_sums(model, hidden, ids[:, :-1])
        loss = loss + mtp_sum / mtp_count
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if model.args.is_moe:
        model.update_router_bias(1e-3)


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_resume_is_bit_exact(tmp_path, preset):
    _seed_all(7)
    model, opt, sched = _objects(preset, seed=0)
    for _ in range(4):
        _train_step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(7)
    model, opt, sched = _objects(preset, seed=0)
    for _ in range(2):
        _train_step(model, opt, sched)
    save_checkpoint(tmp_path, 2, model, opt, sched, {"data_position": 2, "note": "x"})
    _seed_all(99)  # a fresh process: different RNG state, different init
    model, opt, sched = _objects(preset, seed=123)
    step, path = load_latest_checkpoint(tmp_path)
    assert step == 2 and path == tmp_path / "checkpoints" / "step_000002"
    extra = restore(path, model, opt, sched)
    assert extra == {"data_position": 2, "note": "x", "step": 2}
    assert sched.last_epoch == 2
    for _ in range(2):
        _train_step(model, opt, sched)
    got = model.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_checkpoint_folder_is_a_loadable_hf_model(tmp_path):
    model, opt, sched = _objects("tiny-dense", 0)
    tok = train_bpe(["<think> 12 + 7 = 19 </think> <answer> 19 </answer>"] * 4, vocab_size=280)
    path = save_checkpoint(tmp_path, 5, model, opt, sched, tokenizer=tok)
    loaded = rm.load(path / "model")
    ids = torch.arange(10)[None]
    torch.testing.assert_close(loaded(ids), model(ids))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000005"
    text = "<think> 7 + 12 </think>"
    assert load_tokenizer(path / "model").encode(text) == tok.encode(text)  # the folder loads on its own


def test_keep_last_k(tmp_path):
    model, opt, sched = _objects("tiny-dense", 0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000005"]
    assert load_latest_checkpoint(tmp_path)[0] == 5


def test_interrupted_saves_leave_previous_checkpoint(tmp_path, monkeypatch):
    assert load_latest_checkpoint(tmp_path) is None
    model, opt, sched = _objects("tiny-dense", 0)
    save_checkpoint(tmp_path, 2, model, opt, sched, {"k": 1})
    root = tmp_path / "checkpoints"
    # what a crash leaves: a half-written temp dir, and a step dir without trainer state
    partial = root / ".tmp-step_000003-abc"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "config.json").write_text("{")
    (root / "step_000004" / "model").mkdir(parents=True)
    assert load_latest_checkpoint(tmp_path) == (2, root / "step_000002")
    # a damaged pointer falls back to scanning complete checkpoints
    (root / "latest").write_text("step_000009\n")
    assert load_latest_checkpoint(tmp_path) == (2, root / "step_000002")
    (root / "latest").write_text("step_000002\n")

    # a crash inside save (after the weights, before the trainer state) changes nothing visible
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 3, model, opt, sched)
    monkeypatch.undo()
    assert load_latest_checkpoint(tmp_path) == (2, root / "step_000002")
    assert not (root / "step_000003").exists()
    assert restore(root / "step_000002", model, opt, sched)["k"] == 1
    # the next successful save cleans the leftovers
    save_checkpoint(tmp_path, 3, model, opt, sched)
    assert not list(root.glob(".tmp-*"))
    assert load_latest_checkpoint(tmp_path)[0] == 3
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        restore(root / "step_000004", model)


# ----------------------------------------------------------------------------- run directory
def test_run_dir_logs_and_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in range(1, 5):
        run.log_metrics(step, {"reward": step / 10, "loss": torch.tensor(0.5), "n": np.int64(3), "bad": math.nan})
    run.log_samples(2, [{"prompt": "2+2", "completion": "4", "reward": 1.0, "ids": torch.tensor([1, 2])}])
    run.log_samples(4, [{"prompt": "p", "completion": "c", "reward": float("inf")}])
    with pytest.raises(TypeError, match="metric 'text'"):
        run.log_metrics(5, {"text": "hello"})
    run.close()
    rows = read_jsonl(run.metrics_file)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0] == {"step": 1, "reward": 0.1, "loss": 0.5, "n": 3.0, "bad": None}
    for line in run.metrics_file.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    samples = read_jsonl(run.samples_file)
    assert samples[0]["ids"] == [1, 2] and samples[1]["reward"] is None
    assert any(run.tb_dir.iterdir())  # TensorBoard events written

    # crash mid-line, then resume from the checkpoint of step 2
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 5, "rew')
    resumed = RunDir(tmp_path / "run", resume_step=2)
    assert [r["step"] for r in read_jsonl(resumed.metrics_file)] == [1, 2]
    assert [r["step"] for r in read_jsonl(resumed.samples_file)] == [2]
    resumed.log_metrics(3, {"reward": 0.9}, tensorboard=False)
    assert [r["step"] for r in read_jsonl(resumed.metrics_file)] == [1, 2, 3]


def test_run_dir_torn_line_does_not_swallow_next(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_file.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    run.log_metrics(2, {"a": 2.0}, tensorboard=False)
    assert read_jsonl(run.metrics_file) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]


def test_run_dir_config_and_summary(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Sub:
        lr: float = 1e-6
        path: Path = Path("/x")

    @dataclass
    class Cfg:
        name: str = "r"
        sub: Sub = field(default_factory=Sub)
        tags: tuple[str, ...] = ("a",)

    run = RunDir(tmp_path)
    text = run.write_config(Cfg()).read_text()
    assert "lr: 1.0e-06" in text and "path: /x" in text
    run.write_summary({"accuracy": 0.5, "nan": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"accuracy": 0.5, "nan": None}
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_final_model_folder_links_the_last_checkpoints_weights(tmp_path):
    """`r1lab zero` and every pipeline stage publish the last checkpoint's model folder instead of writing the
    weights again: same files (one inode), and the folder outlives the checkpoint's pruning."""
    import os

    import r1lab.model as rm
    from r1lab.train.checkpoint import publish_checkpoint_model, save_checkpoint

    model = rm.build(rm.preset("tiny-dense"), seed=3)
    ckpt = save_checkpoint(tmp_path / "run", 5, model, keep_last=1)
    out = publish_checkpoint_model(ckpt, tmp_path / "run" / "model")
    weights = sorted(p.name for p in (ckpt / "model").glob("*.safetensors"))
    assert weights and all(os.stat(out / w).st_ino == os.stat(ckpt / "model" / w).st_ino for w in weights)
    save_checkpoint(tmp_path / "run", 6, rm.build(rm.preset("tiny-dense"), seed=4), keep_last=1)  # prunes step 5
    assert not ckpt.exists()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(rm.load(out)(ids), model(ids))
