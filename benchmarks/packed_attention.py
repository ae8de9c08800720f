"""Peak memory and time of one packed training forward/backward at long pack lengths (CPU or GPU).

    python benchmarks/packed_attention.py --preset tiny-dense --tokens 16384
    python benchmarks/packed_attention.py --preset tiny-moe --tokens 32768 --docs 64 512
    python benchmarks/packed_attention.py --preset qwen2.5-0.5b --tokens 32768 --dtype bfloat16   # GPU
    python benchmarks/packed_attention.py --trainer sft --tokens 32768    # one SFT step of the r1-tiny model
    python benchmarks/packed_attention.py --trainer grpo --tokens 16384   # one GRPO step (rollout included)

One row of `--tokens` tokens packed from documents of random lengths in [--docs MIN MAX] goes through the SFT
loss (`sft_loss_sums`: block-causal trunk with gradient checkpointing, chunked head, MTP when the model has
it) and its backward, --steps times. Prints one JSON line: seconds of the last pass, peak resident memory of
the process (ru_maxrss, so run one configuration per process) and its growth over the RSS before the first
pass; on CUDA the peak allocated GPU memory.
--trainer sft / grpo instead runs one step of the real trainer on the embedded r1-tiny model with
micro_batch_tokens = --tokens and gradient checkpointing: SFT on --tokens / 512 random-word records cut to
r1-tiny's 512-token context (one step, one packed row of exactly --tokens tokens); GRPO on chain_sum with
--tokens / 256 completions of 200 tokens (rows as long as the longest sequence, as many rows per micro-batch
as the budget holds). Seconds and peak RSS then cover the whole step (GRPO: rollout included), and "tokens" is
the trainer's logged count (SFT: tokens of the step; GRPO: completion tokens in the loss).
A dense [T, T] attention mask alone is T² bytes (1 GiB at 32768 tokens), the fp32 scores of one layer
4·H·T² bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import r1lab.model as rm  # noqa: E402
from r1lab.run_dir import RunDir, read_jsonl  # noqa: E402
from r1lab.train.batching import pack_sequences  # noqa: E402
from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer  # noqa: E402
from r1lab.train.sft import SFTConfig, sft_loss_sums, train_sft  # noqa: E402


def document_lengths(total: int, shortest: int, longest: int, generator: torch.Generator) -> list[int]:
    """Random lengths in [shortest, longest] that add up to exactly `total` (the last one takes the rest)."""
    lengths: list[int] = []
    while total - sum(lengths) > longest:
        lengths.append(int(torch.randint(shortest, longest + 1, (1,), generator=generator)))
    return lengths + [total - sum(lengths)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def trainer_step(trainer: str, tokens: int) -> dict:
    """One step of the SFT or GRPO trainer at micro_batch_tokens=tokens on r1-tiny (see the module docstring)."""
    model, tok = rm.load_model_and_tokenizer(rm.ASSETS_DIR / "r1-tiny", dtype="float32")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="packed_attention_") as out_dir:
        if trainer == "sft":
            rnd = random.Random(0)
            words = "red blue green cat dog sun moon tree fish bird".split()
            records = [{"prompt": f"Question {i}:", "completion": " ".join(rnd.choice(words) for _ in range(300))}
                       for i in range(tokens // 512)]
            cfg = SFTConfig(data=records, epochs=1, tokens_per_step=tokens, micro_batch_tokens=tokens, max_len=512,
                            overlong="truncate", gradient_checkpointing=True, save_every=0)
            train_sft(cfg, out_dir, model=model, tokenizer=tok, log=lambda line: None)
            (metrics,) = read_jsonl(Path(out_dir) / "metrics.jsonl")
        else:
            cfg = GRPOConfig(task=TaskConfig(name="chain_sum", train_size=64), prompts_per_step=tokens // 256 // 8,
                             group_size=8, max_new_tokens=200, stop_at_eos=False, micro_batch_tokens=tokens,
                             gradient_checkpointing=True, steps=1, seed=0)
            metrics = Trainer(cfg, model, tok, RunDir(out_dir)).step()
    return {"trainer": trainer, "micro_batch_tokens": tokens, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mib": round(peak_rss_mib()), "tokens": metrics["tokens"],
            "loss": metrics.get("loss", metrics.get("pg_loss"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-dense")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the one packed row")
    parser.add_argument("--docs", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"),
                        help="range of the document lengths")
    parser.add_argument("--steps", type=int, default=1, help="forward/backward passes; seconds are the last one's")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--trainer", choices=("sft", "grpo"), help="one step of this trainer instead (r1-tiny)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trainer:
        print(json.dumps(trainer_step(args.trainer, args.tokens)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = rm.build(rm.preset(args.preset), seed=0).to(device, getattr(torch, args.dtype)).train()
    model.gradient_checkpointing = True
    g = torch.Generator().manual_seed(0)
    lengths = document_lengths(args.tokens, *args.docs, g)
    vocab = model.args.vocab_size
    seqs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    (batch,) = pack_sequences(seqs, None, args.tokens)
    batch = batch.to(device)

    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        start = time.perf_counter()
        sums = sft_loss_sums(model, batch, with_mtp=True)
        loss = sums["ce_sum"] / sums["tokens"] + sums.get("mtp_sum", 0.0) / sums.get("mtp_tokens", 1)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    out = {"preset": args.preset, "dtype": args.dtype, "tokens": args.tokens, "documents": len(lengths),
           "device": device.type, "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
           "loss": round(loss.item(), 4),
           "peak_rss_mib": round(peak_rss_mib()), "rss_growth_mib": round(peak_rss_mib() - rss_before)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
