"""The SFT, pretraining and GRPO (β > 0) trainers under FSDP2: 2 gloo processes against one process.

One spawn runs all three trainers on both ranks (starting processes is most of the cost); the parent
computes the single-process references and each test compares one trainer's results.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import WORLD, join_group, spawn_ranks

import r1lab.model as rm
from r1lab import distributed as D
from r1lab.train import checkpoint as C

NAMES = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
WORDS = "red blue green cat dog sun moon tree fish bird".split()
TOL = 1e-5
PARAM_TOL = 3e-5
"""Weights after three optimizer steps: each rank runs its half of the rows, and SDPA's CPU flash kernel (MLA
pads v to the q/k head dim to use it) blocks a batch of another size differently, so the sharded and the
single-process sums round differently; AdamW's normalized steps carry that into the weights (seen: 1.1e-5)."""


def _quiet(_: str) -> None:
    pass


def _records() -> list[dict]:
    """Completions of 1 to 8 words, so the ranks' shares of a step pack into different numbers of rows."""
    rnd = random.Random(0)
    return [{"prompt": f"Question {name}:", "completion": " ".join(rnd.choice(WORDS) for _ in range(1 + i * 5 % 8))}
            for i, name in enumerate(NAMES)]


def _sft_cfg(**kw):
    from r1lab.train.sft import SFTConfig

    # 15 examples, 6 steps: rank 0 or rank 1 packs more rows, and two steps hold one example, so rank 1
    # gets none and runs dummy passes only (through the MTP module too)
    return SFTConfig(**{**dict(data=_records(), epochs=2, lr=3e-3, warmup_steps=1, tokens_per_step=76,
                               micro_batch_tokens=24, max_len=24, save_every=3, keep_checkpoints=100), **kw})


def _sft_model(tok, seed=0):
    return rm.build(rm.preset("tiny-moe", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id), seed=seed)


def _pretrain_cfg():
    from r1lab.train.pretrain import PretrainConfig

    # batch_size 3 over 2 ranks: shares of 2 and 1 rows. A modest lr: AdamW turns the last-bit differences
    # of a near-zero gradient element into an update difference of up to ~lr × (relative difference).
    return PretrainConfig(model=dict(rm.PRESETS["tiny-moe"]), n_docs=150, vocab_size=300, seq_len=24,
                          batch_size=3, steps=3, lr=1e-3, warmup_steps=1, log_every=1)


# ----------------------------------------------------------------------------- GRPO with a KL reference
G, PROMPTS, GRPO_STEPS = 2, 4, 3


