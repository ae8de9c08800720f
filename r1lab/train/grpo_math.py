"""The arithmetic of GRPO and its fixed variants: group advantages, the clipped policy loss, k3 KL, filters.

One function per formula, no trainer state. The variants differ in four independent knobs, all of which
`policy_loss` / `group_advantages` expose (R1-TECHNICAL-REFERENCE §1-2):

    knob                  GRPO (DeepSeekMath/R1)   Dr. GRPO            DAPO                   GSPO
    advantage scale       group std                none                group std              group std
    importance ratio      per token                per token           per token              per sequence
    loss aggregation      seq_mean_token_mean      constant            token_mean             seq_mean_token_mean
    clip (low, high)      0.2, 0.2 (R1: 10, 10)    0.2, 0.2            0.2, 0.28              3e-4, 4e-4
    KL (k3) weight β      0.04 (R1: 0.001)         0                   0                      0

`Objective.preset(name)` holds these rows. Shapes: N completions in prompt-major order (completion j of
prompt g at index g * G + j); B sequences × T completion tokens for the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import torch

from r1lab.config import check_ranges

AdvantageScale = Literal["group_std", "batch_std", "none"]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "constant"]


# ----------------------------------------------------------------------------- groups and advantages
def group_index(
    n: int, group_size: int | None = None, group_ids: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """Dense group index [n] (values 0..K-1) from either a fixed group size or arbitrary group labels.

    group_size G: completions are prompt-major, so completion i belongs to group i // G (n must divide by G).
    group_ids [n]: any integer labels; groups may be ragged (dynamic sampling / filtering leaves them so)
    and need not be contiguous. Exactly one of the two must be given.
    """
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size or group_ids")
    if group_ids is not None:
        ids = torch.as_tensor(group_ids)
        if ids.shape != (n,):
            raise ValueError(f"group_ids has shape {tuple(ids.shape)}, expected ({n},)")
        return torch.unique(ids, return_inverse=True)[1]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}; pass group_ids for ragged groups")
    return torch.arange(n) // group_size


def _group_mean_std(r: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element group mean and unbiased group std (0 for a group of one), both [N]."""
    k = int(idx.max()) + 1 if idx.numel() else 0
    count = torch.zeros(k, dtype=r.dtype).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(k, dtype=r.dtype).index_add_(0, idx, r) / count
    dev = r - mean[idx]
    sq = torch.zeros(k, dtype=r.dtype).index_add_(0, idx, dev * dev)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean[idx], std[idx]


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    scale: AdvantageScale = "group_std",
    eps: float = 1e-6,
    *,
    group_ids: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Group-relative advantages [N] from rewards [N].

    scale="group_std"  GRPO:      A_i = (r_i - mean_g) / (std_g + eps)
    scale="none"       Dr. GRPO:  A_i =  r_i - mean_g
    scale="batch_std"  Lite-PPO:  A_i = (r_i - mean_g) / (std(r over the whole batch) + eps)

    std is the *unbiased* (Bessel-corrected, n - 1) standard deviation. The papers do not say which; both
    open references (verl `torch.std`, TRL `nanstd`) use the unbiased one, so r1lab's advantages and
    logged reward std match numbers people compare against. For binary rewards and G = 2 it gives
    A = ±0.707 instead of ±1; the scale only rescales the step, it never changes the sign.
    A group of one has no baseline to compare with: its advantage is 0 (r - mean = 0 whatever the scale).
    A group whose rewards are all equal gets A = 0 (no gradient), which `dynamic_sampling_filter` removes.
    Pass either group_size (equal groups, prompt-major) or group_ids (ragged groups).
    """
    r = rewards.detach().cpu()  # tiny vectors: do the bookkeeping on CPU whatever the device
    r = r if r.is_floating_point() else r.float()
    idx = group_index(r.numel(), group_size, group_ids)
    mean, std = _group_mean_std(r, idx)
    centered = r - mean
    if scale == "group_std":
        denom = std + eps
    elif scale == "batch_std":
        denom = (r.std() if r.numel() > 1 else r.new_zeros(())) + eps
    elif scale == "none":
        return centered.to(rewards.device)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; expected group_std, batch_std or none")
    # A zero-variance group (or eps = 0 with a singleton) would give 0 / 0: its advantage is 0.
    adv = torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1.0), 0.0)
    return adv.to(rewards.device)


def group_reward_std(rewards: torch.Tensor, group_size: int | None = None, *, group_ids=None) -> torch.Tensor:
    """Unbiased reward std of each completion's group [N] (for the zero-std-fraction metric)."""
    r = rewards.detach().float().cpu()
    return _group_mean_std(r, group_index(r.numel(), group_size, group_ids))[1]


