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
