"""KV caches shared by the model's forward and the rollout engine: slotted (KVCache) and paged (PagedKVCache).

The cache has `num_slots` rows of `max_len` positions per layer. A sequence owns one slot for its lifetime;
position p of the sequence lives at row[slot, p]. Because a query at position p only ever reads keys at
positions <= p, stale entries past a sequence's end are harmless, which is what lets the engine reuse a
freed slot without clearing it and run right-padded prefills.

Layout per layer:
- dense GQA: one tensor [2, num_slots, max_len, n_kv_heads, head_dim] (keys, values);
- MLA: one tensor [num_slots, max_len, kv_lora_rank + qk_rope_head_dim]: the normalized latent c_KV and the
  rotated shared rope key, i.e. only what absorbed attention needs (V3 paper: 576 values/token/layer).

Both expose the interface the model's attention uses, `write(layer, slot_ids, positions, new)` and
`read(layer, slot_ids, batch, kv_len)` (a "slot" is a decode row), plus `flat_index(positions)` for the fused
decode path.
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

    def flat_index(self, positions: torch.Tensor) -> torch.Tensor:
        """[B] int64: where (slot b, positions[b]) lives along a layer's flattened slot × position axis."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        return rows * self.max_len + positions

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy positions [:length] of slots `src` into slots `dst` (disjoint), in every layer."""
        for layer in self.layers:
            if self.is_mla:
                layer[dst, :length] = layer[src, :length]
            else:
                layer[:, dst, :length] = layer[:, src, :length]


class PagedKVCache:
    """A pool of fixed-size blocks per layer, and a block table per decode row.

    Layout per layer: dense GQA [2, num_blocks + 1, block_size, n_kv_heads, head_dim], MLA
    [num_blocks + 1, block_size, kv_lora_rank + qk_rope_head_dim]. `block_tables` [num_rows, max_blocks_per_seq]
    int32 (on the device) maps row b's logical block j (positions j*block_size ...) to a physical block, so
    position p of row b lives at block_tables[b, p // block_size] * block_size + p % block_size.

    Physical block `num_blocks` is a scratch block that no sequence owns: every table entry that is not
    mapped (rows without a sequence, blocks a sequence has not reached yet) points there. Idle decode rows and
    prefill padding write their throwaway K/V into it instead of into a block another row owns.

    Memory is (num_blocks + 1) × block_size positions, independent of num_rows × max_len; which blocks a row
    holds (allocation, sharing, freeing) is the rollout engine's business (rollout/blocks.py), this class
    only stores and gathers. The tables are one persistent buffer updated in place, so captured CUDA graphs
    that read it stay valid.
    """

    def __init__(self, args: ModelArgs, num_rows: int, num_blocks: int, block_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_slots, self.num_blocks, self.block_size, self.max_len = num_rows, num_blocks, block_size, max_len
        self.is_mla = args.is_mla
        self.scratch_block = num_blocks
        self.max_blocks_per_seq = -(-max_len // block_size)
        if args.is_mla:
            shape = (num_blocks + 1, block_size, args.kv_lora_rank + args.qk_rope_head_dim)
        else:
            shape = (2, num_blocks + 1, block_size, args.num_key_value_heads, args.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.block_tables = torch.full((num_rows, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32,
                                       device=device)

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        return block_size * KVCache.bytes_per_token(args, dtype)

    def _flat(self, layer: int) -> torch.Tensor:
        """A layer viewed with one position axis: [2, blocks * block_size, Hkv, D] or [blocks * block_size, C]."""
        cache = self.layers[layer]
        return cache.flatten(0, 1) if self.is_mla else cache.flatten(1, 2)

    def _index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """rows [B, 1] or [B], positions [B, T] or [B] → flat position indices (same shape as positions)."""
        blocks = self.block_tables[rows, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def write(self, layer: int, slot_ids: torch.Tensor | None, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Store `new` ([B, T, ...] for MLA, [2, B, T, ...] for GQA) at (row, position) for every token."""
        rows = torch.arange(positions.shape[0], device=positions.device) if slot_ids is None else slot_ids
        index = self._index(rows[:, None], positions)
        flat = self._flat(layer)
        if self.is_mla:
            flat[index] = new.to(flat.dtype)
        else:
            flat[0][index] = new[0].to(flat.dtype)
            flat[1][index] = new[1].to(flat.dtype)

    def read(self, layer: int, slot_ids: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
        """The first kv_len positions of the given rows, gathered into a dense tensor laid out like
        KVCache.read's: [B, kv_len, C] (MLA) or [2, B, kv_len, Hkv, D]."""
        n = -(-kv_len // self.block_size)
        tables = self.block_tables[:batch, :n] if slot_ids is None else self.block_tables[slot_ids, :n]
        cache = self.layers[layer]
        if self.is_mla:
            return cache[tables.long()].flatten(1, 2)[:, :kv_len]  # [B, n, bs, C] → [B, kv_len, C]
        return cache[:, tables.long()].flatten(2, 3)[:, :, :kv_len]

    def flat_index(self, positions: torch.Tensor) -> torch.Tensor:
        """[B] int64: where (row b, positions[b]) lives along a layer's flattened block × position axis."""
        return self._index(torch.arange(positions.shape[0], device=positions.device), positions)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy physical blocks `src` into blocks `dst` (disjoint), in every layer (copy-on-write)."""
        for layer in self.layers:
            if self.is_mla:
                layer[dst] = layer[src]
            else:
                layer[:, dst] = layer[:, src]

    def set_rows(self, rows: list[int], blocks: list[list[int]]) -> None:
        """Map the first len(blocks[i]) logical blocks of row rows[i] to blocks[i] (later entries untouched)."""
        width = max(len(b) for b in blocks)
        table = torch.full((len(rows), width), self.scratch_block, dtype=torch.int32)
        for i, row_blocks in enumerate(blocks):
            table[i, : len(row_blocks)] = torch.tensor(row_blocks, dtype=torch.int32)
        self.block_tables[_upload(torch.tensor(rows), self.block_tables.device), :width] = _upload(
            table, self.block_tables.device)

    def set_entries(self, rows: list[int], logical: list[int], physical: list[int]) -> None:
        """block_tables[rows[i], logical[i]] = physical[i] (one indexed write for a step's new blocks)."""
        device = self.block_tables.device
        self.block_tables[_upload(torch.tensor(rows), device), _upload(torch.tensor(logical), device)] = _upload(
            torch.tensor(physical, dtype=torch.int32), device)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Give rows `dst` the tables of rows `src` (no K/V moves); `src` rows are unmapped."""
        self.block_tables[dst] = self.block_tables[src]
        self.block_tables[src] = self.scratch_block

    def clear_row(self, row: int) -> None:
        """Unmap every block of `row` (its sequence finished or was preempted)."""
        self.block_tables[row] = self.scratch_block


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without a host sync (pinned staging + async copy on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
