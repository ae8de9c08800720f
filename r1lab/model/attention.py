"""Attention: grouped-query attention (Llama/Qwen2) and Multi-head Latent Attention (DeepSeek-V3).

Both read one `AttentionContext`, built once per forward, that says which keys each query may see:
- training / full forward without cache: causal (SDPA is_causal), or block-causal for packed sequences,
  computed as causal SDPA over each document's contiguous run of tokens (`DocumentRuns`), never as a [T, T]
  mask: SDPA with an arbitrary mask falls back to kernels that materialize the scores, O(T²) memory per row;
- with a KVCache (prefill and decode): new keys are written at their positions in the sequence's slot and
  each query reads keys at positions <= its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelArgs
from .layers import RMSNorm, apply_rope, attention_softmax_scale


@dataclass
class AttentionContext:
    cos: torch.Tensor
    """[B, T, rope_dim // 2] fp32."""
    sin: torch.Tensor
    """[B, T, rope_dim // 2] fp32."""
    positions: torch.Tensor
    """[B, T] position of every token in its sequence."""
    mask: torch.Tensor | None = None
    """[B, 1, T, S] bool, True = may attend (the cache path); None = causal over the T tokens, or within the
    document runs of `documents`."""
    cache: KVCache | None = None
    slot_ids: torch.Tensor | None = None
    """[B] cache slot of each row; None = row b uses slot b."""
    kv_len: int = 0
    """Cache positions to read (max position + 1, possibly rounded up)."""
    token_mask: torch.Tensor | None = None
    """[B, T] bool, False on the padding of packed batches (doc id -1): MoE layers leave those tokens out of
    their expert loads and balance loss. None = every token is real."""
    documents: DocumentRuns | None = None
    """Packed rows without a cache: attention is causal within each document run (see DocumentRuns)."""

    @property
    def batch(self) -> int:
        return self.positions.shape[0]


@dataclass
class DocumentRuns:
    """Where the documents of packed rows [B, T] lie, for block-causal attention without a [T, T] mask.

    Tokens are numbered row-major (flat index b·T + t). A run is a maximal stretch of one doc id within a row;
    the padding (doc id -1) of a row is a run too, so it attends causally to itself only: its outputs are
    finite and no real token sees it, as with the mask `doc_ids[q] == doc_ids[k] and k <= q`. Runs of equal
    length form a group, and one causal SDPA call (batch = the group's runs) serves the whole group.
    """

    groups: list[tuple[int, int]]
    """(number of runs, run length) of each group, in `order`."""
    order: torch.Tensor | None
    """[B·T] long: the flat token indices group after group, run after run; None when that is the identity
    (e.g. one document per row, all rows of one length), so no gather is needed."""
    inverse: torch.Tensor | None
    """[B·T] long: the inverse permutation of `order` (None with it)."""

    @property
    def group_tokens(self) -> list[int]:
        return [count * length for count, length in self.groups]


def document_runs(doc_ids: torch.Tensor) -> DocumentRuns:
    """doc_ids [B, T] (each document one contiguous run of its row, -1 on padding) → its DocumentRuns.

    Reads doc_ids on the CPU (one device sync per forward): the run lengths become Python ints, the shapes
    of the SDPA calls.
    """
    B, T = doc_ids.shape
    ids = doc_ids.cpu()
    run_starts = torch.ones(B, T, dtype=torch.bool)
    run_starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = run_starts.flatten().nonzero().squeeze(1)  # every row's first token starts a run
    lengths = torch.diff(starts, append=torch.tensor([B * T]))
    row_doc = torch.stack([starts // T, ids.flatten()[starts]], dim=1)
    if len(torch.unique(row_doc, dim=0)) != len(starts):
        raise ValueError("doc_ids: a document (or the padding) of a row is split into several runs; packed "
                         "documents must be contiguous, with the padding at the end of the row")
    lengths, by_length = torch.sort(lengths, stable=True)
    run_lengths, run_counts = torch.unique_consecutive(lengths, return_counts=True)
    groups = list(zip(run_counts.tolist(), run_lengths.tolist()))
    if torch.equal(by_length, torch.arange(len(starts))):
        return DocumentRuns(groups, None, None)
    first = torch.cumsum(lengths, 0) - lengths  # where each sorted run begins in `order`
    order = starts[by_length].repeat_interleave(lengths) + torch.arange(B * T) - first.repeat_interleave(lengths)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B * T)
    return DocumentRuns(groups, order.to(doc_ids.device), inverse.to(doc_ids.device))


def build_context(
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    cache: KVCache | None,
    slot_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    kv_len: int | None,
) -> AttentionContext:
    if cache is not None:
        if kv_len is None:
            kv_len = int(positions.max().item()) + 1
        if kv_len > cache.max_len:
            raise ValueError(f"position {kv_len - 1} exceeds the KV cache length {cache.max_len}")
        key_pos = torch.arange(kv_len, device=positions.device)
        mask = key_pos.view(1, 1, 1, -1) <= positions[:, None, :, None]
        return AttentionContext(cos, sin, positions, mask, cache, slot_ids, kv_len)
    if doc_ids is not None:
        return AttentionContext(cos, sin, positions, token_mask=doc_ids >= 0, documents=document_runs(doc_ids))
    return AttentionContext(cos, sin, positions)


def _sdpa(q, k, v, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D*] → [B, H, T, Dv]."""
    if ctx.documents is not None:
        return _sdpa_per_document(q, k, v, ctx.documents, scale)
    causal = ctx.mask is None
    if q.shape[1] != k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=causal, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=causal, scale=scale)


def _sdpa_per_document(q, k, v, runs: DocumentRuns, scale: float) -> torch.Tensor:
    """Block-causal attention of packed rows: q [B, H, T, D], k/v [B, Hkv, T, D*] → [B, H, T, Dv].

    Each run is contiguous, so `is_causal=True` on it is exactly the block-causal mask, and without a mask
    SDPA may pick its flash / memory-efficient kernels (memory linear in T). Tokens are gathered run-major
    ([B·T, heads, dim] in runs.order), each group of equal-length runs is one batched SDPA call, and the
    outputs are put back in row order.
    """
    B, T = q.shape[0], q.shape[2]
    gqa = q.shape[1] != k.shape[1]

    def run_major(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d] → [B·T, h, d]
        x = x.transpose(1, 2).flatten(0, 1)
        return x if runs.order is None else x.index_select(0, runs.order)

    sizes = runs.group_tokens
    outs = []
    for qg, kg, vg, (count, length) in zip(*(run_major(x).split(sizes) for x in (q, k, v)), runs.groups):
        qg, kg, vg = (x.unflatten(0, (count, length)).transpose(1, 2) for x in (qg, kg, vg))  # [count, h, length, d]
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(out.transpose(1, 2).flatten(0, 1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [B·T, H, Dv], run-major
    if runs.inverse is not None:
        out = out.index_select(0, runs.inverse)
    return out.unflatten(0, (B, T)).transpose(1, 2)


class GQAttention(nn.Module):
    """Llama / Qwen2 / Mistral attention with half-split RoPE over the whole head."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        d = args.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=args.o_bias)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), ctx.cos, ctx.sin, False)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), ctx.cos, ctx.sin, False)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if ctx.cache is not None:
            ctx.cache.write(self.layer_idx, ctx.slot_ids, ctx.positions, torch.stack([k, v]))
            k, v = ctx.cache.read(self.layer_idx, ctx.slot_ids, B, ctx.kv_len)
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3).

    Without a cache it materializes per-head keys/values from the latent (the training path). With a cache
    it stores only [c_KV; k_rope] per token and attends in latent space ("absorbed" attention): W_UK is
    folded into the query and W_UV applied after the weighted sum, so no per-head K/V is ever built.
    """

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_attention_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank, self.interleaved = args.kv_lora_rank, args.rope_interleave
        d, qk = args.hidden_size, args.qk_nope_head_dim + args.qk_rope_head_dim
        self.q_lora_rank = args.q_lora_rank
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(d, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, d, bias=False)
        self.scale = attention_softmax_scale(args, qk)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._queries(x).view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin, self.interleaved)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope.unsqueeze(2), ctx.cos, ctx.sin, self.interleaved)  # [B, T, 1, rope]
        if ctx.cache is None:
            out = self._attend_expanded(q_nope, q_rope, latent, k_rope, ctx)
        else:
            ctx.cache.write(self.layer_idx, ctx.slot_ids, ctx.positions, torch.cat([latent, k_rope.squeeze(2)], -1))
            out = self._attend_absorbed(q_nope, q_rope, ctx.cache.read(self.layer_idx, ctx.slot_ids, B, ctx.kv_len), ctx)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, ctx) -> torch.Tensor:
        B, T = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        qk_dim = q.shape[-1]
        if self.v_dim != qk_dim:
            # Flash attention (CUDA's and the CPU's) wants one head dim for q, k and v: pad v, then drop the
            # padding. Otherwise SDPA falls back to the math kernel, which builds [H, n, n] scores per document.
            out = _sdpa(q, k, F.pad(v, (0, qk_dim - self.v_dim)), ctx, self.scale)[..., : self.v_dim]
        else:
            out = _sdpa(q, k, v, ctx, self.scale)
        return out.transpose(1, 2)  # [B, T, H, v]

    def _attend_absorbed(self, q_nope, q_rope, cached: torch.Tensor, ctx) -> torch.Tensor:
        """cached [B, S, rank + rope] → [B, T, H, v]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)
        query = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, rank + rope]
        key = cached.unsqueeze(1)  # one shared "head" (MQA in latent space): [B, 1, S, rank + rope]
        value = key[..., : self.rank]
        if query.shape[1] == 1:
            # Decode: fold the H query heads into the query-length dim of the one latent head (the mask
            # [B, 1, 1, S] broadcasts over them). SDPA's GQA broadcasting over a single KV head would fall
            # back to the math kernel, which copies the cache H times (~40x slower on an H100).
            out = _sdpa(query, key, value, ctx, self.scale)  # [B, 1, H, rank] = [B, T, H, rank]
            return torch.einsum("bthc,hvc->bthv", out, w_uv)
        # Prefill: a stride-0 view of the latent per head keeps the fused kernels usable, without copies.
        heads = query.shape[2]
        key, value = key.expand(-1, heads, -1, -1), value.expand(-1, heads, -1, -1)
        out = _sdpa(query.transpose(1, 2), key, value, ctx, self.scale)  # [B, H, T, rank]
        return torch.einsum("bhtc,hvc->bthv", out, w_uv)
