"""Rollout throughput: r1lab's engine vs transformers' `generate`, same random bf16 weights, one GPU, one run.

    python benchmarks/rollout.py                      # H100, ~6-8 minutes
    python benchmarks/rollout.py --skip-hf --only 0.5b
    python benchmarks/rollout.py --quick --skip-hf    # CPU smoke run on tiny presets
    python benchmarks/rollout.py --only "0.5b fixed" --variants base,fused_proj,fused_proj+decode_attn --repeats 3

--variants A/Bs the decode-path options of the Engine on every selected case (one row per variant; all
variants' engines are built and warmed first, then timed round-robin `--repeats` times, median reported):
  default                 the Engine's defaults (what runs without --variants)
  generic                 the model's own forward in the CUDA graphs (fast_decode=False)
  base                    fast_decode with both options below off
  fused_proj              + one GEMM for q|k|v and one for gate|up per layer
  decode_attn             + attention reading only each row's valid cache positions (Triton kernel)
  fused_proj+decode_attn  both
A variant that cannot run here (model not dense GQA, Triton missing, a kernel failing to compile) becomes a
row with an `error` and the others still run. Each variant row also reports a short greedy check against
the first variant (check_agree: share of equal tokens over 16 prompts x 32 tokens; check_lp: largest
log-prob difference at the first token), so a fast but wrong path shows.

Workloads (all sampling at temperature 1, no top-k/top-p):
- fixed: Qwen2.5-0.5B shape, batch 256, 128-token prompts, 512 new tokens, stops ignored (stop_token_ids=[]);
  the 1.5B shape and the MoE+MLA "moe-1b" preset likewise.
- grpo: 32 prompts of 50-200 tokens × n=16 samples, up to 512 new tokens. Random weights never emit a real
  EOS, so a random set of stop ids covering --grpo-stop-rate of the vocabulary plays EOS: lengths come out
  roughly geometric (reported), so continuous batching and batch shrinking matter.
HF runs are bounded in time: on the larger shapes and the GRPO load it generates fewer tokens (the table
says how many) and only its tokens/s is compared.

Roofline: a decode step must read the weights once and every running sequence's cached K/V; the fraction
is (steps × weight bytes + Σ K/V bytes of every sequence at every step) / copy bandwidth measured here,
over the measured time (prefill and logits traffic are not counted, so it is a slight overestimate of
the time an ideal engine needs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import r1lab.model as rm  # noqa: E402
from common import copy_bandwidth, print_table, wall, write_json  # noqa: E402
from r1lab.rollout import Engine, SamplingParams  # noqa: E402

FULL = [
    dict(name="0.5b fixed", preset="qwen2.5-0.5b", kind="fixed", batch=256, prompt=128, new=512,
         hf=dict(batch=256, new=512)),
    dict(name="0.5b grpo", preset="qwen2.5-0.5b", kind="grpo", prompts=32, n=16, prompt_range=(50, 200), new=512,
         hf=dict(prompts=8, n=16, new=128)),
    dict(name="1.5b fixed", preset="qwen2.5-1.5b", kind="fixed", batch=256, prompt=128, new=512,
         hf=dict(batch=256, new=64)),
    dict(name="moe-1b fixed", preset="moe-1b", kind="fixed", batch=256, prompt=128, new=512,
         hf=dict(batch=64, new=16)),
]
QUICK = [
    dict(name="tiny-dense fixed", preset="tiny-dense", kind="fixed", batch=16, prompt=32, new=64,
         hf=dict(batch=16, new=64)),
    dict(name="tiny-dense grpo", preset="tiny-dense", kind="grpo", prompts=4, n=4, prompt_range=(10, 30), new=64,
         hf=dict(prompts=4, n=4, new=32)),
    dict(name="tiny-moe fixed", preset="tiny-moe", kind="fixed", batch=16, prompt=32, new=64,
         hf=dict(batch=16, new=16)),
]


def make_prompts(case: dict, vocab: int, gen: torch.Generator, hf: bool = False) -> tuple[list[list[int]], int]:
    """(prompts, n) for r1lab, or the bounded HF workload when hf=True."""
    spec = case["hf"] if hf else case
    if case["kind"] == "fixed":
        return [torch.randint(0, vocab, (case["prompt"],), generator=gen).tolist() for _ in range(spec["batch"])], 1
    lo, hi = case["prompt_range"]
    lengths = torch.randint(lo, hi + 1, (spec["prompts"],), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths], spec["n"]


FEATURES = {"fused_proj": "fused_proj", "decode_attn": "decode_attention"}


def parse_variant(name: str) -> dict:
    """Engine options of a variant name (see the module docstring); ValueError for unknown names."""
    if name == "default":
        return {}
    if name == "generic":
        return dict(fast_decode=False)
    options = dict(fast_decode=True, fused_proj=False, decode_attention=False)
    for token in name.split("+"):
        if token == "base":
            continue
        if token not in FEATURES:
            raise ValueError(f"unknown variant {name!r} (token {token!r}); use default, generic, or base / "
                             f"{' / '.join(FEATURES)} joined with '+'")
        options[FEATURES[token]] = True
    return options


def variant_problem(engine, options: dict) -> str | None:
    """Why an engine built with `options` does not run the requested decode path, or None."""
    if options.get("fast_decode") and engine.fast is None:
        return "the fused decode path does not support this model (dense GQA + SwiGLU only)"
    if engine.fast is None:
        return None
    if options.get("fused_proj") and engine.fast.fused is None:
        return "fused projections were requested but are off"
    if options.get("decode_attention") and engine.device.type == "cuda" and not engine.fast.attention_kernel:
        if engine.fast.attention_error:
            return f"the decode attention kernel failed: {engine.fast.attention_error}"
        return "decode_attn needs Triton on CUDA (pip install triton); only its slow torch twin is available"
    return None


def greedy_check(engine, vocab: int) -> list:
    prompts = [torch.randint(0, vocab, (40 + 3 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(16)]
    return engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=32, stop_token_ids=[]))


def run_r1lab(model, case: dict, stop_rate: float, bandwidth: float, device, variants: list[str] | None = None,
              repeats: int = 1) -> list[dict]:
    """One row per variant (None: the Engine's defaults, one row named like the case)."""
    args = model.args
    gen = torch.Generator().manual_seed(0)
    prompts, n = make_prompts(case, args.vocab_size, gen)
    stops: list[int] = []
    if case["kind"] == "grpo":
        stops = torch.randperm(args.vocab_size, generator=gen)[: max(1, round(args.vocab_size * stop_rate))].tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=case["new"], stop_token_ids=stops, n=n, seed=0)
    longest = max(map(len, prompts)) + case["new"]
    named = variants is not None
    engines: dict[str, tuple] = {}
    rows: dict[str, dict] = {}
    for name in variants or ["default"]:
        label = f"{case['name']} [{name}]" if named else case["name"]
        options = parse_variant(name)
        try:
            max_len = -(-longest // 64) * 64
            if named:  # room for greedy_check's prompts (up to 85 tokens + 32 new)
                max_len = max(max_len, 128)
            engine = Engine(model, num_slots=min(len(prompts) * n, 512), max_len=max_len, **options)
            problem = variant_problem(engine, options)
            if problem:
                raise RuntimeError(problem)
            warm_s, _ = wall(lambda: engine.generate(prompts, params), device)  # captures the CUDA graphs
            problem = variant_problem(engine, options)  # e.g. the attention kernel failed and fell back to SDPA
            if problem:
                raise RuntimeError(problem)
            engines[name] = (engine, warm_s, label)
        except Exception as err:  # keep the other variants of this run
            rows[name] = dict(case=label, model=case["preset"], variant=name if named else None,
                              error=f"{type(err).__name__}: {err}"[:300])
            print(f"variant {name} of {case['name']}: {rows[name]['error']}", flush=True)
            engine = None
            gc.collect()
    timings: dict[str, list] = {name: [] for name in engines}
    for _ in range(repeats):  # round-robin, so drift (clocks, temperature) hits every variant alike
        for name, (engine, _, _) in engines.items():
            steps0 = engine.stats.decode_steps
            seconds, out = wall(lambda: engine.generate(prompts, params), device)
            timings[name].append((seconds, out, engine.stats.decode_steps - steps0))
    checks = {name: greedy_check(engine, args.vocab_size) for name, (engine, _, _) in engines.items()} if named else {}
    reference = next(iter(checks.values()), None)
    for name, (engine, warm_s, label) in engines.items():
        runs = sorted(timings[name], key=lambda r: r[0])
        seconds, out, steps = runs[len(runs) // 2]
        row = _r1lab_row(model, case, engine, prompts, out, seconds, steps, warm_s, bandwidth, device)
        row["case"] = label
        if named:
            row["variant"] = name
            row["r1lab_best_tok_s"] = row["r1lab_tokens"] / runs[0][0]
            row["repeats"] = len(runs)
            ours = checks[name]
            same = [a == b for c, r in zip(ours, reference) for a, b in zip(c.token_ids, r.token_ids)]
            row["check_agree"] = sum(same) / len(same)
            row["check_lp"] = max((abs(c.logprobs[0] - r.logprobs[0]) for c, r in zip(ours, reference)
                                   if c.token_ids[0] == r.token_ids[0]), default=float("nan"))
        rows[name] = row
    engines.clear()
    return [rows[name] for name in variants or ["default"]]


def _r1lab_row(model, case, engine, prompts, out, seconds, steps, warm_s, bandwidth, device) -> dict:
    args = model.args
    lengths = [len(c.token_ids) for c in out]
    tokens = sum(lengths)
    kv_per_token = rm.KVCache.bytes_per_token(args, engine.cache.layers[0].dtype)
    kv_bytes = sum((len(prompts[c.prompt_index]) * k + k * (k - 1) // 2) * kv_per_token
                   for c, k in zip(out, lengths))
    mtp = {id(p) for p in model.mtp.parameters()}  # MTP modules are never run by the engine
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                       if id(p) not in mtp)
    roofline_s = (steps * weight_bytes + kv_bytes) / bandwidth
    result = dict(
        case=case["name"], model=case["preset"], sequences=len(out), r1lab_tokens=tokens,
        r1lab_s=seconds, r1lab_tok_s=tokens / seconds, warmup_s=warm_s, steps=steps, tokens_per_step=tokens / max(steps, 1),
        roofline_frac=roofline_s / seconds, graphs=engine.graphs.captures if engine.graphs else 0,
        graph_fallback=engine.graphs.failed if engine.graphs else None,
        len_mean=statistics.mean(lengths), len_p50=statistics.median(lengths),
        len_capped=sum(k == case["new"] for k in lengths) / len(lengths),
    )
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_hf(hf_model, case: dict, vocab: int, device) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts, n = make_prompts(case, vocab, gen, hf=True)
    new = case["hf"]["new"]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                   num_return_sequences=n, pad_token_id=0)
    with torch.inference_mode():
        hf_model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], **{**options, "max_new_tokens": 4,
                                                                          "min_new_tokens": 4, "num_return_sequences": 1})
        seconds, out = wall(lambda: hf_model.generate(ids, attention_mask=mask, **options), device)
    tokens = (out.shape[1] - width) * out.shape[0]
    return dict(hf_tokens=tokens, hf_s=seconds, hf_tok_s=tokens / seconds,
                hf_workload=f"{len(prompts)}x{n} seqs, {new} new")


