"""DeepSeekMoE: shared experts + routed experts with sigmoid, bias-corrected, group-limited top-k routing.

Routing (V3 eq. 12-16): affinities s = sigmoid(x·e); the per-expert `e_score_correction_bias` b is added for
*selection only*; experts are grouped, a group's score is the sum of its top-2 biased scores and only the
best `topk_group` groups are eligible; the gate values are the *unbiased* s of the chosen experts,
normalized to sum to one, times `routed_scaling_factor`.

Load balancing is auxiliary-loss-free: `b` is not trained by gradient; during training every MoE layer
counts the tokens routed to each expert (`expert_load`), and the trainer calls `update_router_bias` after
each optimizer step (b_i += γ·sign(mean load - load_i)). The complementary sequence-wise balance loss is
optional (`seq_aux_loss_alpha`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .layers import SwiGLU


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.top_k = args.n_routed_experts, args.num_experts_per_tok
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.scoring, self.norm_topk = args.scoring_func, args.norm_topk_prob
        self.scaling = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.hidden_size))
        # A buffer (saved, never touched by the optimizer) and fp32 whatever the model dtype: see _apply.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Keep the correction bias in fp32 across .to(bf16): its updates (γ = 1e-3) would vanish in bf16.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if bias.is_meta or new.is_meta:
            self.e_score_correction_bias = new.float()
        else:
            self.e_score_correction_bias = bias.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] → (gate values [N, K] fp32, expert ids [N, K], affinities [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            N = x.shape[0]
            grouped = choice.view(N, self.n_group, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, ids)
        if self.norm_topk:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return gates * self.scaling, ids, scores


class RoutedExperts(nn.Module):
    """All routed experts as two stacked weights: gate_up_proj [E, 2I, d] and down_proj [E, d, I]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, d, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.n_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward_loop(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Reference path: one small GEMM pair per expert that received tokens. x [N, d] → [N, d]."""
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        order = flat_ids.argsort(stable=True)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start : start + count]
            start += count
            tokens = picks // ids.shape[1]
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, (y * gates.flatten()[picks, None]).to(out.dtype))
        return out

    def forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Fast path: sort token copies by expert, two grouped GEMMs (torch._grouped_mm), scatter back."""
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        tokens = order // ids.shape[1]
        # counts by scatter_add, not bincount: CUDA bincount syncs with the host, which breaks CUDA-graph capture
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[tokens]
        # .to(x.dtype): under autocast the fp32 master weights meet bf16 activations (grouped_mm is not autocast)
        h = torch._grouped_mm(xs, self.gate_up_proj.to(x.dtype).transpose(1, 2), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.to(x.dtype).transpose(1, 2), offs=offsets)
        y = y * gates.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def forward_dense(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, combined by a [N, E] gate matrix that is zero off each token's top-k.
        No host sync (forward_loop reads expert counts on the host), so CUDA graphs can capture it: the
        fp32 decode path, where grouped GEMMs (bf16 only) are unavailable. E/K times the FLOPs of the other
        paths, so only for few tokens (MoE.forward picks it by size). x [N, d] → [N, d]."""
        weight = torch.zeros(x.shape[0], self.n_experts, dtype=gates.dtype, device=x.device).scatter_(1, ids, gates)
        h = torch.einsum("nd,eid->nei", x, self.gate_up_proj)  # [N, E, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("nei,edi->ned", F.silu(gate) * up, self.down_proj)  # [N, E, d]
        return torch.einsum("ned,ne->nd", y, weight.to(y.dtype)).to(x.dtype)


# Token x expert count up to which CUDA runs the experts densely (forward_dense) when grouped GEMMs are
# unavailable: a decode step of up to 512 rows over 16 experts, or 128 rows over 64.
DENSE_DISPATCH_MAX = 8192


def grouped_mm_available(x: torch.Tensor) -> bool:
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return hasattr(torch, "_grouped_mm") and x.is_cuda and bf16


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.impl, self.top_k, self.alpha = args.moe_impl, args.num_experts_per_tok, args.seq_aux_loss_alpha
        self.gate = Router(args)
        self.experts = RoutedExperts(args)
        self.shared_experts = SwiGLU(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # Token counts stay fp32 across .to(bf16): bf16 holds integers exactly only up to 256.
        super()._apply(fn, recurse)
        if not self.expert_load.is_meta and self.expert_load.dtype != torch.float32:
            self.expert_load = self.expert_load.float()
        return self

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] → [B, T, d]. token_mask [B, T] (False = padding): padding is still computed (its output
        is discarded by the loss) but counted neither in expert_load nor in the balance loss."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        gates, ids, scores = self.gate(flat)
        use_grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_available(flat))
        if use_grouped and torch.is_autocast_enabled("cuda"):
            flat = flat.to(torch.get_autocast_dtype("cuda"))
        if use_grouped:
            routed = self.experts.forward_grouped(flat, ids, gates)
        elif self.impl == "auto" and flat.is_cuda and flat.shape[0] * self.experts.n_experts <= DENSE_DISPATCH_MAX:
            routed = self.experts.forward_dense(flat, ids, gates)
        else:
            routed = self.experts.forward_loop(flat, ids, gates)
        if self.training:
            real = None if token_mask is None else token_mask.reshape(-1, 1).expand_as(ids)
            with torch.no_grad():
                ones = torch.ones_like(ids, dtype=self.expert_load.dtype) if real is None else real.to(self.expert_load.dtype)
                self.expert_load.scatter_add_(0, ids.flatten(), ones.flatten())
            self.aux_loss = (self._sequence_balance_loss(scores.view(B, T, -1), token_mask) if self.alpha > 0
                             else None)
        return (routed + self.shared_experts(flat)).view(B, T, d)

    def _sequence_balance_loss(self, scores: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """α Σ_i f_i P_i per sequence (row), averaged over the batch (V3 eq. 17-20), over the row's real tokens.
        scores [B, T, E]; token_mask [B, T] or None (all real)."""
        B, T, E = scores.shape
        real = torch.ones(B, T, device=scores.device) if token_mask is None else token_mask.float()
        chosen = scores.topk(self.top_k, dim=-1).indices  # unbiased top-k, as in the paper's f_i
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, chosen.view(B, -1), real.repeat_interleave(self.top_k, dim=1)
        )
        n = real.sum(1, keepdim=True).clamp(min=1)
        f = counts * E / (self.top_k * n)
        p = ((scores / scores.sum(-1, keepdim=True)) * real[..., None]).sum(1) / n
        return self.alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_router_bias(self, gamma: float) -> None:
        """b_i += γ·sign(mean load − load_i) from the loads counted since the last call; then reset them."""
        load = self.expert_load
        if load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
