"""Per-token log-probabilities (and entropies) of given targets without materializing [B, T, V] logits.

For a 152k vocabulary, fp32 logits of 8 × 4096 tokens are 20 GB, and autograd would keep them (plus the
softmax) for the backward. Here the trunk runs once, then the head runs over chunks of `chunk_size`
tokens; each chunk goes through `torch.utils.checkpoint`, so autograd stores only the chunk's hidden
states and recomputes its logits during the backward. Peak extra memory: one chunk of logits, forward
or backward.

fused_head=True (the default on CUDA, module default FUSED_HEAD) swaps the chunk loop for
`fused_head.fused_head_logprobs`: bf16 logits read by one Triton kernel per chunk (no fp32 copy), the logits'
gradient written during the forward (no recomputed softmax, no softmax backward), within a memory budget (see
that module). Measured on an H200 (Qwen2.5-0.5B head, 16k tokens, forward + backward): 140 ms and 21.2 GiB
of extra memory → 35 ms and 1.6 GiB; a whole training step +22% tokens/s. On CPU the default keeps the
plain path below (the fused twin there is only a reference).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from r1lab.train.fused_head import fused_head_logprobs

FUSED_HEAD: bool | None = None
"""Default of logprobs_from_hidden / token_logprobs' fused_head argument (SFT and GRPO use the default):
None = fused on CUDA, plain elsewhere."""


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [...] (fp32) of the softmax over the last dim of logits [..., V]: logsumexp(z) - Σ p·z."""
    z = logits.float()
    logz = torch.logsumexp(z, dim=-1)
    return logz - (torch.softmax(z, dim=-1) * z).sum(-1)


def _head_chunk(model, norm, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """hidden [c, d] pre-norm, targets [c] (negative = ignore) → logp [c] fp32 (and entropy [c])."""
    z = model.lm_head(norm(hidden)).float()
    if temperature != 1.0:
        z = z / temperature
    logz = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) - logz
    logp = torch.where(targets >= 0, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp
    return logp, logz - (torch.softmax(z, dim=-1) * z).sum(-1)


def logprobs_from_hidden(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    mask: torch.Tensor | None = None,
    fused_head: bool | None = None,
    norm: torch.nn.Module | None = None,
):
    """hidden [B, T, d] (pre-norm, from `model.forward_hidden`), targets [B, T] → logp [B, T] fp32.

    logp[b, t] = log softmax(lm_head(norm(hidden[b, t])) / temperature)[targets[b, t]]; targets < 0 give
    0 (use them for positions without a next token). With with_entropy=True also returns the entropy
    [B, T] of the same distribution (differentiable, e.g. for an entropy bonus).
    mask [B, T] (optional): compute the head only where True (e.g. the loss mask, skipping prompt tokens,
    often a third of the head's work in RL); other positions return 0.
    fused_head: use the fused head (None = the module default FUSED_HEAD); same values and gradients up to
    rounding.
    norm: the norm applied before the shared head (None = the model's final norm; an MTP module passes its
    own `shared_head.norm`).
    """
    B, T, d = hidden.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's first two dims {(B, T)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_h, flat_t = hidden.reshape(B * T, d), targets.reshape(B * T)
    rows = None
    if mask is not None:
        rows = mask.reshape(B * T).nonzero().squeeze(1)
        flat_h, flat_t = flat_h.index_select(0, rows), flat_t.index_select(0, rows)
    norm = model.model.norm if norm is None else norm
    if fused_head is None:
        fused_head = hidden.is_cuda if FUSED_HEAD is None else FUSED_HEAD
    if fused_head:
        if model.lm_head.bias is not None:
            raise ValueError("fused_head supports a head without bias only")
        out = fused_head_logprobs(flat_h, model.lm_head.weight, flat_t, norm=norm,
                                  temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size)
        outs = [out if with_entropy else (out,)]
    else:
        head_params = [*model.lm_head.parameters(), *norm.parameters()]
        grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head_params))
        n = flat_t.numel()
        outs = []
        for start in range(0, n, chunk_size):
            end = start + chunk_size
            args = (model, norm, flat_h[start:end], flat_t[start:end], temperature, with_entropy)
            # Checkpointing keeps the chunk's [c, V] logits out of the autograd graph; the backward recomputes
            # them chunk by chunk. No-grad calls (old/ref log-probs) skip the wrapper.
            outs.append(checkpoint(_head_chunk, *args, use_reentrant=False) if grad else _head_chunk(*args))
        outs = [(o,) if not with_entropy else o for o in outs]
    results = []
    for k in range(2 if with_entropy else 1):
        vals = torch.cat([o[k] for o in outs]) if outs else hidden.new_zeros(0, dtype=torch.float32)
        if rows is not None:  # back to every position; index_copy is differentiable w.r.t. vals
            vals = vals.new_zeros(B * T).index_copy(0, rows, vals)
        results.append(vals.view(B, T))
    return tuple(results) if with_entropy else results[0]


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    mask: torch.Tensor | None = None,
    fused_head: bool | None = None,
):
    """input_ids [B, T], targets [B, T] → logp [B, T] fp32 (and entropy [B, T] if with_entropy).

    Usually targets[:, t] = input_ids[:, t + 1] (see batching.PackedBatch.targets). positions / doc_ids
    are passed to the model for packed rows (block-causal attention, positions restarting per document).
    temperature divides the logits, so the result is the log-prob under the distribution the rollout
    sampled from; use the same temperature for old, reference and current log-probs.
    mask [B, T]: compute only these positions (see logprobs_from_hidden). fused_head: see there.
    """
    hidden = model.forward_hidden(input_ids, positions, doc_ids=doc_ids)
    return logprobs_from_hidden(
        model, hidden, targets, chunk_size=chunk_size, temperature=temperature, with_entropy=with_entropy, mask=mask,
        fused_head=fused_head,
    )


