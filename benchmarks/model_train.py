"""Forward+backward throughput and MFU: r1lab's model vs transformers' own, same weights, same input, one GPU.

    python benchmarks/model_train.py                 # H100: dense Qwen2.5-0.5B shape + MoE+MLA ~1B/0.2B-active
    python benchmarks/model_train.py --quick         # CPU smoke run on tiny presets
    python benchmarks/model_train.py --fused-head --only qwen2.5-0.5b --no-hf   # A/B of the fused head

For each model: tokens/s of one training step (forward, cross-entropy on all tokens, backward) and MFU
against the bf16 dense peak (989 TFLOP/s for H100 SXM) and against a matmul rate measured in the same run.
r1lab runs its training path (hidden states → chunked log-softmax, never the full fp32 logits) with and
without torch.compile of each block; transformers runs `model(input_ids, labels=...)`, its own loss path.
The MoE section also compares r1lab's grouped-GEMM experts with its per-expert loop and the grouped GEMM's
rate with a dense GEMM of the same FLOPs.
--fused-head adds, in the same run, r1lab with the fused vocabulary head (r1lab/train/fused_head.py: bf16
logits, one Triton kernel per chunk, the logits' gradient written in the forward) at its default memory
budget and with every chunk's gradient kept, and a head-only section: forward+backward of the GRPO/SFT head
(`logprobs_from_hidden`, 16k tokens, Qwen2.5-0.5B head) and of the chunked cross-entropy, plain vs fused,
with the peak extra memory of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import r1lab.model as rm  # noqa: E402
from r1lab.train.fused_head import fused_cross_entropy  # noqa: E402
from r1lab.train.logprobs import logprobs_from_hidden  # noqa: E402

PEAK_BF16 = 989e12


def timed(fn, warmup: int, iters: int) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def train_flops_per_token(model: rm.Transformer, seq_len: int) -> float:
    """6 × active matmul params (embedding lookup excluded, head included) + causal attention FLOPs."""
    a = model.args
    active = model.num_parameters(active=True) - a.vocab_size * a.hidden_size * (0 if a.tie_word_embeddings else 1)
    if a.is_mla:
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk = v = a.head_dim
    attn = 6 * a.num_hidden_layers * a.num_attention_heads * (qk + v) * seq_len / 2  # causal: half the pairs
    return 6 * active + attn


def chunked_ce(model: rm.Transformer, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy from hidden states, logits materialized one chunk of tokens at a time."""
    h = model.model.norm(model.forward_hidden(ids))[:, :-1].reshape(-1, model.args.hidden_size)
    targets = ids[:, 1:].reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        def piece(hc, tc):
            return F.cross_entropy(model.lm_head(hc).float(), tc, reduction="sum")
        total = total + torch.utils.checkpoint.checkpoint(piece, h[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
    return total / targets.numel()


def fused_ce(model: rm.Transformer, ids: torch.Tensor, chunk: int = 1024, store_bytes: float | None = None) -> torch.Tensor:
    """chunked_ce's loss through the fused head (the norm stays a torch op before it)."""
    h = model.forward_hidden(ids)[:, :-1].reshape(-1, model.args.hidden_size)
    return fused_cross_entropy(h, model.lm_head.weight, ids[:, 1:].reshape(-1), norm=model.model.norm,
                               chunk_size=chunk, store_bytes=store_bytes)


def measure_matmul_rate(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 3, 10)
    return 2 * 8192**3 / t


def timed_peak(fn, warmup: int, iters: int, peaks: dict, name: str) -> float:
    """timed(), also recording the peak memory allocated (GiB) during the calls under peaks[name]."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sec = timed(fn, warmup, iters)
    if torch.cuda.is_available():
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    return sec


def bench_model(name: str, args: rm.ModelArgs, batch: int, seq: int, device: str, dtype, compile_too: bool, out: dict,
                fused_head: bool = False, hf: bool = True):
    torch.manual_seed(0)
    model = rm.build(args, seed=0).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    flops_tok = train_flops_per_token(model, seq)
    tokens = batch * seq
    rows, peaks = {}, {}

    def step_ours():
        model.zero_grad(set_to_none=True)
        chunked_ce(model, ids).backward()

    def step_fused(store_bytes=None):
        model.zero_grad(set_to_none=True)
        fused_ce(model, ids, store_bytes=store_bytes).backward()

    rows["r1lab"] = timed_peak(step_ours, 2, 5, peaks, "r1lab")
    if fused_head:
        rows["r1lab fused head"] = timed_peak(step_fused, 2, 5, peaks, "r1lab fused head")
        rows["r1lab fused head (keep all)"] = timed_peak(lambda: step_fused(float("inf")), 2, 5, peaks,
                                                         "r1lab fused head (keep all)")
    if compile_too and device == "cuda":
        for layer in model.model.layers:
            layer.compile()
        rows["r1lab+compile"] = timed_peak(step_ours, 3, 5, peaks, "r1lab+compile")
        if fused_head:
            rows["r1lab+compile fused head"] = timed_peak(step_fused, 2, 5, peaks, "r1lab+compile fused head")
    if args.is_moe:
        model_loop = model
        for m in model_loop.moe_layers():
            m.impl = "loop"
        rows["r1lab (expert loop)"] = timed(step_ours, 1, 3)
        for m in model_loop.moe_layers():
            m.impl = "auto"

    try:
        if not hf:
            raise ImportError
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            rm.save(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=dtype, attn_implementation="sdpa"
            ).to(device).train()
        del model
        gc.collect()

        def step_hf():
            hf.zero_grad(set_to_none=True)
            hf(input_ids=ids, labels=ids).loss.backward()

        rows["transformers"] = timed(step_hf, 2, 5)
        if args.is_moe:
            try:
                hf.set_experts_implementation("grouped_mm")
                rows["transformers (grouped_mm experts)"] = timed(step_hf, 2, 5)
            except Exception as e:  # older transformers: no such switch
                print(f"  (transformers grouped_mm experts unavailable: {e})")
        del hf
    except ImportError:
        print("  transformers not installed or --no-hf: skipping the reference")
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    result = {}
    for impl, sec in rows.items():
        tps = tokens / sec
        result[impl] = {"step_s": sec, "tokens_per_s": tps, "tflops": tps * flops_tok / 1e12, "mfu": tps * flops_tok / PEAK_BF16}
        if impl in peaks:
            result[impl]["peak_gib"] = peaks[impl]
    out[name] = {"batch": batch, "seq": seq, "flops_per_token": flops_tok, "results": result}
    ref = result.get("transformers", {}).get("tokens_per_s")
    print(f"\n{name}: batch {batch} x seq {seq}, {flops_tok / 1e9:.2f} GFLOP/token")
    print(f"  {'impl':36s} {'step s':>8s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs HF':>6s} {'peak GiB':>9s}")
    for impl, r in result.items():
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        peak = f"{r['peak_gib']:9.1f}" if "peak_gib" in r else f"{'-':>9s}"
        print(f"  {impl:36s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {r['mfu'] * 100:5.1f}% {ratio:>6s} {peak}")


def bench_head(args: rm.ModelArgs, tokens: int, device: str, dtype, out: dict):
    """Forward+backward of the vocabulary head alone on `tokens` random hidden states: the GRPO/SFT head
    (logprobs_from_hidden with entropy, 1024-token chunks) and the pretraining-style chunked CE, plain vs
    fused; ms per call and the peak memory above the weights and inputs."""
    head_args = dataclasses.replace(args, num_hidden_layers=1, num_nextn_predict_layers=0)
    model = rm.build(head_args, seed=0).to(device=device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, args.hidden_size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (1, tokens), generator=gen).to(device)
    weights = torch.randn(1, tokens, generator=gen).to(device)

    def grpo_head(fused, store=None):
        def run():
            hidden.grad = None
            model.zero_grad(set_to_none=True)
            if store is None:
                logp, _ = logprobs_from_hidden(model, hidden, targets, with_entropy=True, fused_head=fused)
            else:
                import r1lab.train.fused_head as fh
                saved, fh.STORE_BYTES = fh.STORE_BYTES, store
                try:
                    logp, _ = logprobs_from_hidden(model, hidden, targets, with_entropy=True, fused_head=fused)
                finally:
                    fh.STORE_BYTES = saved
            (logp * weights).sum().backward()
        return run

    def ce_head(fused, store=None):
        def run():
            hidden.grad = None
            model.zero_grad(set_to_none=True)
            flat = hidden.reshape(-1, args.hidden_size)
            if fused:
                loss = fused_cross_entropy(flat, model.lm_head.weight, targets.reshape(-1), norm=model.model.norm,
                                           store_bytes=store)
            else:
                h, t = model.model.norm(flat), targets.reshape(-1)
                loss = h.new_zeros((), dtype=torch.float32)
                for s in range(0, h.shape[0], 4096):
                    def piece(hc, tc):
                        return F.cross_entropy(model.lm_head(hc).float(), tc, reduction="sum")
                    loss = loss + torch.utils.checkpoint.checkpoint(piece, h[s : s + 4096], t[s : s + 4096],
                                                                    use_reentrant=False)
            loss.backward()
        return run

    variants = {
        "GRPO/SFT head (logprobs_from_hidden), plain": grpo_head(False),
        "GRPO/SFT head, fused (default budget)": grpo_head(True),
        "GRPO/SFT head, fused (keep all)": grpo_head(True, float("inf")),
        "chunked CE (model_train), plain": ce_head(False),
        "chunked CE, fused (default budget)": ce_head(True),
        "chunked CE, fused (keep all)": ce_head(True, float("inf")),
    }
    result = {}
    print(f"\nvocabulary head alone: {tokens} tokens, d {args.hidden_size}, V {args.vocab_size}, {dtype}")
    print(f"  {'variant':46s} {'fwd+bwd ms':>10s} {'extra peak GiB':>15s}")
    for name, fn in variants.items():
        hidden.grad = None
        model.zero_grad(set_to_none=True)
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        peaks: dict = {}
        sec = timed_peak(fn, 2, 5, peaks, name)
        extra = peaks.get(name, float("nan")) - base / 2**30
        result[name] = {"ms": sec * 1e3, "extra_peak_gib": extra}
        print(f"  {name:46s} {sec * 1e3:10.2f} {extra:15.2f}")
    out["head_only"] = {"tokens": tokens, "results": result}


def bench_grouped_gemm(device: str, out: dict):
    """Grouped GEMM (moe-1b expert shapes, uneven routing) vs one dense GEMM of the same FLOPs."""
    if device != "cuda":
        return
    E, d, I, tokens, k = 64, 1024, 384, 16384, 6
    x = torch.randn(tokens * k, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, 2 * I, d, device=device, dtype=torch.bfloat16)
    counts = torch.distributions.Dirichlet(torch.full((E,), 2.0)).sample() * tokens * k
    counts = counts.long()
    counts[-1] += tokens * k - counts.sum()
    offs = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)
    grouped = timed(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), 3, 20)
    wd = torch.randn(d, 2 * I, device=device, dtype=torch.bfloat16)
    dense = timed(lambda: x @ wd, 3, 20)
    flops = 2 * tokens * k * d * 2 * I
    out["grouped_gemm"] = {"grouped_tflops": flops / grouped / 1e12, "dense_tflops": flops / dense / 1e12}
    print(f"\ngrouped GEMM {flops / grouped / 1e12:.0f} TFLOP/s vs dense GEMM of the same FLOPs {flops / dense / 1e12:.0f} TFLOP/s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="model_train.json")
    p.add_argument("--fused-head", action="store_true", help="A/B the fused vocabulary head in the same run")
    p.add_argument("--only", default=None, help="comma-separated model names (qwen2.5-0.5b, moe-1b; tiny-dense, tiny-moe)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    a = p.parse_args()
    only = set(a.only.split(",")) if a.only else None

    def wanted(name):
        return only is None or name in only

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    if device == "cuda":
        out["matmul_tflops_measured"] = measure_matmul_rate(device) / 1e12
        print(f"{out['device']}: bf16 8192^3 matmul {out['matmul_tflops_measured']:.0f} TFLOP/s")
    kw = {"fused_head": a.fused_head, "hf": not a.no_hf}
    if a.quick:
        if wanted("tiny-dense"):
            bench_model("tiny-dense", rm.preset("tiny-dense"), 2, 64, device, dtype, False, out, **kw)
        if wanted("tiny-moe"):
            bench_model("tiny-moe", rm.preset("tiny-moe", num_nextn_predict_layers=0), 2, 64, device, dtype, False, out, **kw)
        if a.fused_head:
            bench_head(rm.preset("tiny-dense"), 256, device, dtype, out)
    else:
        if a.fused_head:
            bench_head(rm.preset("qwen2.5-0.5b"), 16384, device, dtype, out)
        if wanted("qwen2.5-0.5b"):
            bench_model("qwen2.5-0.5b", rm.preset("qwen2.5-0.5b"), 8, 2048, device, dtype, not a.no_compile, out, **kw)
        if wanted("moe-1b"):
            bench_model("moe-1b", rm.preset("moe-1b"), 8, 2048, device, dtype, not a.no_compile, out, **kw)
        if only is None:
            bench_grouped_gemm(device, out)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
