"""A decode step for dense GQA models (Llama / Qwen2 / Mistral) with fused elementwise kernels.

Measured on an H100 (Qwen2.5-0.5B shape, batch 256): the model's generic forward launches ~50 kernels per
layer for one decode token (fp32 RMSNorm in 8 ops, RoPE in ~10 per tensor, cache writes, adds), so even
inside a CUDA graph a step took 4.5 ms while its GEMMs and attention need ~1.7 ms. This path runs the same
math with ~10 kernels per layer: fused residual-add + RMSNorm, fused RoPE + K/V cache write, fused
SiLU·up, the GEMMs and the attention over the cache. Numerics follow the model's op by op (bf16 rounding
at the same points).

Two further options, both on by default on CUDA and switchable per FastDecoder / Engine (or globally with
the module flags FUSED_PROJ and DECODE_ATTENTION below), so a benchmark can A/B them:

- fused_proj: one GEMM for q|k|v (with the concatenated bias, Qwen2) and one for gate|up per layer instead
  of five small ones. The trainer updates the model's parameters in place between rollouts (colocated
  GRPO), so the fused weights cannot be views the model does not know about, and the trainer must not have
  to remember a sync call. Choice: persistent fused copies (FusedWeights) that the engine refreshes itself:
  (1) unconditionally whenever a batch starts on an idle engine (every generate() call, and the first
  request after an idle period): one copy of the q/k/v/gate/up weights, ~0.94 GB of traffic for the 0.5B
  shape, ~0.3 ms at 3 TB/s, against seconds of generation; this also catches writes that bypass version
  counters (`param.data.copy_`); and (2) before every decode step, if the sum of the source parameters'
  version counters moved (an in-place update while requests are running; ~15 µs of Python per step for a
  24-layer model, hidden behind the GPU by the lookahead). Not chosen: making the model's parameters views
  of one fused storage (no copy at all), because `.to()`, `load_state_dict(assign=True)` or a checkpoint
  writer refusing shared storage would silently break or undo the aliasing. Cost: extra memory for one copy
  of those weights (~0.47 GB at 0.5B, ~1.7 GB at 1.5B, bf16). The fused GEMM computes every output with the
  same fp32 accumulation over the same inputs as the separate ones; cuBLAS may pick another algorithm for the
  wider matrix, so results can differ in the last bf16 bit (on CPU fp32 the tests see identical tokens).
- decode_attention: attention that reads only each row's valid positions (decode_attention.py, a split-K
  Triton kernel taking the lengths from the device) instead of SDPA over the kv_len bucket with a mask.

Both caches work: slotted (KVCache) and paged (PagedKVCache). The cache-write kernel takes, per row, the flat
index of its position along the layer's position axis (`cache.flat_index`: slot × max_len + p, or
block_tables[b, p // bs] × bs + p % bs), computed once per step for all layers; the attention kernel reads
paged K/V through the block table. The torch paths read the paged cache through `cache.read` (a gather).

Each fused op has a plain-torch twin used on CPU, so the structure is tested for parity without a GPU; the
Triton kernels are checked against the twins by the GPU tests (and the decode-attention kernel also by
Triton's interpreter on CPU).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from r1lab.model.attention import GQAttention
from r1lab.model.cache import PagedKVCache
from r1lab.model.layers import SwiGLU

from . import decode_attention as _da

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FUSED_PROJ = True
"""Default of FastDecoder(fused_proj=None): fused q|k|v and gate|up GEMMs (CPU and CUDA)."""
DECODE_ATTENTION = True
"""Default of FastDecoder(decode_attention=None): the valid-length Triton attention when Triton runs (CUDA)."""


def supported(model) -> bool:
    """Dense GQA blocks with SwiGLU MLPs and half-split RoPE (what this path implements)."""
    a = model.args
    return (not a.is_mla and not a.is_moe and
            all(isinstance(b.self_attn, GQAttention) and isinstance(b.mlp, SwiGLU) for b in model.model.layers))


# ----------------------------------------------------------------------------- torch twins (CPU, reference)
def add_rmsnorm_torch(delta, residual, weight, eps):
    """(normed, new residual): residual + delta rounded to the model dtype, then the model's RMSNorm."""
    h = residual if delta is None else residual + delta
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype), h


