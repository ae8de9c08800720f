"""Fused vocabulary head: normed hidden rows [N, d] → log p(target) per row (and the entropy), with the
gradient w.r.t. the logits produced in the forward pass instead of recomputed.

Why. With a 152k vocabulary the head dominates a small model's step. The plain path
(`logprobs.logprobs_from_hidden`, checkpointed chunks) makes an fp32 copy of each chunk's logits, runs
logsumexp / softmax over it, and in the backward recomputes all of that and runs the softmax backward:
several passes over a [chunk, V] tensor per chunk, most of them in fp32. Here, per chunk of rows:

  forward   logits = x @ W^T (cuBLAS, in the compute dtype: bf16 under autocast or for a bf16 model; no
            fp32 copy), then ONE kernel per chunk reads each row of logits (two streaming passes over the
            vocabulary, fp32 math) and writes logp[target] and the entropy, and, when a gradient will be
            needed and the chunk fits the storage budget, overwrites the logits buffer in place with
                G = softmax(logits / T) - onehot(target)        (onehot = 0 on rows with target < 0)
  backward  d(loss)/d(logits) = diag(s) · G with the per-row scale s = -upstream_grad(logp) / T, so
                grad_x = diag(s) · (G @ W)        grad_W = G^T @ (diag(s) · x)
            i.e. two GEMMs per chunk with the scale applied to the small [c, d] operands: no pass over the
            [c, V] buffer, no recomputed logits, no softmax backward.

What is stored: G unscaled (the upstream gradient is unknown during the forward); the scale (including 1/T,
and 0 for rows with target < 0, whose logp is the constant 0) is applied per row in the backward. When the
entropy also receives a gradient, a second kernel rewrites G in place into the full d/d(logits) of
a·logp + b·H:  (1/T)·[-a·G - b·p·(log p + H)]  (p is recovered from G, p[target] from exp(logp)).

Memory, and the trade-off against the checkpointed path. Chunking bounds only the transient (one [c, V]
buffer in the compute dtype), not what is kept: keeping G for every row costs N × V × 2 bytes in bf16
(16k tokens × 152k vocabulary = 5 GB) until the backward, where the checkpointed path keeps only the
hidden states (N × d). So G is kept for the first chunks up to `store_bytes` (module default STORE_BYTES,
1 GiB); the remaining chunks keep only their rows of x and are recomputed in the backward (one more GEMM
and one more kernel pass, still without the fp32 copy and the softmax backward). Peak extra memory:
store_bytes + one chunk of logits (chunk_size × V × 2 bytes: 0.3 GB for 1024 × 152k), forward or backward
(the backward frees each kept buffer as it uses it, kept chunks first), plus head-sized [V, d] buffers as in
the plain path (the weight's gradient; its bf16 copy when the master weight is fp32 under autocast).
store_bytes=float("inf") keeps everything: fastest, N × V × 2 bytes.

`impl`: "triton" (the kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (a plain-torch twin
of the same per-chunk math, for CPU or without Triton), "auto" (Triton on CUDA when installed, else torch).
Logits that are -inf are not supported (every row must have a finite maximum).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch twin is used
    triton = None

STORE_BYTES: float = float(1 << 30)
"""Default budget (bytes) for the kept [chunk, V] gradient buffers; chunks beyond it are recomputed."""
BLOCK = 4096
"""Vocabulary tile of the kernels (elements per loop iteration of one program)."""


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _head_rows_kernel(logits_ptr, row_stride, targets_ptr, logp_ptr, ent_ptr, vocab, inv_temp,
                          WITH_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """Program = one row. Pass 1: online max m, Σ e^(z-m) and (entropy) Σ e^(z-m)·(z-m) over vocabulary
        tiles of z = logits · inv_temp in fp32 → logp[target], entropy. Pass 2 (WRITE_GRAD): the row of
        logits ← softmax(z) - onehot(target), in the logits' dtype. Everything is taken relative to the max
        (as a softmax is), not to the log-sum-exp: fp32 errors then stay relative to the probabilities."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * row_stride
        target = tl.load(targets_ptr + row).to(tl.int32)
        # the target's logit, read before pass 2 overwrites the row
        z_target = tl.load(base + tl.maximum(target, 0)).to(tl.float32) * inv_temp
        offs = tl.arange(0, BLOCK)
        # the first tile starts the running max / sum / dot ...
        inside = offs < vocab
        z = tl.load(base + offs, mask=inside, other=-float("inf")).to(tl.float32) * inv_temp
        run_max = tl.max(z, 0)
        e = tl.exp(z - run_max)  # 0 outside the vocabulary
        run_sum = tl.sum(e, 0)
        run_dot = tl.sum(e * tl.where(inside, z - run_max, 0.0), 0)
        # ... the other tiles rescale them to a new max (one exp per element):
        # Σ e^(z-m')(z-m') = r·(Σ e^(z-m)(z-m) + (m-m')·Σ e^(z-m)) with r = e^(m-m')
        for start in range(BLOCK, vocab, BLOCK):
            cols = start + offs
            inside = cols < vocab
            z = tl.load(base + cols, mask=inside, other=-float("inf")).to(tl.float32) * inv_temp
            new_max = tl.maximum(run_max, tl.max(z, 0))
            rescale = tl.exp(run_max - new_max)
            e = tl.exp(z - new_max)
            if WITH_ENTROPY:
                run_dot = rescale * (run_dot + (run_max - new_max) * run_sum) + \
                    tl.sum(e * tl.where(inside, z - new_max, 0.0), 0)
            run_sum = run_sum * rescale + tl.sum(e, 0)
            run_max = new_max
        log_sum = tl.log(run_sum)
        tl.store(logp_ptr + row, tl.where(target >= 0, (z_target - run_max) - log_sum, 0.0))
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, log_sum - run_dot / run_sum)
        if WRITE_GRAD:
            inv_sum = 1.0 / run_sum
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                inside = cols < vocab
                z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
                g = tl.exp(z - run_max) * inv_sum - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _entropy_grad_kernel(g_ptr, row_stride, targets_ptr, logp_ptr, ent_ptr, a_ptr, b_ptr, vocab, inv_temp,
                             BLOCK: tl.constexpr):
        """In place, one row per program: G = p - onehot  →  (1/T)·[-a·G - b·p·(log p + H)]."""
        row = tl.program_id(0)
        base = g_ptr + row.to(tl.int64) * row_stride
        target = tl.load(targets_ptr + row).to(tl.int32)
        p_target = tl.exp(tl.load(logp_ptr + row))  # exact p[target]; G's value there is p - 1
        ent = tl.load(ent_ptr + row)
        a = tl.load(a_ptr + row)
        b = tl.load(b_ptr + row)
        offs = tl.arange(0, BLOCK)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            inside = cols < vocab
            g = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            p = tl.where(cols == target, p_target, g)
            p_log_p = tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0)
            out = -(a * g + b * (p_log_p + p * ent)) * inv_temp
            tl.store(base + cols, out.to(g_ptr.dtype.element_ty), mask=inside)


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(BLOCK, triton.next_power_of_2(vocab))
    return block, 8 if block >= 2048 else 4


