"""The one transformer: decoder blocks (GQA or MLA attention; dense or MoE MLP) and optional MTP modules.

Module names mirror Hugging Face checkpoint keys (model.layers.N.self_attn.q_proj.weight, ...), so the
state dict is the checkpoint up to two renames done in `hf_io`: routed experts are stacked, and MTP module i
lives at `mtp.i.*` here and `model.layers.{num_hidden_layers + i}.*` in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionContext, GQAttention, MLAttention, build_context
from .cache import KVCache
from .config import ModelArgs
from .layers import RMSNorm, RotaryEmbedding, SwiGLU
from .moe import MoE


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = (MLAttention if args.is_mla else GQAttention)(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.layer_is_moe(layer_idx) else SwiGLU(args.hidden_size, args.intermediate_size)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, ctx.token_mask) if isinstance(self.mlp, MoE) else self.mlp(x))


class MTPModule(Block):
    """Multi-token prediction module k (V3 §2.2): predicts token i+k+1 from the depth-(k-1) hidden state at i
    and the embedding of token i+k. Concatenation order [enorm(embedding); hnorm(hidden)] matches the
    released weights."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__(args, layer_idx)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: torch.Tensor, next_embeds: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h)], dim=-1))
        return super().forward(x, ctx)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """model(input_ids) → logits [B, T, V]; forward_hidden gives the pre-norm hidden states [B, T, d]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(args)
        first_mtp = args.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(args, first_mtp + i) for i in range(args.num_nextn_predict_layers))
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Share the head with the embedding when the config says so (again after to_empty/meta init)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, MoE):
                module.gate.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ forward
    def context(
        self,
        positions: torch.Tensor,
        *,
        cache: KVCache | None = None,
        slot_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> AttentionContext:
        cos, sin = self.rotary(positions)
        return build_context(cos, sin, positions, cache=cache, slot_ids=slot_ids, doc_ids=doc_ids, kv_len=kv_len)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        slot_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] → last-layer hidden states [B, T, d] before the final norm.

        positions [B, T]: defaults to 0..T-1 per row (restart them per document when packing with doc_ids).
        cache/slot_ids/kv_len: write this step's keys into the cache and attend over it (rollout engine).
        doc_ids [B, T]: packed training; tokens attend only within their own document.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = self.context(positions, cache=cache, slot_ids=slot_ids, doc_ids=doc_ids, kv_len=kv_len)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [..., d] → logits [..., V] (final norm + head)."""
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids, positions, **kwargs))

    # ------------------------------------------------------------------ MoE utilities
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the sequence-wise balance losses of the last training forward (None if disabled)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def update_router_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing step for every MoE layer (call after the optimizer step)."""
        for m in self.moe_layers():
            m.update_router_bias(gamma)

    def expert_load_balance(self) -> float | None:
        """max/mean routed-token count over experts, averaged over MoE layers (1.0 is perfect balance)."""
        ratios = [(m.expert_load.max() / m.expert_load.mean()).item() for m in self.moe_layers() if m.expert_load.sum() > 0]
        return sum(ratios) / len(ratios) if ratios else None

    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters; with active=True, those one token uses (K of E routed experts)."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if active and self.args.is_moe:
            a = self.args
            per_expert = 3 * a.hidden_size * a.moe_intermediate_size
            idle = a.n_routed_experts - a.num_experts_per_tok
            total -= len(self.moe_layers()) * idle * per_expert
        return total

    def make_cache(self, num_slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.args, num_slots, max_len, dtype or p.dtype, p.device)
