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

Clients: by default (--client-procs 0) the openai client runs in the server's process, on the main thread's
event loop, so its parsing of every SSE event shares the GIL with the server and the engine thread (the way
this benchmark always ran). --client-procs N runs the requests from N spawned processes instead, each with its
own openai client and event loop (the concurrent pass spread round-robin over them, the sequential pass in the
first), so the server is measured without the client's CPU in its process. The JSON says which ran
("client"). --ignore-eos drops the stop tokens (as vLLM's ignore_eos), so every request runs to --max-tokens
and passes stay comparable (a random tiny-BPE model otherwise samples EOS every few hundred tokens).
--stand-in-ms X replaces the rollout engine by a stand-in whose decode step waits X ms with the GIL released
(as the host does while a GPU step runs) and gives every running sample a random token id: a CPU run then
measures the server's own cost per step and per token, as on a GPU, without the model's CPU compute (the
rollout engine alone decodes 256 rows of Qwen2.5-0.5B in ~2.2 ms per step on an H200, so X=2 is close).
Reported per pass besides tok/s: ms per decode step (pass seconds / decode steps) and the SSE events a
request received with text, and tokens per such event (above 1 when the server merged several steps'
tokens into one event because its event loop was behind the engine).
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
import traceback
from pathlib import Path

# (torch and r1lab are imported where used: client processes re-import this module and need neither)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

_DTYPES = ["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"]


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name) or getattr(torch, name)


class _NoStopTokenizer:
    """The tokenizer as the server sees it under --ignore-eos: no stop ids (everything else passes through)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    @property
    def stop_ids(self) -> list[int]:
        return []


def build_model(args) -> tuple[object, object, str]:
    """(model, tokenizer, label) from --model: an HF folder, or a preset with random weights."""
    model, tokenizer, label = _build_model(args)
    if args.ignore_eos:
        model.args.eos_token_id = None
        tokenizer = _NoStopTokenizer(tokenizer)
        label += ", EOS ignored"
    return model, tokenizer, label


def _build_model(args) -> tuple[object, object, str]:
    import torch

    import r1lab.model as rm
    from r1lab.model import load_model_and_tokenizer
from r1lab.testing import build_random_checkpoint
    from r1lab.tokenizer import load_tokenizer

    cuda = args.device.startswith("cuda")
    dtype = _torch_dtype(args.dtype) if args.dtype != "auto" else (torch.bfloat16 if cuda else None)
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


class StandInEngine:
    """The rollout Engine's streaming interface (add_request / step / abort / has_unfinished / stats) without a
    model: continuous batching over `num_slots` rows; each step sleeps `step_s` (GIL released) and samples
    one uniformly random token id per running sample."""

    def __init__(self, vocab_size: int, num_slots: int, step_s: float) -> None:
        import random

        from r1lab.rollout import EngineStats

        self.vocab_size, self.num_slots, self.step_s = vocab_size, num_slots, step_s
        self.random = random.Random(0)
        self.stats = EngineStats()
        self.waiting: collections.deque = collections.deque()
        self.running: list[list] = []  # [request id, sample, tokens left, stop ids]
        self.requests: dict[int, int] = {}  # request id → unfinished samples
        self.next_id = 0

    def add_request(self, prompt: list[int], params) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        stop = frozenset(params.stop_token_ids or ())
        self.waiting.extend([rid, i, params.max_new_tokens, stop] for i in range(params.n))
        self.requests[rid] = params.n
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, rid: int) -> None:
        if self.requests.pop(rid, None) is not None:
            self.waiting = collections.deque(s for s in self.waiting if s[0] != rid)
            self.running = [s for s in self.running if s[0] != rid]

    def step(self) -> list:
        from r1lab.rollout import StreamEvent

        while self.waiting and len(self.running) < self.num_slots:
            self.running.append(self.waiting.popleft())
        time.sleep(self.step_s)
        events, still = [], []
        for row in self.running:
            rid, sample, left, stop = row
            token = self.random.randrange(self.vocab_size)
            row[2] = left = left - 1
            reason = "stop" if token in stop else "length" if left <= 0 else None
            events.append(StreamEvent(rid, sample, [token], [0.0], reason is not None, reason))
            if reason is None:
                still.append(row)
            else:
                self.requests[rid] -= 1
                if not self.requests[rid]:
                    del self.requests[rid]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(self.running)
        self.running = still
        return events


async def one_request(client, model_name: str, i: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    finish = None
    stream = await client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": f"Request {i}: what is {i} + {i}?"}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, seed=i)
    events = 0  # SSE events carrying text
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content or getattr(delta, "reasoning_content", None):
                events += 1
                if first is None:
                    first = time.perf_counter() - start
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    if usage is None or finish is None:
        raise RuntimeError(f"request {i} ended without a finish_reason or usage")
    return {"tokens": usage.completion_tokens, "latency": time.perf_counter() - start, "ttft": first,
            "finish_reason": finish, "text_events": events}


async def concurrent_requests(client, model_name: str, ids: list[int], max_tokens: int) -> list[dict]:
    return list(await asyncio.gather(*(one_request(client, model_name, i, max_tokens) for i in ids)))


async def sequential_requests(client, model_name: str, ids: list[int], max_tokens: int, budget: float) -> list[dict]:
    results, start = [], time.perf_counter()
    for i in ids:
        results.append(await one_request(client, model_name, i, max_tokens))
        if time.perf_counter() - start > budget:
            break
    return results


def summarize(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    events = sum(r["text_events"] for r in results)
    return {"requests": len(results), "seconds": round(seconds, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in results)),
            "text_events_per_request": round(events / len(results), 1),
            "tokens_per_text_event": round(tokens / max(events, 1), 2)}


# ------------------------------------------------------------------------------------------------ clients
class InProcessClients:
    """Requests from one openai client on this process's event loop (it shares the GIL with the server)."""

    mode = "in-process"

    def __init__(self, base_url: str, model_name: str) -> None:
        self.base_url, self.model_name, self.client = base_url, model_name, None

    async def __aenter__(self):
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=600)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def concurrent(self, ids: list[int], max_tokens: int) -> list[dict]:
        return await concurrent_requests(self.client, self.model_name, ids, max_tokens)

    async def sequential(self, ids: list[int], max_tokens: int, budget: float) -> list[dict]:
        return await sequential_requests(self.client, self.model_name, ids, max_tokens, budget)