def dynamic_sampling_filter(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    group_size: int | None = None,
    atol: float = 1e-6,
) -> torch.Tensor:
    """DAPO dynamic sampling: keep mask [N] (bool) that drops every group whose rewards are all equal.

    Such groups (all right or all wrong) have zero advantage and so contribute no policy gradient, only
    noise in the normalizer. atol absorbs float round-off in summed rewards (0.1 + 0.2 vs 0.3).
    """
    r = rewards.detach().float().cpu()
    idx = group_index(r.numel(), group_size, group_ids)
    k = int(idx.max()) + 1 if idx.numel() else 0
    hi = torch.full((k,), -torch.inf).scatter_reduce(0, idx, r, "amax")
    lo = torch.full((k,), torch.inf).scatter_reduce(0, idx, r, "amin")
    return ((hi - lo) > atol)[idx].to(rewards.device)


def overlong_filter_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """DAPO overlong filtering: [N] bool, False for completions cut at the length limit ("length").

    Multiply it into the loss mask so truncated samples, whose reward says nothing about a finished
    answer, do not train the policy.
    """
    return torch.tensor([reason != "length" for reason in finish_reasons], dtype=torch.bool)


# ----------------------------------------------------------------------------- the loss
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per sampled token: exp(d) - d - 1 with d = ref - logp.

    Non-negative, unbiased for tokens sampled from π_θ. d is clamped to [-20, 20] so one token whose
    probabilities diverge wildly cannot overflow exp (the clamp never bites at sane divergences).
    """
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# The loss is assembled from small registered pieces (a ratio level, an aggregation), chosen by name in
# the Objective; a new variant is one decorated function.
RATIO_LEVELS: dict[str, Callable[..., torch.Tensor]] = {}
AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register_ratio_level(name: str):
    """Register fn(log_ratio [B, T], mask [B, T] float) -> log-ratio [B, T] under `name`."""
    def add(fn):
        RATIO_LEVELS[name] = fn
        return fn
    return add


def register_aggregation(name: str):
    """Register fn(per_token [B, T], mask [B, T] float, *, total_tokens, total_seqs, constant_normalizer)
    -> 0-dim loss under `name`; the totals are None for a stand-alone batch."""
    def add(fn):
        AGGREGATIONS[name] = fn
        return fn
    return add


@register_ratio_level("token")
def token_log_ratio(log_ratio: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log r_t = log π_θ(o_t) - log π_old(o_t), per token (GRPO, DAPO, Dr. GRPO)."""
    return log_ratio


