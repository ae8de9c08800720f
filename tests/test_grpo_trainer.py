"""The GRPO trainer's log-probs: π_old, π_θ and π_ref are all of the distribution the rollout sampled from."""

import pytest

from r1lab.model import ASSETS_DIR as ASSETS
from r1lab.model import load_model_and_tokenizer
from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer
from r1lab.train.grpo_math import Objective
from r1lab.run_dir import RunDir


@pytest.mark.parametrize("temperature,beta", [(1.0, 0.0), (0.7, 0.0), (1.4, 0.05)])
def test_old_current_and_reference_logprobs_use_the_rollout_temperature(tmp_path, temperature, beta):
    """On the first (only) update of a step the policy is still π_old, so the current log-probs must equal the
    old ones to rounding, at any rollout temperature; the engine's own log-probs are of the raw (T = 1)
    logits, so at T != 1 they would differ by ~0.1 per token. With β > 0 and the reference equal to the
    policy, the KL term is ~0 too."""
    model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny", dtype="float32")
    cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8), prompts_per_step=2, group_size=4,
                     max_new_tokens=12, temperature=temperature, objective=Objective(beta=beta), lr=1e-3,
                     steps=1, seed=0)
    metrics = Trainer(cfg, model, tok, RunDir(tmp_path)).step()
    assert metrics["logprob_mismatch"] < 2e-4, metrics["logprob_mismatch"]
    assert 0.9999 < metrics["ratio_min"] <= metrics["ratio_max"] < 1.0001
    if beta:
        assert abs(metrics["kl"]) < 1e-5


def test_step_metrics_do_not_depend_on_micro_batching(tmp_path):
    """The same rollout trained in one micro-batch or in many: the logged loss tokens, losses, clip and
    entropy stats and the gradient are the same (before, `tokens` and `pg_loss` were means over micro-batches,
    e.g. 899 vs 299.67 tokens). The lr logged is the one the step's update used, and accuracy counts passes."""
    results = []
    for budget in (100_000, 40):
        model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny", dtype="float32")
        cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8), prompts_per_step=2, group_size=4,
                         max_new_tokens=12, lr=1e-3, warmup_steps=4, steps=1, seed=0, micro_batch_tokens=budget)
        results.append(Trainer(cfg, model, tok, RunDir(tmp_path / str(budget))).step())
    whole, pieces = results
    assert whole["tokens"] == pieces["tokens"] == 8 * whole["response_length"]
    for key in ("pg_loss", "entropy", "ratio_mean", "logprob_mismatch", "grad_norm", "clip_frac"):
        assert whole[key] == pytest.approx(pieces[key], rel=1e-4, abs=1e-7), key
    assert whole["lr"] == pytest.approx(1e-3 / 4)  # warmup step 1 of 4, not the next step's 2e-3 / 4
    assert whole["accuracy"] in {i / 8 for i in range(9)}
    assert whole["memory/peak_rss_gib"] > 0


def test_a_tiny_model_lr_on_a_large_checkpoint_is_warned_about(tmp_path, caplog, monkeypatch):
    import r1lab.train.grpo as grpo

    model, tok = load_model_and_tokenizer(ASSETS / "r1-tiny", dtype="float32")
    cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=8), lr=5e-4)
    with caplog.at_level("WARNING", logger="r1lab.train.grpo"):
        Trainer(cfg, model, tok, RunDir(tmp_path / "a"))
        assert not caplog.records  # 1.9M parameters: the tiny default is right
        monkeypatch.setattr(grpo, "LARGE_MODEL_PARAMETERS", 1_000_000)
        Trainer(cfg, model, tok, RunDir(tmp_path / "b"))
    [record] = caplog.records
    assert "lr=0.0005" in record.getMessage() and "\n" not in record.getMessage()
