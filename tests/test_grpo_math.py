"""GRPO-family arithmetic against hand-computed values (derivations in the comments)."""

import math

import pytest
import torch

from r1lab.train.grpo_math import (
    Objective,
    dynamic_sampling_filter,
    group_advantages,
    group_reward_std,
    k3_kl,
    overlong_filter_mask,
    policy_loss,
    register_aggregation,
)
from r1lab.train.logprobs import entropy_from_logits

S2 = 1 / math.sqrt(2)  # 0.7071...: (r - mean) / unbiased std for a group {1, 0}


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ----------------------------------------------------------------------------- advantages
def test_group_std_advantages():
    # group {1, 2, 3}: mean 2, unbiased std 1 → -1, 0, 1.  group {5, 5, 5}: std 0 → 0 (eps keeps it finite).
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert close(group_advantages(r, 3), [-1, 0, 1, 0, 0, 0])
    # group {1, 0}: mean .5, unbiased std sqrt(.5) → ±0.7071 (population std would give ±1)
    assert close(group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0), [S2, -S2])


def test_dr_grpo_and_batch_std_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert close(group_advantages(r, 3, scale="none"), [-1, 0, 1, 0, 0, 0])
    # batch std: mean 3.5, squared deviations 6.25 + 2.25 + .25 + 3 × 2.25 = 15.5, /5 → std sqrt(3.1)
    expected = torch.tensor([-1.0, 0, 1, 0, 0, 0]) / math.sqrt(3.1)
    assert close(group_advantages(r, 3, scale="batch_std", eps=0.0), expected)


def test_ragged_and_unordered_groups():
    # labels need not be contiguous or sorted; groups of 2, 3 and 1
    r = torch.tensor([1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    adv = group_advantages(r, group_ids=torch.tensor([7, 7, 3, 3, 3, 9]), eps=0.0)
    assert close(adv, [S2, -S2, -1, 0, 1, 0])  # the singleton group has no baseline → 0
    adv = group_advantages(torch.tensor([1.0, 10.0, 3.0, 20.0]), group_ids=[0, 1, 0, 1], eps=0.0)
    assert close(adv, [-S2, -S2, S2, S2])
    assert close(group_reward_std(r, group_ids=[7, 7, 3, 3, 3, 9]), [S2, S2, 1, 1, 1, 0])


def test_advantage_errors_and_int_rewards():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")
    assert close(group_advantages(torch.tensor([1, 0]), 2, eps=0.0), [S2, -S2])


# ----------------------------------------------------------------------------- policy loss
def _setup():
    """Two sequences, three token slots; ratios r = exp(logp - old) chosen to be round numbers.

    row 0, A = +1: r = 1.1, 0.5, 1.5        row 1, A = -1: r = 0.9, 2.0, (masked)
    """
    old = torch.full((2, 3), math.log(0.5))
    ratios = torch.tensor([[1.1, 0.5, 1.5], [0.9, 2.0, 1.0]])
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_hand_computed_aggregations():
    logp, old, adv, mask = _setup()
    # ε = 0.2. Row 0: -min(rA, clip(r)A) = -1.1, -0.5, -min(1.5, 1.2) = -1.2.
    # Row 1 (A < 0): -min(-0.9, -0.9) = 0.9, -min(-2.0, -1.2) = 2.0.  Token sum 0.1 over 5 tokens.
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, aggregation="token_mean")
    assert close(loss, 0.1 / 5)
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, aggregation="seq_mean_token_mean")
    assert close(loss, (-2.8 / 3 + 2.9 / 2) / 2)
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, aggregation="constant")
    assert close(loss, 0.1 / (2 * 3))  # B × T
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, aggregation="constant", constant_normalizer=10)
    assert close(loss, 0.1 / (2 * 10))
    # only the r = 1.5, A > 0 token is clipped
    assert close(stats["clip_frac"], 1 / 5) and close(stats["clip_frac_high"], 1 / 5)
    assert close(stats["clip_frac_low"], 0)
    assert close(stats["ratio_mean"], (1.1 + 0.5 + 1.5 + 0.9 + 2.0) / 5)
    assert close(stats["ratio_max"], 2.0) and close(stats["ratio_min"], 0.5) and close(stats["tokens"], 5)
    assert close(stats["pg_loss"], 0.1 / 5)


def test_clip_higher_and_low_clip():
    logp, old, adv, mask = _setup()
    # ε_high = 0.6: 1.5 < 1.6 is no longer clipped → token sum -1.1 - 0.5 - 1.5 + 0.9 + 2.0 = -0.2
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.6, aggregation="token_mean")
    assert close(loss, -0.2 / 5) and close(stats["clip_frac"], 0)
    # A < 0, r = 0.5 < 0.8: -min(-0.5, -0.8) = 0.8 (clipped, no gradient); r = 1.0: 1.0
    lp = torch.log(torch.tensor([[0.5, 1.0]])).requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), aggregation="token_mean")
    assert close(loss, (0.8 + 1.0) / 2) and close(stats["clip_frac_low"], 0.5)
    loss.backward()
    assert close(lp.grad, [[0.0, 0.5]])  # d(-rA)/dlogp = -A·r = 1.0, / 2 tokens