def _rows_triton(logits, targets, inv_temp: float, write_grad: bool, logp, ent) -> None:
    """logits [c, V] (unit stride on V; G written over it if write_grad), targets [c] → logp [c] (and ent [c]
    unless None), fp32 outputs written in place."""
    c, V = logits.shape
    if c:
        block, warps = _launch_config(V)
        _head_rows_kernel[(c,)](logits, logits.stride(0), targets, logp, logp if ent is None else ent, V, inv_temp,
                                WITH_ENTROPY=ent is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps)


def _entropy_grad_triton(g, targets, logp, ent, a, b, inv_temp: float) -> None:
    c, V = g.shape
    if c:
        block, warps = _launch_config(V)
        _entropy_grad_kernel[(c,)](g, g.stride(0), targets, logp, ent, a, b, V, inv_temp, BLOCK=block,
                                   num_warps=warps)


# ----------------------------------------------------------------------------------------- torch twins
def _rows_torch(logits, targets, inv_temp: float, write_grad: bool, logp, ent) -> None:
    """The kernel's math with torch ops (fp32 temporaries of the chunk): same outputs, same in-place G."""
    z = logits.float() * inv_temp
    zm = z - z.max(dim=-1, keepdim=True).values
    e = torch.exp(zm)
    total = e.sum(-1)
    log_sum = torch.log(total)
    valid = targets >= 0
    logp.copy_(torch.where(valid, zm.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) - log_sum, 0.0))
    if ent is not None:
        ent.copy_(log_sum - (e * zm).sum(-1) / total)
    if write_grad:
        p = e.div_(total[:, None])
        rows = valid.nonzero().squeeze(1)
        p[rows, targets[rows]] -= 1.0
        logits.copy_(p)


def _entropy_grad_torch(g, targets, logp, ent, a, b, inv_temp: float) -> None:
    gf = g.float()
    p = gf.clone()
    rows = (targets >= 0).nonzero().squeeze(1)
    p[rows, targets[rows]] = logp[rows].exp()
    p_log_p = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    g.copy_(-(a[:, None] * gf + b[:, None] * (p_log_p + p * ent[:, None])) * inv_temp)


def _use_triton(impl: str, device: torch.device) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs Triton installed")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return triton is not None and device.type == "cuda"