def mtp_loss_sums(
    model,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-token prediction loss (V3 eq. 24-25) as (sum, count), both 0-dim: loss = sum / count.

    Depth k (module k of model.mtp) predicts token i+k+1 from the depth-(k-1) state at i and the embedding
    of token i+k. Each depth's cross-entropy is averaged over its counted predictions, then the depths are
    averaged; count is the number of depth-1 predictions counted, so Σ sum / Σ count over micro-batches
    weights them by their counted tokens. The head runs through `logprobs_from_hidden` (chunked, or the
    fused head on CUDA), never as full [B, T, V] logits.

    hidden [B, T, d] pre-norm main-model states; input_ids [B, T]. For packed rows pass positions and
    doc_ids [B, T] (see batching.PackedBatch; the MTP blocks then attend only within their document and a
    prediction counts only inside one document). loss_mask [B, T] bool, shifted like PackedBatch.loss_mask:
    loss_mask[b, j] says whether predicting token j+1 counts (None = every token counts).
    """
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    embeds = model.model.embed_tokens(input_ids)
    h, sums, counts = hidden, [], []
    for k, module in enumerate(model.mtp, start=1):
        n = T - k  # positions i that have a token i+k to embed
        if n < 2:
            break
        h = module(h[:, :n], embeds[:, k : k + n], model.context(positions[:, :n],
                                                                 doc_ids=None if doc_ids is None else doc_ids[:, :n]))
        # position i (< n - 1) predicts token i+k+1
        counted = torch.ones(B, n - 1, dtype=torch.bool, device=input_ids.device)
        if loss_mask is not None:
            counted = counted & loss_mask[:, k : k + n - 1]
        if doc_ids is not None:
            counted = counted & (doc_ids[:, : n - 1] == doc_ids[:, k + 1 :]) & (doc_ids[:, : n - 1] >= 0)
        # Every position goes through the head (no mask=): under FSDP each rank must touch the same
        # parameters, and a rank whose batch counts nothing at this depth would otherwise skip the norm.
        logp = logprobs_from_hidden(model, h[:, :-1], input_ids[:, k + 1 :], chunk_size=chunk_size,
                                    norm=module.shared_head.norm)
        sums.append(-(logp * counted).sum())
        counts.append(counted.sum().to(logp.dtype))
    if not sums:
        zero = hidden.new_zeros((), dtype=torch.float32)
        return zero, zero
    per_depth = torch.stack(sums) / torch.stack(counts).clamp(min=1)
    return per_depth.mean() * counts[0], counts[0]
