"""Rollout throughput: r1lab's engine vs transformers' `generate`, same random bf16 weights, one GPU, one run.

    python benchmarks/rollout.py                      # H100, ~6-8 minutes
    python benchmarks/rollout.py --skip-hf --only 0.5b
    python benchmarks/rollout.py --quick --skip-hf    # CPU smoke run on tiny presets

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


def run_r1lab(model, case: dict, stop_rate: float, bandwidth: float, device) -> dict:
    args = model.args
    gen = torch.Generator().manual_seed(0)
    prompts, n = make_prompts(case, args.vocab_size, gen)
    stops: list[int] = []
    if case["kind"] == "grpo":
        stops = torch.randperm(args.vocab_size, generator=gen)[: max(1, round(args.vocab_size * stop_rate))].tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=case["new"], stop_token_ids=stops, n=n, seed=0)
    longest = max(map(len, prompts)) + case["new"]
    engine = Engine(model, num_slots=min(len(prompts) * n, 512), max_len=-(-longest // 64) * 64)
    warm_s, _ = wall(lambda: engine.generate(prompts, params), device)  # captures the CUDA graphs
    steps0 = engine.stats.decode_steps
    seconds, out = wall(lambda: engine.generate(prompts, params), device)
    steps = engine.stats.decode_steps - steps0
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
    del engine
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
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default 1 with --quick: tiny models gain nothing from more, and "
                             "oversubscribed cores make OpenMP spin)")
    opts = parser.parse_args()
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
            row = run_r1lab(model, case, opts.grpo_stop_rate, bandwidth, device)
            if hf_model is not None:
                try:
                    row.update(run_hf(hf_model, case, model.args.vocab_size, device))
                    row["speedup"] = row["r1lab_tok_s"] / row["hf_tok_s"]
                except Exception as err:  # keep the r1lab numbers of this run
                    row["hf_error"] = f"{type(err).__name__}: {err}"[:300]
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
    write_json(opts.out, dict(device=str(device), torch=torch.__version__, bandwidth_bytes_s=bandwidth,
                              total_s=time.perf_counter() - start, results=results))


if __name__ == "__main__":
    main()
