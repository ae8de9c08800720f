"""Slotted KV cache shared by the model's forward and the rollout engine.

The cache has `num_slots` rows of `max_len` positions per layer. A sequence owns one slot for its lifetime;
position p of the sequence lives at row[slot, p]. Because a query at position p only ever reads keys at
positions <= p, stale entries past a sequence's end are harmless, which is what lets the engine reuse a
freed slot without clearing it and run right-padded prefills.

Layout per layer:
- dense GQA: one tensor [2, num_slots, max_len, n_kv_heads, head_dim] (keys, values);
- MLA: one tensor [num_slots, max_len, kv_lora_rank + qk_rope_head_dim]: the normalized latent c_KV and the
  rotated shared rope key, i.e. only what absorbed attention needs (V3 paper: 576 values/token/layer).
"""

from __future__ import annotations

import torch

from .config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.num_slots, self.max_len, self.is_mla = num_slots, max_len, args.is_mla
        if args.is_mla:
            shape = (num_slots, max_len, args.kv_lora_rank + args.qk_rope_head_dim)
        else:
            shape = (2, num_slots, max_len, args.num_key_value_heads, args.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        """Bytes one cached position costs across all layers."""
        per_layer = (
            args.kv_lora_rank + args.qk_rope_head_dim if args.is_mla else 2 * args.num_key_value_heads * args.head_dim
        )
        return per_layer * args.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, args: ModelArgs, num_slots: int, budget_bytes: int, dtype: torch.dtype, device) -> "KVCache":
        """The longest max_len that fits `num_slots` sequences in `budget_bytes`."""
        max_len = budget_bytes // (num_slots * cls.bytes_per_token(args, dtype))
        if max_len < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes cannot hold {num_slots} slots")
        return cls(args, num_slots, int(max_len), dtype, device)

    def _rows(self, slot_ids: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        return torch.arange(batch, device=device) if slot_ids is None else slot_ids

    def write(self, layer: int, slot_ids: torch.Tensor | None, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Store `new` ([B, T, ...] for MLA, [2, B, T, ...] for GQA) at (slot, position) for every token."""
        cache = self.layers[layer]
        batch = positions.shape[0]
        rows = self._rows(slot_ids, batch, positions.device)[:, None]
        if self.is_mla:
            cache[rows, positions] = new.to(cache.dtype)
        else:
            cache[0][rows, positions] = new[0].to(cache.dtype)
            cache[1][rows, positions] = new[1].to(cache.dtype)

    def read(self, layer: int, slot_ids: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
        """The first kv_len positions of the given slots (a view when slot_ids is None)."""
        cache = self.layers[layer]
        if self.is_mla:
            return cache[:batch, :kv_len] if slot_ids is None else cache[slot_ids, :kv_len]
        return cache[:, :batch, :kv_len] if slot_ids is None else cache[:, slot_ids, :kv_len]