def rope_cache_torch(q, k, v, cos, sin, cache_layer, destinations, n_heads, n_kv, head_dim):
    """Rotate q [B, H*D] and k [B, Hkv*D] (half-split RoPE, fp32 math), write k and v of row b at flat position
    destinations[b] of cache_layer ([2, slots, len, Hkv, D] or [2, blocks, block_size, Hkv, D], contiguous);
    returns the rotated q [B, H, D]."""
    B = q.shape[0]

    def rotate(x, heads):
        x = x.view(B, heads, head_dim)
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    flat = cache_layer.view(2, -1, n_kv, head_dim)
    flat[0][destinations] = rotate(k, n_kv).to(cache_layer.dtype)
    flat[1][destinations] = v.view(B, n_kv, head_dim).to(cache_layer.dtype)
    return rotate(q, n_heads)


def silu_mul_torch(gate, up):
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(delta_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, dim, eps,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        h = tl.load(residual_ptr + row * dim + cols, mask=inside, other=0.0)
        if HAS_DELTA:
            h = (h.to(tl.float32) + tl.load(delta_ptr + row * dim + cols, mask=inside, other=0.0).to(tl.float32))
            h = h.to(new_residual_ptr.dtype.element_ty)
            tl.store(new_residual_ptr + row * dim + cols, h, mask=inside)
        x = h.to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
        normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)  # the model rounds before the weight
        w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, dest_ptr,
                           n_heads, n_kv, kv_plane, q_stride, k_stride, v_stride, HALF: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, HALF)
        c = tl.load(cos_ptr + row * HALF + d)
        s = tl.load(sin_ptr + row * HALF + d)
        if head < n_heads:
            src = q_ptr + row * q_stride + head * 2 * HALF
            x1 = tl.load(src + d).to(tl.float32)
            x2 = tl.load(src + HALF + d).to(tl.float32)
            dst = q_out_ptr + (row * n_heads + head) * 2 * HALF
            tl.store(dst + d, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty))
            tl.store(dst + HALF + d, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty))
        else:
            kv_head = head - n_heads
            dest = tl.load(dest_ptr + row).to(tl.int64)
            # cache_layer.view(2, -1, Hkv, D)[0 or 1, dest, kv_head, :]; kv_plane = its second dim * Hkv * D
            offset = (dest * n_kv + kv_head) * 2 * HALF
            src = k_ptr + row * k_stride + kv_head * 2 * HALF
            x1 = tl.load(src + d).to(tl.float32)
            x2 = tl.load(src + HALF + d).to(tl.float32)
            # round to the activation dtype first (the model rotates in its dtype, then the cache casts)
            r1 = (x1 * c - x2 * s).to(k_ptr.dtype.element_ty)
            r2 = (x2 * c + x1 * s).to(k_ptr.dtype.element_ty)
            tl.store(cache_ptr + offset + d, r1.to(cache_ptr.dtype.element_ty))
            tl.store(cache_ptr + offset + HALF + d, r2.to(cache_ptr.dtype.element_ty))
            vsrc = v_ptr + row * v_stride + kv_head * 2 * HALF
            tl.store(cache_ptr + kv_plane + offset + d, tl.load(vsrc + d).to(cache_ptr.dtype.element_ty))
            tl.store(cache_ptr + kv_plane + offset + HALF + d,
                     tl.load(vsrc + HALF + d).to(cache_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, in_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        g = tl.load(gate_ptr + row * in_stride + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * in_stride + cols, mask=inside, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(out_ptr + row * n_cols + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=inside)

def add_rmsnorm_triton(delta, residual, weight, eps):
    B, dim = residual.shape
    out = torch.empty_like(residual)
    new_residual = residual if delta is None else torch.empty_like(residual)
    _add_rmsnorm_kernel[(B,)](delta if delta is not None else residual, residual, weight, out, new_residual, dim,
                              eps, HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(dim), num_warps=4)
    return out, new_residual


def rope_cache_triton(q, k, v, cos, sin, cache_layer, destinations, n_heads, n_kv, head_dim):
    B = q.shape[0]
    q_out = torch.empty(B, n_heads, head_dim, dtype=q.dtype, device=q.device)
    assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and cache_layer.is_contiguous()
    _rope_cache_kernel[(B, n_heads + n_kv)](
        q, k, v, cos, sin, q_out, cache_layer, destinations, n_heads, n_kv, cache_layer[0].numel(),
        q.stride(0), k.stride(0), v.stride(0), HALF=head_dim // 2, num_warps=1)
    return q_out


def silu_mul_triton(gate, up):
    """gate, up: [B, I] with unit column stride and one shared row stride (separate tensors, or the two
    halves of the fused gate|up output) → [B, I] contiguous."""
    B, n_cols = gate.shape
    assert gate.stride(1) == up.stride(1) == 1 and gate.stride(0) == up.stride(0)
    out = torch.empty(B, n_cols, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(n_cols))
    _silu_mul_kernel[(B, triton.cdiv(n_cols, block))](gate, up, out, n_cols, gate.stride(0), BLOCK=block,
                                                      num_warps=4)
    return out


# ----------------------------------------------------------------------------- the decode step
class FusedWeights:
    """Per layer, [W_q; W_k; W_v] (and the concatenated biases) and [W_gate; W_up] in persistent buffers.

    The buffers are copies that the graphs read at fixed addresses; `refresh()` rewrites them in place from
    the model's current parameters (looked up anew, so replaced parameter tensors are picked up too), and
    `refresh_if_changed()` does so only when a source parameter's version counter moved."""

    def __init__(self, model):
        self.model = model
        self.qkv_weight, self.qkv_bias, self.gate_up = [], [], []
        with torch.no_grad():
            for attn, mlp in self._modules():
                q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
                self.qkv_weight.append(torch.empty((q.out_features + k.out_features + v.out_features, q.in_features),
                                                   dtype=q.weight.dtype, device=q.weight.device))
                has_bias = q.bias is not None and k.bias is not None and v.bias is not None
                if not has_bias and (q.bias is not None or k.bias is not None or v.bias is not None):
                    raise ValueError("fused q|k|v needs all three projections with a bias, or none")
                self.qkv_bias.append(torch.empty(self.qkv_weight[-1].shape[0], dtype=q.bias.dtype,
                                                 device=q.bias.device) if has_bias else None)
                g, u = mlp.gate_proj.weight, mlp.up_proj.weight
                self.gate_up.append(torch.empty((g.shape[0] + u.shape[0], g.shape[1]), dtype=g.dtype, device=g.device))
        self._version = None
        self.refreshes = 0
        self.refresh()

    def _modules(self):
        return [(b.self_attn, b.mlp) for b in self.model.model.layers]

    def _sources(self):
        for attn, mlp in self._modules():
            yield [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            if attn.q_proj.bias is not None:
                yield [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            yield [mlp.gate_proj.weight, mlp.up_proj.weight]

    def version(self) -> int | None:
        """Sum of the source parameters' version counters (each only grows, so the sum moves on any in-place
        write through autograd-visible tensors: optimizer steps, copy_, load_state_dict). None for inference
        tensors, which keep no counter (then only the refresh when a batch starts applies)."""
        try:
            return sum(p._version for group in self._sources() for p in group)
        except RuntimeError:
            return None

    def refresh(self) -> None:
        dests = []
        for i in range(len(self.qkv_weight)):
            dests.append(self.qkv_weight[i])
            if self.qkv_bias[i] is not None:
                dests.append(self.qkv_bias[i])
            dests.append(self.gate_up[i])
        with torch.no_grad():
            for dest, group in zip(dests, self._sources()):
                torch.cat([p.detach() for p in group], dim=0, out=dest)
        self._version = self.version()
        self.refreshes += 1

    def refresh_if_changed(self) -> bool:
        version = self.version()
        if version is None or version == self._version:
            return False
        self.refresh()
        return True


def _bucket_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, 1, kv_len] bool: row b may read cache positions 0..positions[b]."""
    return (torch.arange(kv_len, device=positions.device) <= positions[:, None])[:, None, None, :]


class FastDecoder:
    """decode(tokens [B], positions [B], kv_len, out [B, V]): one decode token per row b = cache slot b
    (slotted) or block-table row b (paged).

    fused_proj: one GEMM for q|k|v and one for gate|up per layer (FusedWeights; call `sync_weights`).
    decode_attention: attention that reads each row's positions[b] + 1 cached positions (decode_attention.py)
    instead of SDPA over the masked kv_len bucket. None takes the module defaults below.
    """

    def __init__(self, model, cache, use_triton: bool, fused_proj: bool | None = None,
                 decode_attention: bool | None = None):
        self.model, self.cache = model, cache
        self.block_tables = cache.block_tables if isinstance(cache, PagedKVCache) else None
        hd = model.args.head_dim
        ok = use_triton and triton is not None and hd % 2 == 0 and (hd // 2) & (hd // 2 - 1) == 0
        self.add_rmsnorm = add_rmsnorm_triton if ok else add_rmsnorm_torch
        self.rope_cache = rope_cache_triton if ok else rope_cache_torch
        self.silu_mul = silu_mul_triton if ok else silu_mul_torch
        self.uses_triton = ok
        self.fused = FusedWeights(model) if (FUSED_PROJ if fused_proj is None else fused_proj) else None
        if decode_attention is None:
            decode_attention = DECODE_ATTENTION and use_triton and _da.triton is not None
        self.decode_attention = bool(decode_attention)
        """True: valid-length decode attention (the Triton kernel on CUDA, its torch twin elsewhere)."""
        self.attention_kernel = self.decode_attention and use_triton and _da.triton is not None
        self.attention_chunks = 1
        """n_chunks of the torch twin (tests set it to exercise the split-K merge on CPU)."""
        self.attention_error: str | None = None
        """Why the attention kernel was dropped for SDPA (it failed on its first, uncaptured call), or None."""
        self._kernel_ran = False

    def sync_weights(self, force: bool = False) -> None:
        """Bring the fused weight buffers up to date with the model (no-op without fused_proj). force=True
        copies unconditionally (the engine does this when a batch starts: it also catches writes that skip
        version counters, such as `param.data.copy_(...)`); otherwise only if a version counter moved."""
        if self.fused is not None:
            if force:
                self.fused.refresh()
            else:
                self.fused.refresh_if_changed()

    def _attend(self, q, i, lengths, kv_len, positions, attn, work, mask):
        B = q.shape[0]
        if self.attention_kernel:
            layer = self.cache.layers[i]
            if self._kernel_ran:
                return _da.decode_attention_triton(q, layer, lengths, attn.scale, work, self.block_tables)
            try:  # the first call compiles (never inside a capture: the graphs warm up eagerly first)
                out = _da.decode_attention_triton(q, layer, lengths, attn.scale, work, self.block_tables)
                self._kernel_ran = True
                return out
            except Exception as err:  # e.g. a Triton version that cannot compile it: keep decoding, with SDPA
                self.attention_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"decode attention kernel failed ({self.attention_error}); using SDPA over the bucket")
                self.attention_kernel = self.decode_attention = False
        rows = self.cache.read(i, None, B, kv_len)  # [2, B, kv_len, Hkv, D]: a view (slotted) or a gather (paged)
        if self.decode_attention:
            return _da.decode_attention_torch(q, rows, lengths, kv_len, attn.scale, self.attention_chunks)
        if mask is None:  # the kernel was dropped during this step
            mask = _bucket_mask(positions, kv_len)
        keys = rows[0].transpose(1, 2)  # [B, Hkv, S, D]
        values = rows[1].transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=attn.scale,
                                           enable_gqa=attn.n_heads != attn.n_kv)  # [B, H, 1, D]
        return o[:, :, 0]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, out: torch.Tensor) -> None:
        model, eps, fused = self.model, self.model.args.rms_norm_eps, self.fused
        B = tokens.shape[0]
        cos, sin = model.rotary(positions[:, None])
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [B, D/2] fp32
        destinations = self.cache.flat_index(positions)  # [B]: where each row's new K/V goes, for every layer
        lengths = work = mask = None
        if not self.decode_attention:  # SDPA over the bucket: one mask for every layer
            mask = _bucket_mask(positions, kv_len)
        else:  # rows read positions 0..positions[b] (idle rows: clamped into the bucket)
            lengths = (positions + 1).clamp_(max=kv_len).to(torch.int32)
            if self.attention_kernel:
                a = model.args
                work = _da.Workspace(B, a.num_attention_heads, a.num_key_value_heads, a.head_dim, kv_len,
                                     tokens.device)
        residual, delta = model.model.embed_tokens(tokens), None  # [B, d]
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            x, residual = self.add_rmsnorm(delta, residual, block.input_layernorm.weight, eps)
            if fused is not None:
                qkv = F.linear(x, fused.qkv_weight[i], fused.qkv_bias[i])
                q, k, v = qkv.split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features],
                                    dim=1)
            else:
                q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
                k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias)
                v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias)
            q = self.rope_cache(q, k, v, cos, sin, self.cache.layers[i], destinations, attn.n_heads, attn.n_kv,
                                attn.head_dim)
            o = self._attend(q, i, lengths, kv_len, positions, attn, work, mask)  # [B, H, D]
            delta = F.linear(o.reshape(B, -1), attn.o_proj.weight, attn.o_proj.bias)
            x, residual = self.add_rmsnorm(delta, residual, block.post_attention_layernorm.weight, eps)
            if fused is not None:
                gate, up = F.linear(x, fused.gate_up[i]).split(mlp.gate_proj.out_features, dim=1)
            else:
                gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
            delta = F.linear(self.silu_mul(gate, up), mlp.down_proj.weight)
        x, _ = self.add_rmsnorm(delta, residual, model.model.norm.weight, eps)
        torch.matmul(x, model.lm_head.weight.t(), out=out)
