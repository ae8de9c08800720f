"""Does the HTTP server batch concurrent requests? Completion tokens/s of N concurrent streaming chat requests
vs the same N requests sent one at a time, through the real server (uvicorn on 127.0.0.1, official openai
client, SSE streaming) in one process.

    python benchmarks/serve_concurrency.py --quick                    # CPU, tiny random model, ~1 minute
    python benchmarks/serve_concurrency.py --device cuda --out serve.json   # GPU: a Qwen2.5-0.5B-shaped model
    python benchmarks/serve_concurrency.py --model path/to/hf_folder  # a real checkpoint (with its tokenizer)

Without --model the weights are random and the tokenizer is a small BPE trained on the fly; the model's
vocabulary is set to the tokenizer's (so every sampled id decodes to text and the server streams a chunk
per token, as with a real model). Random weights rarely sample EOS, so most requests run to max_tokens;
tokens are counted from the server's `usage`, not assumed.

Bounded runtime: the sequential pass stops after --sequential-seconds (its rate is measured over the
requests it finished), and every request has a client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
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


def build_model(args) -> tuple[object, object, str]:
    """(model, tokenizer, label) from --model, or random weights of --preset with a fresh tiny tokenizer."""
    from r1lab.serve import build_random_checkpoint, load_model_and_tokenizer

    if args.model:
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
        return model, tokenizer, str(args.model)
    import r1lab.model as rm

    with tempfile.TemporaryDirectory() as tmp:
        _, tokenizer = load_model_and_tokenizer(build_random_checkpoint(Path(tmp) / "tiny"))
    dtype = torch.bfloat16 if args.device == "cuda" else None
    model = rm.build(rm.preset(args.preset, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id),
                     dtype=dtype, device=args.device).eval()
    return model, tokenizer, f"{args.preset} (random weights, vocab {tokenizer.vocab_size})"


async def one_request(client, model_name: str, i: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": f"Request {i}: what is {i} + {i}?"}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, seed=i)
    async for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content
                                                or getattr(chunk.choices[0].delta, "reasoning_content", None)):
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    return {"tokens": usage.completion_tokens, "latency": time.perf_counter() - start, "ttft": first}


def summarize(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"requests": len(results), "seconds": round(seconds, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None}


async def run(base_url: str, model_name: str, n: int, max_tokens: int, sequential_budget: float) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600) as client:
        await one_request(client, model_name, -1, 4)  # warm-up: engine allocation, first kernels
        start = time.perf_counter()
        concurrent = await asyncio.gather(*(one_request(client, model_name, i, max_tokens) for i in range(n)))
        concurrent_s = time.perf_counter() - start

        sequential, start = [], time.perf_counter()
        for i in range(n):
            sequential.append(await one_request(client, model_name, i, max_tokens))
            if time.perf_counter() - start > sequential_budget:
                break
        sequential_s = time.perf_counter() - start
    return {"concurrent": summarize(concurrent, concurrent_s), "sequential": summarize(sequential, sequential_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder with tokenizer (default: random weights of --preset)")
    parser.add_argument("--preset", default=None, help="model shape when no --model (default: tiny-dense on CPU, "
                        "qwen2.5-0.5b on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (default 64 CPU / 256 CUDA)")
    parser.add_argument("--sequential-seconds", type=float, default=None,
                        help="time budget of the one-at-a-time pass (default 60 CPU / 120 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU torch threads (default: cores - 1, leaving one to the HTTP event loop)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 32 tokens per request, 30 s budget")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("qwen2.5-0.5b" if cuda else "tiny-dense")
    max_tokens = args.max_tokens or (32 if args.quick else 256 if cuda else 64)
    budget = args.sequential_seconds or (30 if args.quick else 120 if cuda else 60)
    if not cuda:  # an oversubscribed CPU makes every torch op wait on spinning threads
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))

    from r1lab.serve.server import BackgroundServer, create_app

    model, tokenizer, label = build_model(args)
    max_len = min(model.args.max_position_embeddings, 512 if not cuda else 2048)
    app = create_app(model, tokenizer, model_name="bench", max_model_len=max_len,
                     max_num_seqs=max(args.requests, 1))
    with BackgroundServer(app) as server:
        results = asyncio.run(run(server.base_url, "bench", args.requests, max_tokens, budget))
        stats = app.state.server.worker.engine.stats
    ratio = results["concurrent"]["tokens_per_s"] / results["sequential"]["tokens_per_s"]
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    payload = {"benchmark": "serve_concurrency", "device": device, "model": label, "requests": args.requests,
               "max_tokens": max_tokens, **results, "concurrency_speedup": round(ratio, 2),
               "engine": {"decode_steps": stats.decode_steps, "mean_decode_batch":
                          round(stats.decode_rows / max(stats.decode_steps, 1), 1)}}
    c, s = results["concurrent"], results["sequential"]
    print(f"device {device}; model {label}; {args.requests} streaming chat requests x {max_tokens} max tokens")
    print(f"concurrent: {c['tokens_per_s']:>9.1f} tok/s  ({c['completion_tokens']} tokens in {c['seconds']} s, "
          f"TTFT p50 {c['ttft_p50_s']} s)")
    print(f"sequential: {s['tokens_per_s']:>9.1f} tok/s  ({s['requests']} requests, {s['completion_tokens']} tokens "
          f"in {s['seconds']} s, TTFT p50 {s['ttft_p50_s']} s)")
    print(f"speedup from batching concurrent requests: {ratio:.1f}x")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