def load_hf(model, device, dtype):
    import transformers

    with tempfile.TemporaryDirectory(prefix="r1lab_bench_") as folder:
        rm.save(model, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny presets, small sizes (CPU smoke run)")
    parser.add_argument("--skip-hf", action="store_true", help="time r1lab only")
    parser.add_argument("--only", default="", help="run only cases whose name contains this string")
    parser.add_argument("--grpo-stop-rate", type=float, default=1 / 256, help="vocabulary share used as stop ids")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--variants", default=None,
                        help="comma-separated decode-path variants to A/B, e.g. base,fused_proj,fused_proj+decode_attn "
                             "(see above); default: one run with the Engine's defaults")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed generate calls per variant, median reported (default 1, or 3 with --variants)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default 1 with --quick: tiny models gain nothing from more, and "
                             "oversubscribed cores make OpenMP spin)")
    opts = parser.parse_args()
    variants = [v.strip() for v in opts.variants.split(",") if v.strip()] if opts.variants else None
    if variants is not None:
        try:
            for v in variants:
                parse_variant(v)
        except ValueError as err:
            parser.error(str(err))
        if not variants or len(set(variants)) != len(variants):
            parser.error("--variants needs distinct, non-empty names")
    repeats = opts.repeats or (3 if variants else 1)
    if opts.threads or opts.quick:
        torch.set_num_threads(opts.threads or 1)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [c for c in (QUICK if opts.quick else FULL) if opts.only in c["name"]]
    bandwidth = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    results, start = [], time.perf_counter()
    for preset in dict.fromkeys(c["preset"] for c in cases):
        model = rm.build(rm.preset(preset), seed=0, dtype=dtype, device=device).eval()
        hf_model = None
        if not opts.skip_hf:
            try:
                hf_model = load_hf(model, device, dtype)
            except Exception as err:
                print(f"transformers could not load {preset}: {type(err).__name__}: {err}", flush=True)
        for case in (c for c in cases if c["preset"] == preset):
            rows = run_r1lab(model, case, opts.grpo_stop_rate, bandwidth, device, variants, repeats)
            if hf_model is not None:
                try:
                    hf = run_hf(hf_model, case, model.args.vocab_size, device)
                    for row in rows:
                        row.update(hf)
                        if "r1lab_tok_s" in row:
                            row["speedup"] = row["r1lab_tok_s"] / row["hf_tok_s"]
                except Exception as err:  # keep the r1lab numbers of this run
                    for row in rows:
                        row["hf_error"] = f"{type(err).__name__}: {err}"[:300]
            first = next((r for r in rows if "r1lab_tok_s" in r), None)
            for row in rows:
                if variants and first is not None and "r1lab_tok_s" in row:
                    row["vs_first"] = row["r1lab_tok_s"] / first["r1lab_tok_s"]
                results.append(row)
                print(f"[{time.perf_counter() - start:6.1f}s] {row}", flush=True)
        del model, hf_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    print()
    print_table(results, [("case", ""), ("sequences", "d"), ("r1lab_tokens", "d"), ("r1lab_tok_s", ",.0f"),
                          ("roofline_frac", ".2f"), ("tokens_per_step", ".0f"), ("len_mean", ".0f"), ("len_capped", ".2f"),
                          ("warmup_s", ".1f"), ("graphs", "d"), ("hf_tok_s", ",.0f"), ("speedup", ".1f"),
                          ("hf_workload", "")])
    if variants:
        print()
        print_table(results, [("case", ""), ("r1lab_tok_s", ",.0f"), ("r1lab_best_tok_s", ",.0f"), ("vs_first", ".3f"),
                              ("speedup", ".1f"), ("repeats", "d"), ("check_agree", ".3f"), ("check_lp", ".4f"),
                              ("error", "")])
    write_json(opts.out, dict(device=str(device), torch=torch.__version__, bandwidth_bytes_s=bandwidth,
                              total_s=time.perf_counter() - start, variants=variants, repeats=repeats, results=results))


if __name__ == "__main__":
    main()