@register_ratio_level("sequence")
def sequence_log_ratio(log_ratio: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GSPO: one length-normalized log-ratio per sequence, mean_t (log π_θ - log π_old), for all its tokens."""
    seq_log_ratio = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)
    return seq_log_ratio[:, None].expand_as(log_ratio)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """PPO's clipped surrogate per token, to minimize: -min(r·A, clip(r, 1 - ε_low, 1 + ε_high)·A)."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * adv, clipped * adv)


@register_aggregation("token_mean")
def token_mean(per_token, m, *, total_tokens=None, total_seqs=None, constant_normalizer=None) -> torch.Tensor:
    """DAPO: sum over active tokens / number of active tokens (of the whole minibatch when given)."""
    denom = m.sum().clamp(min=1) if total_tokens is None else total_tokens
    return (per_token * m).sum() / denom


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(per_token, m, *, total_tokens=None, total_seqs=None, constant_normalizer=None) -> torch.Tensor:
    """GRPO: mean over sequences of each sequence's token mean; all-masked rows are skipped."""
    seq_tokens = m.sum(-1)
    seq_loss = (per_token * m).sum(-1) / seq_tokens.clamp(min=1)
    denom = (seq_tokens > 0).sum().clamp(min=1) if total_seqs is None else total_seqs
    return seq_loss.sum() / denom


@register_aggregation("constant")
def constant_normalized(per_token, m, *, total_tokens=None, total_seqs=None, constant_normalizer=None) -> torch.Tensor:
    """Dr. GRPO: sum over active tokens / (sequences × a constant length; default the batch's T)."""
    B, T = per_token.shape
    norm = T if constant_normalizer is None else constant_normalizer
    return (per_token * m).sum() / ((B if total_seqs is None else total_seqs) * norm)


def clip_stats(ratio: torch.Tensor, adv: torch.Tensor, active: torch.Tensor, m: torch.Tensor, clip_low: float,
               clip_high: float) -> dict[str, torch.Tensor]:
    """Where the clip removes the gradient (the clipped branch wins the min: r above 1 + ε_high with A > 0,
    or below 1 - ε_low with A < 0) and the ratio's spread, over the active tokens."""
    high = (ratio > 1.0 + clip_high) & (adv > 0) & active
    low = (ratio < 1.0 - clip_low) & (adv < 0) & active
    n = active.sum().clamp(min=1)
    big = torch.finfo(ratio.dtype).max
    return {
        "clip_frac": (high | low).sum() / n,
        "clip_frac_high": high.sum() / n,
        "clip_frac_low": low.sum() / n,
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_max": torch.where(active, ratio, 0.0).amax(),  # ratios are > 0, so 0 is neutral
        "ratio_min": torch.where(active, ratio, big).amin(),
        "tokens": active.sum().to(ratio.dtype),
    }


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ratio_level: RatioLevel = "token",
    aggregation: Aggregation = "seq_mean_token_mean",
    constant_normalizer: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimize) and detached 0-d stats.

    logp [B, T]: log π_θ of the sampled completion tokens (differentiable); old_logp [B, T]: log π_old,
    the policy that sampled them; advantages [B] (broadcast over tokens) or [B, T]; mask [B, T] (1 =
    completion token that counts). Per token:

        r    = exp(RATIO_LEVELS[ratio_level](logp - old_logp))      token: per token; sequence: GSPO
        l    = clipped_surrogate(r, A, clip_low, clip_high)  +  β · k3(logp, ref_logp)

    clip_high None means clip_high = clip_low (symmetric). R1's ε = 10 is just clip_low = 10: the lower
    bound 1 - 10 < 0 is never reached and the upper bound only bites at r > 11.
    The KL term is added to every token before aggregation, as GRPO does (not folded into the reward).
    The tokens are then aggregated by AGGREGATIONS[aggregation] (token_mean, seq_mean_token_mean, constant).

    Gradient accumulation: when one optimizer step spans several micro-batches, pass the totals of the
    whole minibatch (total_tokens = active tokens for token_mean, total_seqs = sequences for the other
    two); each micro-batch loss is then its share and summing them gives the full-batch loss exactly.

    Stats (masked token means unless noted): pg_loss, kl (if ref_logp given), clip_frac (share of tokens
    whose gradient the clip removes), clip_frac_low / clip_frac_high, ratio_mean, ratio_max, ratio_min,
    tokens (active token count). Call float() on them when logging.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        shapes = f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)}"
        raise ValueError(f"{shapes}: shapes must match")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs of the reference policy)")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected one of {sorted(RATIO_LEVELS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {sorted(AGGREGATIONS)}")
    clip_high = clip_low if clip_high is None else clip_high
    active = mask.bool()
    m = active.to(logp.dtype)
    # Zero the padding first: padded positions may hold -inf / NaN, and NaN * 0 is still NaN.
    zero = logp.new_zeros(())
    logp = torch.where(active, logp, zero)
    old_logp = torch.where(active, old_logp.detach(), zero)
    ref_logp = None if ref_logp is None else torch.where(active, ref_logp.detach(), zero)
    adv = advantages.detach().to(logp.dtype)
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    ratio = torch.exp(RATIO_LEVELS[ratio_level](logp - old_logp, m))
    pg = clipped_surrogate(ratio, adv, clip_low, clip_high)
    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta:
            per_token = per_token + beta * kl
    loss = AGGREGATIONS[aggregation](per_token, m, total_tokens=total_tokens, total_seqs=total_seqs,
                                     constant_normalizer=constant_normalizer)
    with torch.no_grad():
        stats = {"pg_loss": _masked_mean(pg, m), **clip_stats(ratio, adv, active, m, clip_low, clip_high)}
        if kl is not None:
            stats["kl"] = _masked_mean(kl, m)
    return loss, {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------- named objectives
@dataclass
class Objective:
    """Every knob of the GRPO-family objective, one config section; `preset` gives the published rows.

    The defaults are DeepSeekMath GRPO with β = 0 (TRL's default: no reference model to hold).

    `loss_kwargs()` feeds policy_loss; `advantage_kwargs()` feeds group_advantages; the three filters are
    switches the trainer applies (overlong filter on the loss mask, DAPO's soft overlong penalty as the
    `overlong` reward term, dynamic sampling on groups).
    """

    advantage_scale: AdvantageScale = "group_std"
    advantage_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float | None = None
    ratio_level: RatioLevel = "token"
    aggregation: Aggregation = "seq_mean_token_mean"
    constant_normalizer: float | None = None
    beta: float = 0.0
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    soft_overlong_cache: int = 0
    """0: no soft overlong penalty; else DAPO's L_cache in tokens: the GRPO trainer adds the `overlong` reward
    (rewards.overlong_penalty) with max_len = its max_new_tokens (DAPO: 4,096 of 20,480)."""

    PRESETS = {
        "grpo": dict(beta=0.04),  # DeepSeekMath
        "r1": dict(clip_low=10.0, beta=0.001),  # DeepSeek-R1 (Nature Methods)
        "dr_grpo": dict(advantage_scale="none", aggregation="constant"),
        "dapo": dict(clip_high=0.28, aggregation="token_mean", mask_truncated=True, dynamic_sampling=True,
                     soft_overlong_cache=4096),
        "gspo": dict(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence"),
    }

    def __post_init__(self) -> None:
        check_ranges(self, at_least={"advantage_eps": 0, "beta": 0, "soft_overlong_cache": 0},
                     positive=("clip_low",))
        for name in ("clip_high", "constant_normalizer"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Objective":
        if name not in cls.PRESETS:
            raise KeyError(f"unknown objective {name!r}; known: {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def loss_kwargs(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in ("clip_low", "clip_high", "ratio_level", "aggregation", "constant_normalizer", "beta")}

    def advantage_kwargs(self) -> dict:
        return {"scale": self.advantage_scale, "eps": self.advantage_eps}