def _client_process(base_url: str, model_name: str, commands, results) -> None:
    """A client process: runs the commands it is sent, ("concurrent", ids, max_tokens) or ("sequential",
    ids, max_tokens, budget), until ("stop",); answers ("ready",) once, then ("done", results) or ("error", text)
    per command."""
    async def main() -> None:
        import openai

        loop = asyncio.get_running_loop()
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600) as client:
            await one_request(client, model_name, -1000 - os.getpid(), 2)  # imports, connection, first parse
            results.put(("ready",))
            while True:
                command = await loop.run_in_executor(None, commands.get)
                try:
                    if command[0] == "stop":
                        return
                    if command[0] == "concurrent":
                        out = await concurrent_requests(client, model_name, *command[1:])
                    else:
                        out = await sequential_requests(client, model_name, *command[1:])
                    results.put(("done", out))
                except Exception:  # noqa: BLE001 - reported to the parent, which raises
                    results.put(("error", traceback.format_exc()))

    try:
        asyncio.run(main())
    except Exception:  # noqa: BLE001 - e.g. the warm-up request failed: the parent must not wait forever
        results.put(("error", traceback.format_exc()))


class ProcessClients:
    """Requests from `procs` spawned processes, each with its own openai client and event loop."""

    mode = "processes"

    def __init__(self, base_url: str, model_name: str, procs: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # the server's threads are running: no fork
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(procs)]
        self.processes = [context.Process(target=_client_process, args=(base_url, model_name, q, self.results),
                                          daemon=True) for q in self.commands]

    async def __aenter__(self):
        for process in self.processes:
            process.start()
        await self._collect(len(self.processes), "ready")
        return self

    async def __aexit__(self, *exc) -> None:
        for queue in self.commands:
            queue.put(("stop",))
        for process in self.processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.terminate()

    async def _collect(self, count: int, kind: str) -> list:
        out = []
        for _ in range(count):
            message = await asyncio.to_thread(self.results.get, True, 1200)
            if message[0] == "error":
                raise RuntimeError(f"a client process failed:\n{message[1]}")
            if message[0] != kind:
                raise RuntimeError(f"expected {kind!r} from a client process, got {message[0]!r}")
            out.extend(message[1] if len(message) > 1 else [])
        return out

    async def concurrent(self, ids: list[int], max_tokens: int) -> list[dict]:
        shares = [ids[k::len(self.commands)] for k in range(len(self.commands))]
        busy = [(q, share) for q, share in zip(self.commands, shares) if share]
        for queue, share in busy:
            queue.put(("concurrent", share, max_tokens))
        return await self._collect(len(busy), "done")

    async def sequential(self, ids: list[int], max_tokens: int, budget: float) -> list[dict]:
        self.commands[0].put(("sequential", ids, max_tokens, budget))
        return await self._collect(1, "done")


async def run(clients, n: int, max_tokens: int, sequential_budget: float, full_warmup: bool, engine_stats) -> dict:
    """Warm-up, then the concurrent pass, then the sequential one. engine_stats() reads the engine's
    (decode steps, decode rows), so each pass reports its own mean decode batch."""
    def decode_batch(before: tuple[int, int], seconds: float) -> dict:
        (steps, rows), (steps_before, rows_before) = engine_stats(), before
        steps, rows = steps - steps_before, rows - rows_before
        return {"decode_steps": steps, "mean_decode_batch": round(rows / max(steps, 1), 1),
                "ms_per_decode_step": round(1e3 * seconds / max(steps, 1), 2)}

    async with clients:
        start = time.perf_counter()
        if full_warmup:  # every batch size and KV length the measured passes will see
            await clients.concurrent([-1 - i for i in range(n)], max_tokens)
            await clients.sequential([-1], max_tokens, float("inf"))
        else:
            await clients.sequential([-1], 4, float("inf"))  # engine allocation, first kernels
        warmup_s = time.perf_counter() - start
        print(f"warm-up done in {warmup_s:.1f} s", flush=True)

        before, start = engine_stats(), time.perf_counter()
        concurrent = await clients.concurrent(list(range(n)), max_tokens)
        concurrent_s = time.perf_counter() - start
        concurrent_engine = decode_batch(before, concurrent_s)
        print(f"concurrent pass done in {concurrent_s:.1f} s", flush=True)

        before, start = engine_stats(), time.perf_counter()
        sequential = await clients.sequential(list(range(n)), max_tokens, sequential_budget)
        sequential_s = time.perf_counter() - start
        sequential_engine = decode_batch(before, sequential_s)
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
    parser.add_argument("--client-procs", type=int, default=0,
                        help="run the clients in N spawned processes (0: in this process, as before)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="no stop tokens: every request generates --max-tokens tokens")
    parser.add_argument("--stand-in-ms", type=float, default=None,
                        help="replace the engine by a stand-in whose step waits this many ms (GIL released) and "
                        "samples random tokens: the server's own overhead, without model compute")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    import torch
    from common import write_json

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
    num_seqs = max(args.requests, 1)
    engine_factory = None
    if args.stand_in_ms is not None:
        vocab = min(model.args.vocab_size, getattr(tokenizer, "vocab_size", model.args.vocab_size))
        step_s = args.stand_in_ms / 1e3

        def engine_factory():
            return StandInEngine(vocab, num_seqs, step_s)

        label += f"; stand-in engine ({args.stand_in_ms:g} ms/step, random tokens)"
    app = create_app(model, tokenizer, model_name="bench", max_model_len=max_len, max_num_seqs=num_seqs,
                     engine_factory=engine_factory)
    worker = app.state.server.worker

    def engine_stats() -> tuple[int, int]:
        stats = worker.engine.stats  # the worker's current engine (it is rebuilt after a failed step)
        return stats.decode_steps, stats.decode_rows

    with BackgroundServer(app) as server:
        clients = (ProcessClients(server.base_url, "bench", args.client_procs) if args.client_procs > 0
                   else InProcessClients(server.base_url, "bench"))
        results = asyncio.run(run(clients, args.requests, max_tokens, budget, full_warmup=full_warmup,
                                  engine_stats=engine_stats))
    c, s = results["concurrent"], results["sequential"]
    if c["requests"] != args.requests:
        raise RuntimeError(f"only {c['requests']} of {args.requests} concurrent requests completed")
    ratio = c["tokens_per_s"] / s["tokens_per_s"]
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    payload = {"benchmark": "serve_concurrency", "device": device, "torch": torch.__version__, "model": label,
               "client": {"mode": clients.mode, "procs": max(args.client_procs, 0)}, "ignore_eos": args.ignore_eos,
               "stand_in_ms": args.stand_in_ms,
               "requests": args.requests, "max_tokens": max_tokens, "max_model_len": max_len,
               "sequential_budget_s": budget, **results, "concurrency_speedup": round(ratio, 2),
               "engine_failures": worker.failures, "wall_seconds": round(time.perf_counter() - began, 1)}
    where = (f"{args.client_procs} client processes" if args.client_procs > 0 else "client in the server's process")
    print(f"device {device}; model {label}; {args.requests} streaming chat requests x {max_tokens} max tokens; "
          f"{where}")
    print(f"concurrent: {c['tokens_per_s']:>9.1f} tok/s  ({c['requests']} requests, {c['completion_tokens']} tokens "
          f"in {c['seconds']} s, TTFT p50 {c['ttft_p50_s']} s, mean decode batch {c['mean_decode_batch']}, "
          f"{c['ms_per_decode_step']} ms/step, {c['tokens_per_text_event']} tokens/event, "
          f"finish {c['finish_reasons']})")
    print(f"sequential: {s['tokens_per_s']:>9.1f} tok/s  ({s['requests']} requests, {s['completion_tokens']} tokens "
          f"in {s['seconds']} s, TTFT p50 {s['ttft_p50_s']} s, {s['ms_per_decode_step']} ms/step, "
          f"{s['tokens_per_text_event']} tokens/event)")
    print(f"speedup from batching concurrent requests: {ratio:.1f}x  (whole run {payload['wall_seconds']} s, "
          f"warm-up {results['warmup_seconds']} s)")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