def test_r1_clip_ratio_ten():
    # ε = 10: bounds [-9, 11]. A = +1, r = 0.05, 5, 12 → -0.05, -5, -11 (only r = 12 clipped)
    lp = torch.log(torch.tensor([[0.05, 5.0, 12.0]])).requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), clip_low=10.0,
                              aggregation="token_mean")
    assert close(loss, -(0.05 + 5 + 11) / 3, 1e-5) and close(stats["clip_frac"], 1 / 3)
    loss.backward()
    assert close(lp.grad, [[-0.05 / 3, -5 / 3, 0.0]], 1e-5)
    # A = -1 at r = 0.05: the lower bound -9 never bites
    loss, stats = policy_loss(torch.log(torch.tensor([[0.05]])), torch.zeros(1, 1), torch.tensor([-1.0]),
                              torch.ones(1, 1), clip_low=10.0)
    assert close(loss, 0.05, 1e-6) and close(stats["clip_frac"], 0)


def test_gradient_signs_and_clipped_tokens_have_zero_gradient():
    logp, old, adv, mask = _setup()
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, aggregation="token_mean")
    loss.backward()
    g = logp.grad
    # d(-rA)/dlogp = -A·r, / 5 tokens. Positive A → negative gradient → gradient descent raises logp.
    assert close(g[0], [-1.1 / 5, -0.5 / 5, 0.0])  # r = 1.5 clipped: zero gradient
    assert close(g[1], [0.9 / 5, 2.0 / 5, 0.0])  # negative A pushes logp down; masked slot: zero
    # one SGD step on logp raises the ratio of the positive-advantage tokens
    assert (g[0, :2] < 0).all() and (g[1, :2] > 0).all()


def test_masked_tokens_contribute_nothing_even_if_garbage():
    logp, old, adv, mask = _setup()
    ref, _ = policy_loss(logp, old, adv, mask, aggregation="seq_mean_token_mean", ref_logp=old, beta=0.1)
    lp2 = logp.detach().clone()
    lp2[1, 2] = float("-inf")
    lp2.requires_grad_()
    old2, ref2 = old.clone(), old.clone()
    old2[1, 2], ref2[1, 2] = float("nan"), float("inf")
    loss, stats = policy_loss(lp2, old2, adv, mask, aggregation="seq_mean_token_mean", ref_logp=ref2, beta=0.1)
    assert torch.isfinite(loss) and close(loss, ref)
    loss.backward()
    assert torch.isfinite(lp2.grad).all() and lp2.grad[1, 2] == 0
    assert all(torch.isfinite(v) for v in stats.values())


def test_sequence_level_ratio_gspo():
    logp, old, adv, mask = _setup()
    # row 0: s = (1.1 · 0.5 · 1.5)^(1/3) = 0.825^(1/3) ≈ 0.9379 ∈ [0.8, 1.2] → loss -s on every token
    # row 1: masked slot excluded, s = (0.9 · 2.0)^(1/2) = sqrt(1.8); A = -1 → -min(-s, -1.2) = s
    s0, s1 = 0.825 ** (1 / 3), math.sqrt(1.8)
    loss, stats = policy_loss(logp, old, adv, mask, ratio_level="sequence", aggregation="seq_mean_token_mean")
    assert close(loss, (-s0 + s1) / 2)
    assert close(stats["clip_frac"], 0)
    loss.backward()
    # d s_i / d logp_t = s_i / |o_i|; every token of row 0 carries -s0/3, then the mean over 2 sequences
    assert close(logp.grad[0], [-s0 / 6] * 3)
    assert close(logp.grad[1], [s1 / 4, s1 / 4, 0.0])


def test_gspo_clip_fraction_counts_whole_sequences():
    # one sequence of 2 tokens with s = 2 and A > 0 → both tokens clipped, zero gradient
    lp = torch.log(torch.tensor([[2.0, 2.0], [1.0, 1.0]])).requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.ones(2, 2), ratio_level="sequence")
    assert close(stats["clip_frac"], 0.5)
    loss.backward()
    assert close(lp.grad[0], [0.0, 0.0])


