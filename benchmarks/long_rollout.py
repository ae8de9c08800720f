"""Long rollouts: the paged vs the slotted KV cache at the same KV memory budget (issue 16's probe).

    python benchmarks/long_rollout.py                                  # GPU: both caches × 1024/8192/32768 new
    python benchmarks/long_rollout.py --max-new-tokens 32768 --cache paged --out long.json
    python benchmarks/long_rollout.py --tiny                           # CPU smoke run on the tiny preset

Workload: the Qwen2.5-1.5B shape with random bf16 weights, 32 prompts of 200 tokens × 16 samples, temperature
1. Random weights never emit a real EOS, so a random stop set of vocab_size / --mean-length ids plays EOS: the
lengths come out roughly geometric with mean ~--mean-length, capped at max_new_tokens (reported: len_mean,
len_capped = the share that hit the cap).

Both caches get the same --kv-gib. Slotted: every slot has 200 + max_new_tokens positions, so the budget fixes
the concurrent sequences at budget / slot size (at most 512), whatever their actual lengths. Paged: the budget
becomes blocks of --block-size positions; up to --rows sequences (default: all of them, at most 512, as many
as the slotted engine may have) decode at once, each holding the blocks it has filled; when the pool runs out
the newest are preempted and recomputed later.

Printed (stdout, JSON; progress goes to stderr): per (cache, max_new_tokens) tokens, seconds, tok_per_s,
mean_concurrency (sequences decoded per step: generated tokens / decode steps), mean_batch (decode rows per
step, idle rows of the graph bucket included), peak_gib (most GPU memory allocated during the run), and
roofline_fraction: (decode steps × weight bytes + the K/V bytes of every sequence's context at every step) /
--bandwidth, over the measured time; prefill and logits traffic are not counted. Paged rows add
preemptions, peak_blocks and shared_prompt_blocks. The engines warm up on a short generate first (Triton
compiles); CUDA graphs of new (batch, kv_len) buckets are still captured during the measured run (`graphs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import r1lab.model as rm  # noqa: E402
from r1lab.rollout import Engine, SamplingParams  # noqa: E402

H100_SXM_BANDWIDTH = 3.35e12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny-dense preset, fp32 on CPU, small workload")
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--cache", nargs="+", choices=["paged", "slotted"], default=["paged", "slotted"])
    parser.add_argument("--kv-gib", type=float, help="KV cache budget of each engine (default 20; tiny: 4 slots)")
    parser.add_argument("--rows", type=int,
                        help="paged: most sequences decoded at once (default: every sample, at most 512)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--mean-length", type=float, default=1800, help="mean of the geometric lengths")
    parser.add_argument("--bandwidth", type=float, default=H100_SXM_BANDWIDTH,
                        help="memory bandwidth of the roofline, B/s (default: H100 SXM's 3.35e12)")
    parser.add_argument("--out", help="also write the JSON here")
    opts = parser.parse_args(argv)
    if opts.tiny:
        opts.prompts, opts.samples, opts.prompt_len = 4, 4, 20
        opts.mean_length = min(opts.mean_length, 12)
        opts.block_size = min(opts.block_size, 4)
    opts.rows = opts.rows or min(opts.prompts * opts.samples, 512)
    return opts


def build_model(tiny: bool) -> rm.Transformer:
    if tiny:
        return rm.build(rm.preset("tiny-dense", initializer_range=0.2), seed=0).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return rm.build(rm.preset("qwen2.5-1.5b"), seed=0, dtype=torch.bfloat16, device=device).eval()


def workload(args: rm.ModelArgs, opts) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab_size, (opts.prompt_len,), generator=gen).tolist()
               for _ in range(opts.prompts)]
    stops = torch.randperm(args.vocab_size, generator=gen)[: max(1, round(args.vocab_size / opts.mean_length))]
    return prompts, stops.tolist()


def run_one(model, cache: str, max_new: int, opts, prompts, stops) -> dict:
    args, device = model.args, model.lm_head.weight.device
    per_token = rm.KVCache.bytes_per_token(args, model.lm_head.weight.dtype)
    max_len = opts.prompt_len + max_new
    budget = int(opts.kv_gib * 2**30) if opts.kv_gib else (4 * max_len * per_token if opts.tiny else 20 << 30)
    if cache == "paged":
        engine = Engine(model, paged=True, block_size=opts.block_size, kv_cache_bytes=budget, num_slots=opts.rows,
                        max_len=max_len)
    else:
        engine = Engine(model, kv_cache_bytes=budget, max_len=max_len)
    engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=16, n=2, stop_token_ids=[], seed=1))
    before = dataclasses.replace(engine.stats)
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, stop_token_ids=stops, n=opts.samples, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = engine.stats
    steps = stats.decode_steps - before.decode_steps
    lengths = [len(c.token_ids) for c in out]
    tokens = sum(lengths)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    # a sequence of k tokens reads its prompt and the tokens before each new one: P·k + k(k-1)/2 positions
    kv_bytes = sum(opts.prompt_len * k + k * (k - 1) // 2 for k in lengths) * per_token
    row = dict(
        cache=cache, max_new_tokens=max_new, kv_budget_gib=budget / 2**30, rows=engine.num_slots,
        sequences=len(out), tokens=tokens, seconds=seconds, tok_per_s=tokens / seconds, decode_steps=steps,
        mean_concurrency=tokens / max(steps, 1), mean_batch=(stats.decode_rows - before.decode_rows) / max(steps, 1),
        roofline_fraction=(steps * weight_bytes + kv_bytes) / opts.bandwidth / seconds,
        len_mean=statistics.mean(lengths), len_max=max(lengths),
        len_capped=sum(k == max_new for k in lengths) / len(lengths),
        prefill_tokens=stats.prefill_tokens - before.prefill_tokens,
        graphs=engine.graphs.captures if engine.graphs else 0,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    if cache == "paged":
        row.update(block_size=opts.block_size, num_blocks=engine.blocks.num_blocks,
                   preemptions=stats.preemptions - before.preemptions, peak_blocks=stats.peak_blocks,
                   shared_prompt_blocks=stats.shared_prompt_blocks - before.shared_prompt_blocks)
    return row


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    model = build_model(opts.tiny)
    prompts, stops = workload(model.args, opts)
    runs = []
    for max_new in opts.max_new_tokens:
        for cache in opts.cache:
            print(f"{cache} cache, max_new_tokens {max_new} ...", file=sys.stderr, flush=True)
            runs.append(run_one(model, cache, max_new, opts, prompts, stops))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            gc.collect()  # free this engine's cache before the next one allocates its own
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    device = model.lm_head.weight.device
    result = dict(
        model="tiny-dense" if opts.tiny else "qwen2.5-1.5b (random bf16 weights)",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        prompts=opts.prompts, samples=opts.samples, prompt_len=opts.prompt_len, stop_ids=len(stops),
        bandwidth=opts.bandwidth, runs=runs,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)
    return result


if __name__ == "__main__":
    main()
