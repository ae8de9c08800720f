"""Reward model: Bradley-Terry gradients, learning a preference, save/load, use inside compose_rewards."""

import json
import random

import pytest
import torch
from resume_check import assert_resume_after_crash_equals_uninterrupted

import r1lab.model as rm
from r1lab.tasks.corpus import pretrain_texts
from r1lab.rewards import compose_rewards, format_reward, is_mixed_language
from r1lab.tasks import Problem
from r1lab.tokenizer import train_bpe
from r1lab.train.reward_model import (
    PREFERENCE_KINDS,
    LearnedReward,
    RewardModelConfig,
    RewardModelNet,
    bradley_terry_loss,
    make_preference_pairs,
    train_reward_model,
)
from r1lab.run_dir import read_jsonl

WORDS = "red blue green cat dog sun tree fish bird".split()
MARKER = "moon"


@pytest.fixture(scope="module")
def tok():
    return train_bpe(pretrain_texts(n_docs=200, n_cold_start=50) + [" ".join(WORDS + [MARKER])] * 5, vocab_size=400)


def _net(tok, seed=0):
    return RewardModelNet(rm.build(rm.preset("tiny-dense", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id), seed=seed))


def _marker_pairs(n, seed):
    """Learnable preference: the chosen response contains the marker word somewhere, the rejected does not."""
    rnd = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 6))]
        marked = list(words)
        marked[rnd.randrange(len(words))] = MARKER
        pairs.append({"prompt": f"Say {rnd.choice(WORDS)}:", "chosen": " ".join(marked), "rejected": " ".join(words)})
    return pairs


def test_bradley_terry_gradient_signs():
    rc = torch.tensor([0.3, -1.0], requires_grad=True)
    rr = torch.tensor([0.1, 2.0], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    loss.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descent raises chosen, lowers rejected
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(rc - rr).mean())
    # a wider correct margin means a smaller loss
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([0.0])) < bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))


def test_packed_rewards_equal_single_forwards(tok):
    net = _net(tok).eval()
    seqs = [tok.encode(t) for t in ("red cat", "blue dog sun moon", "tree")]
    packed = net.rewards(seqs, max_tokens=64)
    alone = torch.cat([net(torch.tensor([s])) for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    padded = torch.zeros(3, max(map(len, seqs)), dtype=torch.long)  # right padding never changes a reward (causal attention)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.tensor(s)
    torch.testing.assert_close(net(padded, torch.tensor([len(s) for s in seqs])), alone, atol=1e-5, rtol=0)


def test_learns_marker_preference_and_round_trips(tok, tmp_path):
    cfg = RewardModelConfig(data=_marker_pairs(320, seed=0), eval_data=_marker_pairs(64, seed=1), pairs_per_step=16,
                            epochs=2, lr=3e-3, warmup_steps=3, eval_every=20, max_len=64, save_every=0)
    net = train_reward_model(cfg, tmp_path, net=_net(tok), tokenizer=tok, log=lambda s: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_eval_accuracy"] < 0.8
    assert summary["eval_accuracy"] > 0.9
    assert any("eval_accuracy" in m for m in read_jsonl(tmp_path / "metrics.jsonl"))

    folder = tmp_path / "reward_model"
    assert {"config.json", "model.safetensors", "reward_head.safetensors", "reward_head.json",
            "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    prompts = ["Say red:", "Say cat:", "Say sun:"]
    responses = ["red moon cat", "dog dog", "moon"]
    before = LearnedReward(net, tok).score(prompts, responses)
    loaded = LearnedReward.load(folder)
    assert (loaded.template, loaded.max_len) == ("raw", 64)  # the training encoding travels with the model
    assert loaded.score(prompts, responses) == before  # identical after a round trip
    assert before[0] > before[1] and before[2] > before[1]


def test_learned_reward_inside_compose_rewards(tok):
    reward = LearnedReward(_net(tok), tok)
    composed = compose_rewards({"format": 1.0, "helpful": {"weight": 0.5, "on": "summary"}, "safety": 2.0},
                               reward_models={"helpful": reward, "safety": reward})
    completions = ["<think> a </think> <answer> red moon </answer>", "<think> b </think> <answer> dog </answer>"]
    problems = [Problem("q1", "1"), Problem("q2", "2")]
    results = composed.batch(problems, completions, prompts=["Say red:", "Say dog:"])
    summary_scores = reward.score(["Say red:", "Say dog:"], ["<answer> red moon </answer>", "<answer> dog </answer>"])
    full_scores = reward.score(["Say red:", "Say dog:"], completions)
    for r, h, s in zip(results, summary_scores, full_scores):
        assert r["helpful"] == pytest.approx(h) and r["safety"] == pytest.approx(s)
        assert r["total"] == pytest.approx(r["format"] + 0.5 * h + 2.0 * s)
    assert reward.score([], []) == []
    empty = reward.score(["", "Say red:"], ["", ""])  # model output may be empty: a score, never an error
    assert len(empty) == 2 and all(isinstance(x, float) for x in empty)


def test_make_preference_pairs_kinds():
    pairs = make_preference_pairs(50, seed=3)
    assert {p["kind"] for p in pairs} == set(PREFERENCE_KINDS)
    assert pairs == make_preference_pairs(50, seed=3)  # deterministic
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert format_reward(p["chosen"]) == 1.0 and not is_mixed_language(p["chosen"])
        if p["kind"] == "bad_format":
            assert format_reward(p["rejected"]) == 0.0
        if p["kind"] == "mixed_language":
            assert is_mixed_language(p["rejected"])
        if p["kind"] == "rambling":
            assert len(p["rejected"]) > len(p["chosen"]) + 40
        if p["kind"] in ("wrong", "unsafe"):
            assert p["rejected"].split("<answer>")[1] != p["chosen"].split("<answer>")[1]


def test_resume_after_crash_equals_uninterrupted(tok, tmp_path):
    tok.save(tmp_path / "tok")
    cfg = RewardModelConfig(tokenizer=str(tmp_path / "tok"), data=_marker_pairs(48, seed=2), pairs_per_step=8,
                            epochs=1, lr=3e-3, warmup_steps=1, eval_every=3, max_len=64, save_every=2)
    assert_resume_after_crash_equals_uninterrupted(train_reward_model, cfg, tmp_path)  # step 2: logged, not saved
