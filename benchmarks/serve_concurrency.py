"""Does the HTTP server batch concurrent requests? Completion tokens/s of N concurrent streaming chat requests
vs the same N requests sent one at a time, through the real server (uvicorn on 127.0.0.1, official openai
client, SSE streaming) in one process.

    python benchmarks/serve_concurrency.py --quick                    # CPU, tiny random model, < 1 minute
    python benchmarks/serve_concurrency.py --device cuda --model qwen2.5-0.5b --tokenizer .whl/qwen_tok \\
        --out serve.json                                              # GPU: Qwen2.5-0.5B shape, ~2 minutes
    python benchmarks/serve_concurrency.py --model path/to/hf_folder  # a real checkpoint (with its tokenizer)

--model is an HF folder or the name of an r1lab preset (r1lab.model.PRESETS), whose weights are then random.
A preset is paired with --tokenizer (an HF tokenizer folder, e.g. Qwen2.5's tokenizer.json +
tokenizer_config.json; the model keeps the preset's vocabulary, ids past the tokenizer's decode to nothing),
or without one with a small BPE trained on the fly, the model's vocabulary then set to the tokenizer's (so
every sampled id decodes to text and the server streams a chunk per token, as with a real model). Random
weights rarely sample EOS, so nearly every request runs to --max-tokens; tokens are counted from the
server's `usage`, not assumed.

Warm-up (--warmup): by default on CUDA a full concurrent pass and one full single request run first,
unmeasured, so CUDA-graph captures and allocator growth are billed to neither measured pass; on CPU one short
request does.
Bounded runtime: the sequential pass stops after --sequential-seconds (its rate is measured over the
requests it finished), and every request has a client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def build_model(args) -> tuple[object, object, str]:
    """(model, tokenizer, label) from --model: an HF folder, or a preset with random weights."""
    import r1lab.model as rm
    from r1lab.serve import build_random_checkpoint, load_model_and_tokenizer
    from r1lab.tokenizer import load_tokenizer

    cuda = args.device.startswith("cuda")
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if cuda else None)
    if args.model not in rm.PRESETS:
        if not args.tokenizer:
            model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
        else:
            model = rm.load(args.model, dtype=dtype, device=args.device).eval()
            tokenizer = load_tokenizer(args.tokenizer)
        return model, tokenizer, str(args.model)

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        vocab = max(rm.PRESETS[args.model].get("vocab_size", 0), tokenizer.vocab_size)
        source = f"tokenizer {Path(args.tokenizer).name}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _, tokenizer = load_model_and_tokenizer(build_random_checkpoint(Path(tmp) / "tiny"))
        vocab = tokenizer.vocab_size
        source = "tiny BPE tokenizer"
    model = rm.build(rm.preset(args.model, vocab_size=vocab, eos_token_id=tokenizer.eos_id),
                     dtype=dtype, device=args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    label = (f"{args.model} (random weights, {params / 1e6:.1f}M params, {str(model.lm_head.weight.dtype)[6:]}, "
             f"vocab {vocab}, {source})")
    return model, tokenizer, label


async def one_request(client, model_name: str, i: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    finish = None
    stream = await client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": f"Request {i}: what is {i} + {i}?"}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, seed=i)
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            if first is None and (delta.content or getattr(delta, "reasoning_content", None)):
                first = time.perf_counter() - start
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    if usage is None or finish is None:
        raise RuntimeError(f"request {i} ended without a finish_reason or usage")
    return {"tokens": usage.completion_tokens, "latency": time.perf_counter() - start, "ttft": first,
            "finish_reason": finish}


def summarize(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"requests": len(results), "seconds": round(seconds, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in results))}


async def run(base_url: str, model_name: str, n: int, max_tokens: int, sequential_budget: float,
              full_warmup: bool, engine_stats) -> dict:
    """Warm-up, then the concurrent pass, then the sequential one. engine_stats() reads the engine's
    (decode steps, decode rows), so each pass reports its own mean decode batch."""
    import openai

    def decode_batch(before: tuple[int, int]) -> dict:
        (steps, rows), (steps_before, rows_before) = engine_stats(), before
        steps, rows = steps - steps_before, rows - rows_before
        return {"decode_steps": steps, "mean_decode_batch": round(rows / max(steps, 1), 1)}

    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        if full_warmup:  # every batch size and KV length the measured passes will see
            await asyncio.gather(*(one_request(client, model_name, -1 - i, max_tokens) for i in range(n)))
            await one_request(client, model_name, -1, max_tokens)
        else:
            await one_request(client, model_name, -1, 4)  # engine allocation, first kernels
        warmup_s = time.perf_counter() - start
        print(f"warm-up done in {warmup_s:.1f} s", flush=True)

        before, start = engine_stats(), time.perf_counter()
        concurrent = await asyncio.gather(*(one_request(client, model_name, i, max_tokens) for i in range(n)))
        concurrent_s = time.perf_counter() - start
        concurrent_engine = decode_batch(before)
        print(f"concurrent pass done in {concurrent_s:.1f} s", flush=True)

        sequential, before, start = [], engine_stats(), time.perf_counter()
        for i in range(n):
            sequential.append(await one_request(client, model_name, i, max_tokens))
            if time.perf_counter() - start > sequential_budget:
                break
        sequential_s = time.perf_counter() - start
        sequential_engine = decode_batch(before)
    return {"warmup_seconds": round(warmup_s, 1),
            "concurrent": {**summarize(concurrent, concurrent_s), **concurrent_engine},
            "sequential": {**summarize(sequential, sequential_s), **sequential_engine}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder or r1lab preset name (random weights); default tiny-dense on "
                        "CPU, qwen2.5-0.5b on CUDA")
    parser.add_argument("--preset", help=argparse.SUPPRESS)  # the old spelling of --model PRESET
    parser.add_argument("--tokenizer", help="HF tokenizer folder (tokenizer.json): pairs with a preset, or "
                        "replaces a model folder's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                        help="auto: bfloat16 on CUDA, the checkpoint's (or float32) on CPU")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (default 64 CPU / 256 CUDA)")
    parser.add_argument("--sequential-seconds", type=float, default=None,
                        help="time budget of the one-at-a-time pass (default 45 CUDA / 60 CPU / 30 --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU torch threads (default: cores - 1, leaving one to the HTTP event loop)")
    parser.add_argument("--warmup", choices=["short", "full"], default=None,
                        help="full: one unmeasured run of both passes' shapes first (default on CUDA); short: one "
                        "4-token request (default on CPU)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 32 tokens per request, 30 s budget")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()

    began = time.perf_counter()
    cuda = args.device.startswith("cuda")
    args.model = args.model or args.preset or ("qwen2.5-0.5b" if cuda else "tiny-dense")
    max_tokens = args.max_tokens or (32 if args.quick else 256 if cuda else 64)
    budget = args.sequential_seconds or (30 if args.quick else 45 if cuda else 60)
    full_warmup = (args.warmup or ("full" if cuda else "short")) == "full"
    if not cuda:  # an oversubscribed CPU makes every torch op wait on spinning threads
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))

    from r1lab.serve.server import BackgroundServer, create_app

    model, tokenizer, label = build_model(args)
    max_len = min(model.args.max_position_embeddings, 512 if not cuda else 2048)
    app = create_app(model, tokenizer, model_name="bench", max_model_len=max_len,
                     max_num_seqs=max(args.requests, 1))
    worker = app.state.server.worker

    def engine_stats() -> tuple[int, int]:
        stats = worker.engine.stats  # the worker's current engine (it is rebuilt after a failed step)
        return stats.decode_steps, stats.decode_rows

    with BackgroundServer(app) as server:
        results = asyncio.run(run(server.base_url, "bench", args.requests, max_tokens, budget, full_warmup=full_warmup,
                                  engine_stats=engine_stats))
    c, s = results["concurrent"], results["sequential"]
    if c["requests"] != args.requests:
        raise RuntimeError(f"only {c['requests']} of {args.requests} concurrent requests completed")
    ratio = c["tokens_per_s"] / s["tokens_per_s"]
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    payload = {"benchmark": "serve_concurrency", "device": device, "torch": torch.__version__, "model": label,
               "requests": args.requests, "max_tokens": max_tokens, "max_model_len": max_len,
               "sequential_budget_s": budget, **results, "concurrency_speedup": round(ratio, 2),
               "engine_failures": worker.failures, "wall_seconds": round(time.perf_counter() - began, 1)}
    print(f"device {device}; model {label}; {args.requests} streaming chat requests x {max_tokens} max tokens")
    print(f"concurrent: {c['tokens_per_s']:>9.1f} tok/s  ({c['requests']} requests, {c['completion_tokens']} tokens "
          f"in {c['seconds']} s, TTFT p50 {c['ttft_p50_s']} s, mean decode batch {c['mean_decode_batch']}, "
          f"finish {c['finish_reasons']})")
    print(f"sequential: {s['tokens_per_s']:>9.1f} tok/s  ({s['requests']} requests, {s['completion_tokens']} tokens "
          f"in {s['seconds']} s, TTFT p50 {s['ttft_p50_s']} s)")
    print(f"speedup from batching concurrent requests: {ratio:.1f}x  (whole run {payload['wall_seconds']} s, "
          f"warm-up {results['warmup_seconds']} s)")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