def _grpo_trainer(tok, run_path: Path, info: D.DistInfo):
    """A GRPO Trainer with β > 0 whose rollout is a fixed batch (this rank's share of it), so one process
    and two see the same completions; the reference resets after step 1 (ref_reset_every=2)."""
    from r1lab.rollout import Completion
    from r1lab.train.grpo import GRPOConfig, Rollout, TaskConfig, Trainer
    from r1lab.train.grpo_math import Objective
    from r1lab.train.logprobs import token_logprobs
    from r1lab.run_dir import RunDir

    args = rm.preset("tiny-dense", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    init = rm.build(args, seed=1).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, tok.vocab_size, (4 + p,), generator=g).tolist() for p in range(PROMPTS)]
    outs = [torch.randint(3, tok.vocab_size, (3 + (5 * j) % 11,), generator=g).tolist() for j in range(PROMPTS * G)]
    old = []  # π_old: the initial policy's log-probs of the completions
    with torch.no_grad():
        for j, out in enumerate(outs):
            ids = torch.tensor([prompts[j // G] + out])
            targets = torch.cat([ids[:, 1:], torch.full((1, 1), -1)], dim=1)
            old.append(token_logprobs(init, ids, targets)[0, len(prompts[j // G]) - 1 : -1].tolist())
    totals = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.2, 1.0]

    cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8), objective=Objective(beta=0.1),
                     prompts_per_step=PROMPTS, group_size=G, micro_batch_tokens=40, lr=3e-3, warmup_steps=1,
                     ref_reset_every=2, steps=GRPO_STEPS, seed=0)
    trainer = Trainer(cfg, rm.build(args, seed=1), tok, RunDir(run_path), dist=info)

    def collect():
        mine = D.rank_share(list(range(PROMPTS)), info)
        rows = [p * G + k for p in mine for k in range(G)]
        comps = [Completion(prompt_index=j // G, sample_index=j % G, token_ids=outs[r], logprobs=old[r],
                            finish_reason="stop") for j, r in enumerate(rows)]
        return Rollout(problem_ids=mine, prompts=[prompts[p] for p in mine], completions=comps,
                       texts=[""] * len(rows), scores=[{"total": totals[r], "accuracy": totals[r]} for r in rows],
                       rollout_seconds=1.0), {}

    trainer._collect = collect
    return trainer


def _grpo_run(tok, run_path: Path, info: D.DistInfo) -> dict:
    trainer = _grpo_trainer(tok, run_path, info)
    metrics = [trainer.step() for _ in range(GRPO_STEPS)]
    state = C.consolidated_state_dict(trainer.model, info)  # a collective
    return {"metrics": metrics, "params": state}


# ----------------------------------------------------------------------------- the 2-process run
def _ranks(rank: int, port: int, tmp: str) -> None:
    from r1lab.tokenizer import load_tokenizer
    from r1lab.train.pretrain import pretrain
    from r1lab.run_dir import RunDir
    from r1lab.train.sft import train_sft

    tmp = Path(tmp)
    info = join_group(rank, port)
    tok = load_tokenizer(tmp / "tok")
    train_sft(_sft_cfg(), tmp / "sft_dist", model=_sft_model(tok), tokenizer=tok, log=_quiet, dist=info)
    pretrain(_pretrain_cfg(), RunDir(tmp / "pre_dist"), log=_quiet, dist=info)
    out = _grpo_run(tok, tmp / f"grpo_dist{rank}", info)
    if info.is_main:
        torch.save(out, tmp / "grpo_dist.pt")
    D.barrier(info)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run of all three trainers, then the single-process references."""
    from r1lab.tokenizer import train_bpe
    from r1lab.train.pretrain import pretrain
    from r1lab.run_dir import RunDir
    from r1lab.train.sft import train_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist_trainers")
    tok = train_bpe([f"{r['prompt']} {r['completion']}" for r in _records()] * 3, vocab_size=300)
    tok.save(tmp / "tok")
    try:
        spawn_ranks(_ranks, str(tmp))
        sft = train_sft(_sft_cfg(), tmp / "sft_one", model=_sft_model(tok), tokenizer=tok, log=_quiet)
        pretrain(_pretrain_cfg(), RunDir(tmp / "pre_one"), log=_quiet)
        grpo = _grpo_run(tok, tmp / "grpo_one", D.single_process())
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "tok": tok, "sft": sft, "grpo": grpo}


def _metrics(path: Path) -> list[dict]:
    from r1lab.run_dir import read_jsonl

    return read_jsonl(path / "metrics.jsonl")


def _assert_close_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        diff = (got[name].float() - w.float()).abs().max().item()
        assert diff < PARAM_TOL, (name, diff)


def test_sft_plan_is_uneven_across_ranks(runs):
    """The data really exercises unequal micro-batch counts and a rank with nothing to do."""
    from r1lab.train.batching import pack_sequences
    from r1lab.train.sft import encode_dataset, plan_steps

    cfg = _sft_cfg()
    data = encode_dataset(cfg.data, runs["tok"], cfg)
    counts = []
    for _, members in plan_steps([len(s) for s in data.seqs], cfg.tokens_per_step, cfg.epochs, cfg.seed):
        shares = [D.rank_share(members, D.DistInfo(rank=r, world_size=WORLD, is_distributed=True))
                  for r in range(WORLD)]
        counts.append([len(pack_sequences([data.seqs[i] for i in s], None, cfg.micro_batch_tokens)) if s else 0
                       for s in shares])
    assert any(a != b for a, b in counts), counts
    assert any(0 in c for c in counts), counts


def test_sharded_sft_matches_single_process(runs):
    tmp = runs["tmp"]
    one, two = _metrics(tmp / "sft_one"), _metrics(tmp / "sft_dist")  # rank 0 alone wrote the metrics
    assert [m["step"] for m in two] == [m["step"] for m in one] and len(one) >= 4
    for a, b in zip(one, two):
        assert a["response_tokens"] == b["response_tokens"] and a["tokens"] == b["tokens"]
        for key in ("loss", "grad_norm", "mtp_loss", "lr"):
            assert abs(a[key] - b[key]) < TOL * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
        # Only close: the MTP module skips the last position(s) of every packed row, so which tokens its MoE
        # routes (and counts) depends on how the step was cut into rows, which differs with the ranks.
        assert b["expert_load_max_over_mean"] == pytest.approx(a["expert_load_max_over_mean"], rel=0.03)
    # the final model: one consolidated HF folder with the tokenizer, equal to the single-process model
    folder = tmp / "sft_dist" / "model"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    loaded = rm.load(folder)
    _assert_close_params(dict(loaded.state_dict()), dict(runs["sft"].state_dict()))
    s1 = json.loads((tmp / "sft_one" / "summary.json").read_text())
    s2 = json.loads((tmp / "sft_dist" / "summary.json").read_text())
    assert s1["parameters"] == s2["parameters"] and s1["steps"] == s2["steps"]
    # checkpoints: the consolidated folder plus the sharded state, written by every rank
    ckpt = tmp / "sft_dist" / "checkpoints" / f"step_{s1['steps']:06d}"
    assert (ckpt / "model" / "config.json").is_file() and (ckpt / C.SHARDED_DIR).is_dir()


def test_two_process_sft_checkpoint_resumes_in_one_process(runs):
    """Cut the 2-process run back to an early checkpoint and finish it in one process: same final model."""
    from r1lab.train.sft import train_sft

    tmp = runs["tmp"]
    run = tmp / "sft_resumed"
    shutil.copytree(tmp / "sft_dist", run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    for extra in ckpts[1:]:  # keep step 3 of 6
        shutil.rmtree(extra)
    (run / "checkpoints" / "latest").unlink()
    shutil.rmtree(run / "model")
    model = train_sft(_sft_cfg(), run, model=_sft_model(runs["tok"], seed=9), tokenizer=runs["tok"], log=_quiet)
    _assert_close_params(dict(model.state_dict()), dict(runs["sft"].state_dict()))
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [m["step"] for m in _metrics(tmp / "sft_one")]


def test_sharded_pretrain_matches_single_process(runs):
    tmp = runs["tmp"]
    one, two = _metrics(tmp / "pre_one"), _metrics(tmp / "pre_dist")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [0, 1, 2]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < TOL * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
        assert b["expert_load_max_over_mean"] == pytest.approx(a["expert_load_max_over_mean"], abs=1e-6)
    assert (tmp / "pre_dist" / "model" / "tokenizer.json").is_file()
    _assert_close_params(dict(rm.load(tmp / "pre_dist" / "model").state_dict()),
                         dict(rm.load(tmp / "pre_one" / "model").state_dict()))


def test_sharded_grpo_with_kl_reference_matches_single_process(runs):
    one = runs["grpo"]
    two = torch.load(runs["tmp"] / "grpo_dist.pt")
    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"])):
        assert abs(a["grad_norm"] - b["grad_norm"]) < TOL * max(1.0, a["grad_norm"]), (step, a, b)
        # KL is 0 where the reference equals the policy (step 0, and step 2 after the reset), > 0 between
        if step == 1:
            assert a["kl"] > 1e-6 and b["kl"] > 1e-6, (a["kl"], b["kl"])
        else:
            assert a["kl"] < 1e-7 and b["kl"] < 1e-7, (step, a["kl"], b["kl"])
    _assert_close_params(two["params"], one["params"])
