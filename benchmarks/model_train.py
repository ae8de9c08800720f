"""Forward+backward throughput and MFU: r1lab's model vs transformers' own, same weights, same input, one GPU.

    python benchmarks/model_train.py                 # H100: dense Qwen2.5-0.5B shape + MoE+MLA ~1B/0.2B-active
    python benchmarks/model_train.py --quick         # CPU smoke run on tiny presets

For each model: tokens/s of one training step (forward, cross-entropy on all tokens, backward) and MFU
against the bf16 dense peak (989 TFLOP/s for H100 SXM) and against a matmul rate measured in the same run.
r1lab runs its training path (hidden states → chunked log-softmax, never the full fp32 logits) with and
without torch.compile of each block; transformers runs `model(input_ids, labels=...)`, its own loss path.
The MoE section also compares r1lab's grouped-GEMM experts with its per-expert loop and the grouped GEMM's
rate with a dense GEMM of the same FLOPs.
"""

from __future__ import annotations

import argparse
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


def measure_matmul_rate(device: str) -> float:
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 3, 10)
    return 2 * 8192**3 / t


def bench_model(name: str, args: rm.ModelArgs, batch: int, seq: int, device: str, dtype, compile_too: bool, out: dict):
    torch.manual_seed(0)
    model = rm.build(args, seed=0).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    flops_tok = train_flops_per_token(model, seq)
    tokens = batch * seq
    rows = {}

    def step_ours():
        model.zero_grad(set_to_none=True)
        chunked_ce(model, ids).backward()

    rows["r1lab"] = timed(step_ours, 2, 5)
    if compile_too and device == "cuda":
        for layer in model.model.layers:
            layer.compile()
        rows["r1lab+compile"] = timed(step_ours, 3, 5)
    if args.is_moe:
        model_loop = model
        for m in model_loop.moe_layers():
            m.impl = "loop"
        rows["r1lab (expert loop)"] = timed(step_ours, 1, 3)
        for m in model_loop.moe_layers():
            m.impl = "auto"

    try:
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
        print("  transformers not installed: skipping the reference")
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    result = {}
    for impl, sec in rows.items():
        tps = tokens / sec
        result[impl] = {"step_s": sec, "tokens_per_s": tps, "tflops": tps * flops_tok / 1e12, "mfu": tps * flops_tok / PEAK_BF16}
    out[name] = {"batch": batch, "seq": seq, "flops_per_token": flops_tok, "results": result}
    ref = result.get("transformers", {}).get("tokens_per_s")
    print(f"\n{name}: batch {batch} x seq {seq}, {flops_tok / 1e9:.2f} GFLOP/token")
    print(f"  {'impl':36s} {'step s':>8s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs HF':>6s}")
    for impl, r in result.items():
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"  {impl:36s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {r['mfu'] * 100:5.1f}% {ratio:>6s}")


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
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    if device == "cuda":
        out["matmul_tflops_measured"] = measure_matmul_rate(device) / 1e12
        print(f"{out['device']}: bf16 8192^3 matmul {out['matmul_tflops_measured']:.0f} TFLOP/s")
    if a.quick:
        bench_model("tiny-dense", rm.preset("tiny-dense"), 2, 64, device, dtype, False, out)
        bench_model("tiny-moe", rm.preset("tiny-moe", num_nextn_predict_layers=0), 2, 64, device, dtype, False, out)
    else:
        bench_model("qwen2.5-0.5b", rm.preset("qwen2.5-0.5b"), 8, 2048, device, dtype, not a.no_compile, out)
        bench_model("moe-1b", rm.preset("moe-1b"), 8, 2048, device, dtype, not a.no_compile, out)
        bench_grouped_gemm(device, out)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