def test_k3_kl_term():
    # d = ref - logp: ln 2 → 2 - ln2 - 1; 0 → 0; -ln 2 → 0.5 + ln2 - 1
    logp = torch.zeros(1, 3, requires_grad=True)
    ref = torch.tensor([[math.log(2), 0.0, -math.log(2)]])
    k = [2 - math.log(2) - 1, 0.0, 0.5 + math.log(2) - 1]
    assert close(k3_kl(logp, ref), [k])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    # ratio 1 and A = 0: the loss is β × mean k3
    loss, stats = policy_loss(logp, torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3), ref_logp=ref, beta=0.1,
                              aggregation="token_mean")
    assert close(loss, 0.1 * sum(k) / 3) and close(stats["kl"], sum(k) / 3)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): pulls logp toward ref
    assert close(logp.grad, [[0.1 * (1 - 2) / 3, 0.0, 0.1 * (1 - 0.5) / 3]])
    # β = 0 with a reference: KL only reported
    loss, stats = policy_loss(logp, torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3), ref_logp=ref)
    assert close(loss, 0.0) and close(stats["kl"], sum(k) / 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3), beta=0.1)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batch_shares_sum_to_full_batch_loss(aggregation):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=g) * 0.1 - 1
    old = logp + torch.randn(6, 5, generator=g) * 0.1
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).int()
    mask[:, 0] = 1
    full, _ = policy_loss(logp, old, adv, mask, aggregation=aggregation)
    kw = dict(total_tokens=float(mask.sum()), total_seqs=6.0)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], aggregation=aggregation, **kw)[0]
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    assert close(sum(parts), full)


def test_advantage_per_token_equals_broadcast():
    logp, old, adv, mask = _setup()
    base, _ = policy_loss(logp, old, adv, mask, aggregation="token_mean")
    per_token, _ = policy_loss(logp, old, adv[:, None].expand(2, 3), mask, aggregation="token_mean")
    assert close(per_token, base)


def test_a_registered_aggregation_is_selectable_by_name():
    logp, old, adv, mask = _setup()

    @register_aggregation("test_token_sum")
    def token_sum(per_token, m, **_):
        return (per_token * m).sum()

    total, _ = policy_loss(logp, old, adv, mask, aggregation="test_token_sum")
    mean, _ = policy_loss(logp, old, adv, mask, aggregation="token_mean")
    assert close(total, mean * mask.sum())
    with pytest.raises(ValueError, match="unknown aggregation 'nope'"):
        policy_loss(logp, old, adv, mask, aggregation="nope")


def test_objective_presets_feed_policy_loss():
    logp, old, adv, mask = _setup()
    dapo = Objective.preset("dapo")
    assert dapo.clip_high == 0.28 and dapo.aggregation == "token_mean" and dapo.mask_truncated
    loss, _ = policy_loss(logp, old, adv, mask, **Objective.preset("dr_grpo").loss_kwargs())
    assert close(loss, 0.1 / 6)
    assert Objective.preset("r1").clip_low == 10.0 and Objective.preset("r1").beta == 0.001
    assert Objective.preset("gspo").ratio_level == "sequence"
    assert Objective.preset("dr_grpo").advantage_kwargs()["scale"] == "none"
    with pytest.raises(KeyError, match="known"):
        Objective.preset("ppo")


# ----------------------------------------------------------------------------- filters and shaping
def test_dynamic_sampling_filter():
    r = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = dynamic_sampling_filter(r, group_size=4)
    assert keep.tolist() == [True] * 4 + [False] * 8
    keep = dynamic_sampling_filter(torch.tensor([0.3, 0.1 + 0.2, 1.0, 0.0, 2.0]), torch.tensor([5, 5, 6, 6, 7]))
    assert keep.tolist() == [False, False, True, True, False]  # round-off is "equal"; a singleton is dropped


def test_overlong_filter_and_the_soft_penalty_as_a_reward_term():
    from r1lab.config import ConfigError
    from r1lab.rewards import compose_rewards
    from r1lab.tasks import Problem
    from r1lab.train.grpo import GRPOConfig

    assert overlong_filter_mask(["stop", "length", "stop"]).tolist() == [True, False, True]
    cfg = GRPOConfig(max_new_tokens=20, objective=Objective(soft_overlong_cache=4), rewards={"format": 1.0})
    spec = cfg.reward_spec()
    assert spec["overlong"] == {"weight": 1.0, "max_len": 20, "cache_len": 4}
    # max 20, cache 4: free up to 16, then (16 - L) / 4, beyond 20 → -1
    reward = compose_rewards({"overlong": spec["overlong"]})
    assert [reward("x", Problem("q", "1"), length=n)["total"] for n in (10, 16, 18, 20, 21)] == [0, 0, -0.5, -1, -1]
    assert "overlong" not in GRPOConfig(rewards={"format": 1.0}).reward_spec()
    with pytest.raises(ConfigError, match="soft_overlong_cache=4096 must be <= max_new_tokens=128"):
        GRPOConfig(max_new_tokens=128, objective=Objective.preset("dapo"))


def test_entropy_from_logits():
    assert close(entropy_from_logits(torch.zeros(4)), math.log(4))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert close(entropy_from_logits(p.log() + 3.0), 0.5 * math.log(2) + 0.5 * math.log(4))
