"""Decode attention over the slotted or paged KV cache that reads only each row's valid positions.

The fused decode step (fast_decode.py) used to run SDPA over `cache[:, :B, :kv_len]`, where kv_len is the
CUDA-graph bucket (rounded up to 128 positions, or 1/8 of a power of two past 2048), with a boolean mask: every
row pays for the whole bucket. This kernel instead takes the per-row lengths as a device tensor (positions + 1,
so it stays inside a captured graph: nothing about the launch depends on their values) and stops each row at
its own length.

Work split (split-K, "flash-decoding"): a program owns (row, KV head, chunk of positions) and computes all
G = H / Hkv query heads that share that KV head together, so each K/V tile is loaded once for the G heads
(the G heads are padded to 16 rows so the two products run on tensor cores). Programs whose chunk lies past
the row's length return after storing an empty partial. A second kernel merges the chunks of each (row, head):
running max, sum of exponentials and unnormalized output per chunk, rescaled to the common max.
The grid is (B, Hkv, n_chunks), with n_chunks chosen from (B, kv_len) only, so one graph per bucket as before.

Paged cache (model/cache.PagedKVCache, layer [2, blocks, block_size, Hkv, D]): a program's positions are
looked up in the row's block table, tile by tile (position n → block_tables[row, n // block_size] ×
block_size + n % block_size); the table is read from the device like the lengths, so a captured graph stays
valid while the engine remaps blocks between steps.

Numerics: scores and the softmax in fp32 (exp2 with log2(e) folded into the scale), probabilities rounded to
the cache dtype before P·V (as flash-attention kernels do), fp32 accumulation, output in q's dtype. fp32
caches use IEEE fp32 products (no TF32), so fp32 models keep fp32 accuracy.

`decode_attention_torch` is the plain-torch twin (same chunked math, used on CPU and as the reference);
`decode_attention_reference` is the obvious masked softmax, for tests.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_N = 64
"""Cache positions per inner tile."""
MIN_CHUNK = 128
"""Fewest positions a split-K program handles (fewer makes the merge cost more than it saves)."""
PROGRAMS_PER_SM = 8
"""Split the kv range until the grid has about this many programs per streaming multiprocessor."""
_LOG2E = 1.4426950408889634


def num_chunks(batch: int, n_kv: int, kv_len: int, sm_count: int) -> tuple[int, int]:
    """(chunk, n_chunks): positions per program (a multiple of BLOCK_N) and programs per (row, KV head)."""
    most = max(1, -(-kv_len // MIN_CHUNK))
    wanted = max(1, -(-PROGRAMS_PER_SM * sm_count // (batch * n_kv)))
    per_program = -(-kv_len // min(most, wanted))
    chunk = -(-per_program // BLOCK_N) * BLOCK_N
    return chunk, -(-kv_len // chunk)


def decode_attention_reference(q, cache_layer, lengths, scale):
    """Masked softmax attention, fp32: q [B, H, D], cache_layer [2, slots, len, Hkv, D], lengths [B] → [B, H, D]."""
    B, H = q.shape[:2]
    S = int(lengths.max())
    k = cache_layer[0, :B, :S].float().transpose(1, 2)  # [B, Hkv, S, D]
    v = cache_layer[1, :B, :S].float().transpose(1, 2)
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None].to(q.device)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v).to(q.dtype)


def decode_attention_torch(q, cache_layer, lengths, kv_len: int, scale: float, n_chunks: int = 1):
    """The kernel's math in torch: split-K partials over `n_chunks` chunks of [0, kv_len), then the merge."""
    B, H, D = q.shape
    n_kv = cache_layer.shape[3]
    G = H // n_kv
    chunk = -(-kv_len // n_chunks)
    width = chunk * n_chunks
    k = cache_layer[0, :B, :kv_len]  # [B, S, Hkv, D]
    v = cache_layer[1, :B, :kv_len]
    qg = q.view(B, n_kv, G, D).to(k.dtype)
    scores = torch.einsum("bkgd,bskd->bkgs", qg.float(), k.float()) * (scale * _LOG2E)  # log2 domain
    valid = torch.arange(kv_len, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    scores = torch.nn.functional.pad(scores, (0, width - kv_len), value=float("-inf"))
    scores = scores.view(B, n_kv, G, n_chunks, chunk)
    part_max = scores.amax(-1)  # [B, Hkv, G, C]; -inf for an empty chunk
    safe = torch.where(torch.isfinite(part_max), part_max, torch.zeros_like(part_max))
    p = torch.exp2(scores - safe[..., None])
    part_sum = p.sum(-1)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, width - kv_len)).view(B, n_chunks, chunk, n_kv, D)
    part_acc = torch.einsum("bkgcs,bcskd->bkgcd", p.to(v.dtype).float(), vp.float())
    top = part_max.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp2(part_max - top)
    out = (part_acc * w[..., None]).sum(-2) / (part_sum * w).sum(-1)[..., None]
    return out.reshape(B, H, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, cache_ptr, len_ptr, table_ptr, acc_ptr, max_ptr, sum_ptr, kv_plane, slot_stride,
                        pos_stride, table_stride, chunk, n_heads, n_chunks, qk_scale,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PAGE: tl.constexpr):
        # PAGE = 0: slotted cache, row b's positions at slot b (slot_stride apart); PAGE > 0: block size of a
        # paged cache, whose blocks are slot_stride apart and found through the row's block table
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(len_ptr + row).to(tl.int32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_in, d_in = g < G, d < D
        heads = kv_head * G + g
        q = tl.load(q_ptr + (row * n_heads + heads)[:, None] * D + d[None, :], mask=g_in[:, None] & d_in[None, :],
                    other=0.0)
        q = q.to(cache_ptr.dtype.element_ty)
        run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if PAGE:
            base = cache_ptr + kv_head * D
        else:
            base = cache_ptr + row.to(tl.int64) * slot_stride + kv_head * D
        for first in range(start, end, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            n_in = n < end
            if PAGE:
                block = tl.load(table_ptr + row * table_stride + n // PAGE, mask=n_in, other=0).to(tl.int64)
                offsets = (block * slot_stride + (n % PAGE) * pos_stride)[:, None] + d[None, :]
            else:
                offsets = n.to(tl.int64)[:, None] * pos_stride + d[None, :]
            tile_mask = n_in[:, None] & d_in[None, :]
            k = tl.load(base + offsets, mask=tile_mask, other=0.0)
            v = tl.load(base + kv_plane + offsets, mask=tile_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_in[None, :], s * qk_scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, 1))
            alpha = tl.exp2(run_max - new_max)
            p = tl.exp2(s - new_max[:, None])
            run_sum = run_sum * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            run_max = new_max
        part = (row * n_heads + heads) * n_chunks + split  # [BLOCK_G]
        tl.store(max_ptr + part, run_max, mask=g_in)
        tl.store(sum_ptr + part, run_sum, mask=g_in)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_in[:, None] & d_in[None, :])

    @triton.jit
    def _merge_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, n_chunks, D: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)  # row * n_heads + head
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        c_in, d_in = c < n_chunks, d < D
        part_max = tl.load(max_ptr + pid * n_chunks + c, mask=c_in, other=float("-inf"))
        part_sum = tl.load(sum_ptr + pid * n_chunks + c, mask=c_in, other=0.0)
        top = tl.max(part_max, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(part_max - top)  # 0 for empty chunks
        acc = tl.load(acc_ptr + (pid * n_chunks + c)[:, None] * D + d[None, :], mask=c_in[:, None] & d_in[None, :],
                      other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(part_sum * w, 0)
        tl.store(out_ptr + pid * D + d, out.to(out_ptr.dtype.element_ty), mask=d_in)


_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the Triton interpreter (tests)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


class Workspace:
    """Split-K partials of one decode step, shared by its layers (allocated once per step, so inside a
    captured graph they live in the graph's memory pool)."""

    def __init__(self, batch: int, n_heads: int, n_kv: int, head_dim: int, kv_len: int, device: torch.device):
        self.chunk, self.n_chunks = num_chunks(batch, n_kv, kv_len, _sm_count(device))
        rows = batch * n_heads * self.n_chunks
        self.acc = torch.empty(rows, head_dim, dtype=torch.float32, device=device)
        self.max = torch.empty(rows, dtype=torch.float32, device=device)
        self.sum = torch.empty(rows, dtype=torch.float32, device=device)


def decode_attention_triton(q, cache_layer, lengths, scale: float, work: Workspace,
                            block_tables: torch.Tensor | None = None):
    """q [B, H, D] (contiguous), cache_layer [2, slots, len, Hkv, D] (last dim contiguous), lengths [B] int
    (each <= the kv_len `work` was built for, >= 1) → out [B, H, D] in q's dtype.
    With block_tables [rows >= B, max_blocks] int32: cache_layer is a paged layer [2, blocks, block_size, Hkv, D]
    and row b's position p is at block block_tables[b, p // block_size]."""
    B, H, D = q.shape
    n_kv = cache_layer.shape[3]
    if H % n_kv or cache_layer.stride(4) != 1 or cache_layer.stride(3) != D or not q.is_contiguous():
        raise ValueError("decode_attention_triton: unsupported layout")
    G = H // n_kv
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(D))
    paged = block_tables is not None
    _partial_kernel[(B, n_kv, work.n_chunks)](
        q, cache_layer, lengths, block_tables if paged else lengths, work.acc, work.max, work.sum,
        cache_layer.stride(0), cache_layer.stride(1), cache_layer.stride(2), block_tables.stride(0) if paged else 0,
        work.chunk, H, work.n_chunks, scale * _LOG2E,
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        IEEE=cache_layer.dtype == torch.float32, PAGE=cache_layer.shape[2] if paged else 0, num_warps=4, num_stages=2)
    _merge_kernel[(B * H,)](work.acc, work.max, work.sum, out, work.n_chunks, D=D,
                            BLOCK_C=max(2, triton.next_power_of_2(work.n_chunks)), BLOCK_D=block_d, num_warps=1)
    return out


__all__ = ["Workspace", "decode_attention_reference", "decode_attention_torch", "decode_attention_triton",
           "num_chunks", "triton"]