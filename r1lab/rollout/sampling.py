"""Sampling parameters and the on-device token sampler.

Every row of a decode batch may carry its own temperature / top-k / top-p (the server mixes requests), so
the sampler takes per-row tensors built once per batch composition (`RowParams`), and skips the stages no
row needs (no sort over the vocabulary unless some row uses top-p).

Draws use the Gumbel-max trick: argmax(logits / T - log E) with E ~ Exp(1) is a sample from
softmax(logits / T); masked (-inf) entries can never win. All of it stays on the device: no host sync.

The returned log-probability is the one GRPO uses as π_old: log_softmax of the *raw* logits (temperature 1,
no truncation) at the sampled token, whatever temperature / top-k / top-p shaped the draw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import fused_sampling

if TYPE_CHECKING:
    from r1lab.tools import ToolHook


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    top_k: int | None = None
    """Keep only the k most likely tokens (0 or None = off)."""
    max_new_tokens: int = 256
    """Most tokens to generate per sample (a sampled stop token counts)."""
    stop_token_ids: list[int] | None = None
    """None: the model's EOS ids. A list, even an empty one, is used exactly as given."""
    n: int = 1
    """Samples per prompt; they share the prompt's prefill."""
    seed: int | None = None
    """The draws of sample s of a request are a function of (seed, s, token position) only, whatever else
    the engine runs (generate() gives prompt i the seed seed + i). None: a seed from the engine's own
    generator (see Engine.seed)."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends a sample as soon as it has been generated (finish_reason 'stop'; the token that completes
    it is the last one, so the text may run a few characters past it). Needs `detokenize`."""
    detokenize: Callable[[list[int]], str] | None = field(default=None, compare=False, repr=False)
    """Token ids → text (the tokenizer's decode), for stop_strings and tool."""
    tool: "ToolHook | None" = field(default=None, compare=False, repr=False)
    """A tool the samples call while they generate (r1lab.tools.ToolHook, or any object with `close_text: str`
    and `respond(token_ids) -> reply | None`, the reply having `.token_ids` and `.error`). When a sampled
    token completes close_text (and did not end the sample), the sample pauses, `respond` gets its generated
    ids so far on a worker thread, and the reply's ids are appended (not sampled: Completion.tool_mask) before
    it resumes. Needs `detokenize`."""

    def __post_init__(self) -> None:
        self.stop_strings = tuple(s for s in self.stop_strings if s)
        if self.stop_strings and self.detokenize is None:
            raise ValueError("SamplingParams.stop_strings needs detokenize (the tokenizer's decode)")
        if self.tool is not None and self.detokenize is None:
            raise ValueError("SamplingParams.tool needs detokenize (the tokenizer's decode) to find its close_text")
        if self.tool is not None and not self.tool.close_text:
            raise ValueError("SamplingParams.tool has an empty close_text")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 or None, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stopped_by_text(self, token_ids: list[int], since: int = 0) -> bool:
        """Whether the newest token completed one of stop_strings. Each token is at least one character, so
        the last (longest stop string + 1) tokens hold any stop string that ends in the newest one; an earlier
        occurrence would have stopped the sample already. Only token_ids[since:] are looked at: the text the
        model wrote since its last tool reply (a program's output that prints a stop string stops nothing)."""
        if not self.stop_strings:
            return False
        tail = self._tail(token_ids, since, max(map(len, self.stop_strings)))
        return any(s in tail for s in self.stop_strings)

    def closed_tool_call(self, token_ids: list[int], since: int = 0) -> bool:
        """Whether the newest token completed the tool's close_text (looked for like a stop string, in the
        text generated since the sample's last pause)."""
        return self.tool.close_text in self._tail(token_ids, since, len(self.tool.close_text))

    def _tail(self, token_ids: list[int], since: int, longest: int) -> str:
        return self.detokenize(token_ids[max(since, len(token_ids) - longest - 1):])


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a host sync (pinned staging + async copy on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class RowParams:
    """Per-row sampling settings of one decode batch, as device tensors plus host-side flags.

    rows: the SamplingParams of rows 0..B-1 (None for an idle row, which is sampled greedily and ignored).
    """

    def __init__(self, rows: list[SamplingParams | None], vocab_size: int, device: torch.device):
        params = [p or _IDLE for p in rows]
        self.batch = len(params)
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        temps = [p.temperature if not p.greedy else 1.0 for p in params]
        self.uniform_temperature = temps[0] if len(set(temps)) == 1 else None
        self.temperature = device_tensor(temps, torch.float32, device)[:, None]  # [B, 1]
        ks = [p.top_k if p.top_k and p.top_k < vocab_size and not p.greedy else 0 for p in params]
        self.max_top_k = max(ks)
        self.top_k = device_tensor([k or vocab_size for k in ks], torch.long, device)  # [B]
        ps = [p.top_p if not p.greedy else 1.0 for p in params]
        self.any_top_p = any(p < 1.0 for p in ps)
        self.top_p = device_tensor(ps, torch.float32, device)[:, None]  # [B, 1]
        self.greedy_rows = device_tensor([p.greedy for p in params], torch.bool, device)  # [B]
        self.temperature_or_zero = device_tensor([p.temperature for p in params], torch.float32, device)

    @property
    def plain(self) -> bool:
        """No row truncates the distribution (temperature and greedy only): what the fused GPU sampler handles."""
        return self.max_top_k == 0 and not self.any_top_p


_IDLE = SamplingParams(temperature=0.0)


def processed_scores(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """logits [B, V] fp32 → scores [B, V] whose softmax is the distribution rows are sampled from:
    logits / T, with entries outside the top-k and outside the nucleus set to -inf."""
    scores = logits if rows.uniform_temperature == 1.0 else logits / rows.temperature
    if rows.max_top_k:
        kth = scores.topk(rows.max_top_k, dim=-1).values  # [B, kmax], descending
        # rows without top-k use k = V: index clamps to kmax-1 and the threshold is replaced by -inf
        threshold = kth.gather(1, (rows.top_k.clamp(max=rows.max_top_k) - 1)[:, None])
        threshold = torch.where(rows.top_k[:, None] >= logits.shape[-1], float("-inf"), threshold)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if rows.any_top_p:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # a token stays if the mass strictly before it is < top_p (so the most likely token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= rows.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


_MASK32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys [B] int64 in [0, 2**62) → uniforms [B, vocab] fp32 in [0, 1) (24-bit resolution, like torch.rand),
    a pure function of (keys[b], column): the same key gives the same row on any batch. CUDA with Triton:
    Philox in one kernel (fused_sampling.philox_uniform); elsewhere a hash in torch ops."""
    if fused_sampling.available(keys):
        return fused_sampling.philox_uniform(keys, vocab)
    lo, hi = keys & _MASK32, (keys >> 32) & _MASK32
    first = _hash32(lo ^ _hash32(hi ^ 0x9E3779B9))  # [B]: two 32-bit row keys
    second = _hash32(first ^ 0x85EBCA6B)
    cols = torch.arange(vocab, device=keys.device)
    # two rounds keyed by the row (not row + column offsets of one stream, whose windows would overlap)
    bits = _hash32(_hash32(cols[None, :] ^ first[:, None]) ^ second[:, None])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, rows: RowParams, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), keys [B] int64 (see uniform_noise) → (tokens [B] long, logprobs [B]
    fp32 under log_softmax(logits))."""
    logits = logits.float()
    if rows.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        scores = processed_scores(logits, rows)
        # log E with E = -log U ~ Exp(1). U = 0 gives log E = +inf, so that entry scores -inf and can't win;
        # no NaN is possible.
        log_e = uniform_noise(keys, scores.shape[-1]).log_().neg_().log_()
        tokens = (scores - log_e).argmax(dim=-1)
        if rows.any_greedy:
            tokens = torch.where(rows.greedy_rows, logits.argmax(dim=-1), tokens)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs
