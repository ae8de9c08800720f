"""GRPO step time and throughput on 1..N GPUs (FSDP2 under torchrun), same global batch.

    torchrun --standalone --nproc-per-node 1 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok --out s1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok --out s2.json
    python benchmarks/grpo_scaling.py --combine s1.json s2.json      # the scaling table

Random-weight model of a preset's shape (default Qwen2.5-0.5B), fp32 master weights, bf16 compute (FSDP mixed
precision), 64 prompts x 8 samples per step globally, exactly 256 completion tokens (stops ignored), beta 0,
one optimizer step per rollout. Every run, the 1-process one included, goes through the same FSDP code path
(a 1-process group is made when torchrun starts one process), so the numbers differ only by the GPU count.
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1).

A model too large for one GPU (qwen2.5-14b: 235 GB of fp32 weights + AdamW state) runs sharded over 4:
    torchrun --standalone --nproc-per-node 4 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok \
        --preset qwen2.5-14b --gradient-checkpointing --micro-batch-tokens 4096 --steps 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = ("Problem {i}: compute {a} + {b} - {c}. Think it through step by step inside think tags, "
          "check every partial sum, then give only the number inside answer tags.")


def _info(device: str):
    """A DistInfo for the FSDP path even with one process (torchrun gives RANK/WORLD_SIZE/LOCAL_RANK)."""
    from r1lab.distributed import DistInfo

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")),
                            timeout=datetime.timedelta(seconds=600), device_id=dev if cuda else None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                    is_distributed=True)


def run(a) -> dict | None:
    import r1lab.model as rm
    from r1lab.tokenizer import load_tokenizer
    from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer
    from r1lab.run_dir import RunDir

    info = _info(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    tok = load_tokenizer(a.tokenizer)
    args = rm.preset(a.preset)
    if args.vocab_size < tok.vocab_size:  # a tiny preset for a CPU smoke test: widen it to the tokenizer
        args = rm.preset(a.preset, vocab_size=tok.vocab_size)
    if info.is_main:
        model = rm.build(args, seed=0).train()  # fp32 on the CPU; shard_model broadcasts it to the others
    else:  # uninitialized storage on this rank's GPU, filled by that broadcast (no 2nd host copy of a 14B model)
        from r1lab.model.hf_io import empty_model

        model = empty_model(args, info.device, torch.float32).train()
    prompts = [PROMPT.format(i=i, a=11 * i + 3, b=7 * i + 5, c=i + 2) for i in range(a.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in prompts))
        cfg = GRPOConfig(task=TaskConfig(name=f"jsonl:{data}", template="{question}"), rewards={"format": 1.0},
                         prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=a.new_tokens,
                         stop_at_eos=False, steps=a.steps, lr=1e-6, device=a.device, dtype="float32",
                         micro_batch_tokens=a.micro_batch_tokens, gradient_checkpointing=a.gradient_checkpointing)
        trainer = Trainer(cfg, model, tok, RunDir(Path(tmp) / "run"), dist=info)
        times, rows = [], []
        for step in range(a.steps):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            m = trainer.step()
            sync()
            dist.barrier()
            times.append(time.perf_counter() - t0)
            rows.append({k: m[k] for k in ("time/rollout", "time/training", "response_length", "loss") if k in m})
            if info.is_main:
                print(f"  {info.world_size} GPU step {step}: {times[-1]:.2f}s  " +
                      "  ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else 0.0
    peaks = [None] * info.world_size
    dist.all_gather_object(peaks, peak)
    dist.destroy_process_group()
    if not info.is_main:
        return None
    prompt_tokens = sum(len(tok.encode(p)) for p in prompts) * a.group
    tokens = prompt_tokens + a.prompts * a.group * a.new_tokens
    med = statistics.median(times[1:])
    return {"gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "gpus": info.world_size, "preset": a.preset,
            "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens, "step_s": times,
            "median_step_s": med, "tokens_per_step": tokens, "tokens_per_s": tokens / med,
            "steps": rows, "peak_mem_gib_per_gpu": peaks}


def combine(paths: list[str]) -> None:
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: (r["preset"], r["gpus"]))
    print("| model | GPUs | s/step | tokens/s | rollout s | training s | scaling efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        base = next((b for b in runs if b["preset"] == r["preset"] and b["gpus"] == 1), None)
        eff = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else float("nan")
        steps = r["steps"][1:]
        ro = statistics.median(s.get("time/rollout", float("nan")) for s in steps)
        tr = statistics.median(s.get("time/training", float("nan")) for s in steps)
        print(f"| {r['preset']} | {r['gpus']} | {r['median_step_s']:.2f} | {r['tokens_per_s']:,.0f} | {ro:.2f} | "
              f"{tr:.2f} | {eff:.0%} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", help="folder with a tokenizer.json whose vocabulary fits the preset (Qwen2.5)")
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--prompts", type=int, default=64, help="global prompts per step")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward (large models)")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo: a smoke test of the script)")
    p.add_argument("--out", default="grpo_scaling.json")
    p.add_argument("--combine", nargs="+", help="print the table of earlier --out files and exit")
    a = p.parse_args()
    if a.combine:
        return combine(a.combine)
    if not a.tokenizer:
        p.error("--tokenizer is required")
    result = run(a)
    if result is not None:
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("gpus", "median_step_s", "tokens_per_s")}))


if __name__ == "__main__":
    main()