# ----------------------------------------------------------------------------------------- autograd
def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, temperature, with_entropy, chunk_size, store_bytes, use_triton, need_grad):
        rows_fn = _rows_triton if use_triton else _rows_torch
        cdt = _compute_dtype(x, weight)
        inv_temp = 1.0 / temperature
        N = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xs, ws = x.to(cdt), weight.to(cdt)
            logp = torch.empty(N, dtype=torch.float32, device=x.device)
            ent = torch.empty(N, dtype=torch.float32, device=x.device) if with_entropy else None
            kept, used = [], 0
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                logits = xs[start:end] @ ws.t()  # [c, V], compute dtype, contiguous
                keep = need_grad and used + logits.nbytes <= store_bytes
                used += logits.nbytes if keep else 0
                rows_fn(logits, targets[start:end], inv_temp, keep, logp[start:end],
                        ent[start:end] if with_entropy else None)
                kept.append(logits if keep else None)
        ctx.set_materialize_grads(False)
        ctx.kept = kept if need_grad else None
        ctx.cfg = (temperature, with_entropy, chunk_size, use_triton, cdt, x.dtype)
        ctx.save_for_backward(xs, weight, targets, logp, ent if with_entropy else logp)
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        temperature, with_entropy, chunk_size, use_triton, cdt, x_dtype = ctx.cfg
        xs, weight, targets, logp, ent = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inv_temp = 1.0 / temperature
        N = xs.shape[0]
        valid = targets >= 0
        a = torch.zeros(N, dtype=torch.float32, device=xs.device) if g_logp is None else g_logp.float() * valid
        b = g_ent.float().contiguous() if with_entropy and g_ent is not None else None
        rows_fn = _rows_triton if use_triton else _rows_torch
        ent_grad_fn = _entropy_grad_triton if use_triton else _entropy_grad_torch
        scale = None if b is not None else (-a * inv_temp)  # applied to the [c, d] operands
        grad_x = torch.empty(N, xs.shape[1], dtype=torch.float32, device=xs.device) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        with torch.autocast(xs.device.type, enabled=False):
            ws = weight.to(cdt)
            starts = list(range(0, N, chunk_size))
            order = [i for i in range(len(starts)) if kept[i] is not None]
            order += [i for i in range(len(starts)) if kept[i] is None]  # kept first: free them before recomputing
            for i in order:
                start = starts[i]
                end = min(start + chunk_size, N)
                xc, tc = xs[start:end], targets[start:end]
                g, kept[i] = kept[i], None
                if g is None:  # not kept: recompute the logits and G
                    g = xc @ ws.t()
                    rows_fn(g, tc, inv_temp, True, torch.empty_like(logp[start:end]), None)
                if b is not None:  # full d/d(logits) of a·logp + b·H, in place
                    ent_grad_fn(g, tc, logp[start:end], ent[start:end], a[start:end].contiguous(),
                                b[start:end], inv_temp)
                    if need_x:
                        grad_x[start:end] = g @ ws
                    if need_w:
                        _accumulate(grad_w, g, xc)
                else:  # d/d(logits) = diag(s) · G: the row scale goes on the [c, d] operands
                    s = scale[start:end, None]
                    if need_x:
                        grad_x[start:end] = (g @ ws).float() * s
                    if need_w:
                        _accumulate(grad_w, g, (xc.float() * s).to(cdt))
                del g
        return (grad_x.to(x_dtype) if need_x else None), grad_w, None, None, None, None, None, None, None


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """grad_w += g^T @ x; with an fp32 master weight and bf16 compute, a bf16 product summed in fp32."""
    if grad_w.dtype == g.dtype:
        grad_w.addmm_(g.t(), x)
    else:
        grad_w.add_(g.t() @ x)


def fused_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    store_bytes: float | None = None,
    impl: str = "auto",
):
    """hidden [N, d], head weight [V, d], targets [N] (negative = ignore) → logp [N] fp32 (and entropy [N]).

    logp[i] = log softmax(norm(hidden[i]) @ W^T / temperature)[targets[i]], 0 where targets[i] < 0 (with a
    zero gradient); the entropy is that of the same distribution, for every row. Differentiable w.r.t.
    hidden, weight and the norm's parameters (`norm` runs first, as ordinary torch ops, on all N rows).
    chunk_size: rows per logits GEMM / kernel launch; store_bytes: budget for the kept gradient buffers
    (None = STORE_BYTES; see the module docstring); impl: "auto" | "triton" | "torch".
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, d], weight [V, d], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = norm(hidden) if norm is not None else hidden
    use_triton = _use_triton(impl, x.device)
    budget = STORE_BYTES if store_bytes is None else store_bytes
    # (ctx.needs_input_grad is set under no_grad too: decide here whether G is worth writing and keeping)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _FusedHead.apply(x, weight, targets.contiguous(), float(temperature), with_entropy, chunk_size, budget,
                            use_triton, need_grad)


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    **kwargs,
) -> torch.Tensor:
    """Cross-entropy = -logp of fused_head_logprobs (same keyword arguments). Targets < 0 (e.g. -100) are
    ignored; reduction "mean" divides by the number of counted rows (0, not NaN, when there is none)."""
    if kwargs.get("with_entropy"):
        raise ValueError("fused_cross_entropy returns the loss only; use fused_head_logprobs for the entropy")
    loss = -fused_head_logprobs(hidden, weight, targets, **kwargs)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (targets >= 0).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
