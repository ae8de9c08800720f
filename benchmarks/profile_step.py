"""Where a training step's GPU time goes: top kernels of one fwd+bwd of the dense 0.5B shape (r1lab, compiled).

    python benchmarks/profile_step.py [--preset qwen2.5-0.5b] [--no-compile]
Also times SDPA with enable_gqa against explicitly repeated KV heads, which decides the attention path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import r1lab.model as rm  # noqa: E402
from benchmarks.model_train import chunked_ce, timed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    q = torch.randn(8, 14, 2048, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, 2, 2048, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    gqa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 3, 10)
    rep = timed(lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1), is_causal=True), 3, 10)
    print(f"SDPA fwd enable_gqa {gqa * 1e3:.2f} ms, repeated kv {rep * 1e3:.2f} ms")

    model = rm.build(rm.preset(a.preset), seed=0).to("cuda", torch.bfloat16).train()
    if not a.no_compile:
        for layer in model.model.layers:
            layer.compile()
    ids = torch.randint(0, model.args.vocab_size, (8, 2048), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        chunked_ce(model, ids).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
