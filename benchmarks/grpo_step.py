"""GRPO step time: r1lab's trainer vs TRL's GRPOTrainer (HF-generate backend), same run, same model, same GPU.

    python benchmarks/grpo_step.py --tokenizer .whl/qwen_tok [--skip-trl] [--fused-head] [--out grpo_step.json]

Qwen2.5-0.5B shape with random weights (bf16), 16 prompts x 8 samples, ~60-token prompts, exactly 256
completion tokens (stops ignored), beta 0, one optimizer step per rollout. Reports the median step time of
steps 2-5 for both and the ratio. --fused-head also runs r1lab's trainer again with the fused vocabulary head
(r1lab.train.logprobs.FUSED_HEAD = True) in the same process, reported as "r1lab+fused_head".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import r1lab.model as rm  # noqa: E402

QUESTION = ("State the final answer to the following arithmetic problem: {a} + {b} - {c} = ? Think it through step by step "
            "and write the reasoning inside think tags, then give only the number inside answer tags. Be careful with signs and double-check every partial sum before you answer.")
PROMPTS = [QUESTION.format(a=11 * i + 3, b=7 * i + 5, c=i + 2) for i in range(16)]


def length_reward(completions, **_) -> list[float]:
    """Any cheap rule reward works here: the benchmark times the machinery, not learning."""
    return [float(len(c) % 7) / 7 for c in completions]


def bench_r1lab(model_dir: Path, steps: int, data: str) -> list[float]:
    from r1lab.tasks import Problem, Task
    from r1lab.tokenizer import load_tokenizer
    from r1lab.train.grpo import GRPOConfig, TaskConfig, Trainer
    from r1lab.run_dir import RunDir

    tok = load_tokenizer(model_dir)
    model = rm.load(model_dir, dtype=torch.bfloat16, device="cuda").train()
    cfg = GRPOConfig(task=TaskConfig(name=data, train_size=64, template="{question}", options={"holdout_fraction": 0.2}),
                     rewards={"format": 1.0}, prompts_per_step=16, group_size=8, max_new_tokens=256,
                     stop_at_eos=False, steps=steps, lr=1e-6, device="cuda", dtype="bfloat16", micro_batch_tokens=16384)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, model, tok, RunDir(tmp))
        trainer.task = Task("bench", [Problem(q, "0") for q in PROMPTS], trainer.task.scorer, trainer.task.instruction)
        trainer.order, trainer.cursor = list(range(len(PROMPTS))), 0
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = trainer.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            print(f"  r1lab step {len(times)}: {times[-1]:.2f}s (rollout {m['time/rollout']:.2f}s, train {m['time/training']:.2f}s, "
                  f"len {m['response_length']:.0f}, prompt tokens ~{len(trainer._prompt(0))})", flush=True)
    return times


def bench_trl(model_dir: Path, steps: int) -> list[float]:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS * 8})
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            print(f"  TRL step {len(times)}: {times[-1]:.2f}s", flush=True)

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=128, num_generations=8, max_completion_length=256,
                          max_steps=steps, learning_rate=1e-6, beta=0.0, bf16=True, gradient_checkpointing=True,
                          logging_steps=1, report_to=[], save_strategy="no", seed=0,
                          generation_kwargs={"min_new_tokens": 256})
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=length_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True, help="folder with the Qwen tokenizer.json + tokenizer_config.json")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", default="jsonl:.whl/chain_sum.jsonl", help="any task spec; the prompts are replaced")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--fused-head", action="store_true", help="A/B: r1lab again with the fused vocabulary head")
    p.add_argument("--out", default="grpo_step.json")
    a = p.parse_args()
    from r1lab.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen0.5b-random"
        args = rm.preset("qwen2.5-0.5b")
        rm.save(rm.build(args, seed=0).to(torch.bfloat16), model_dir)
        load_tokenizer(a.tokenizer).save(model_dir)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / f).write_bytes((Path(a.tokenizer) / f).read_bytes())
        import r1lab.train.logprobs as lpm

        lpm.FUSED_HEAD = False if a.fused_head else None  # --fused-head: the A side is the plain head
        result = {"gpu": torch.cuda.get_device_name(), "r1lab": bench_r1lab(model_dir, a.steps, a.data)}
        torch.cuda.empty_cache()
        if a.fused_head:
            lpm.FUSED_HEAD = True
            try:
                result["r1lab+fused_head"] = bench_r1lab(model_dir, a.steps, a.data)
            finally:
                lpm.FUSED_HEAD = None
            torch.cuda.empty_cache()
        if not a.skip_trl:
            try:
                result["trl"] = bench_trl(model_dir, a.steps)
            except Exception as e:  # report, don't hide, a peer that would not run
                result["trl_error"] = repr(e)
                print("TRL failed:", repr(e))
    med = {k: statistics.median(v[1:]) for k, v in result.items() if isinstance(v, list) and len(v) > 1}
    result["median_step_s_after_first"] = med
    print(json.dumps(med))
    if "trl" in med:
        print(f"r1lab {med['r1lab']:.2f} s/step vs TRL {med['trl']:.2f} s/step: {med['trl'] / med['r1lab']:.1f}x")
    if "r1lab+fused_head" in med:
        print(f"r1lab {med['r1lab']:.2f} s/step, with the fused head {med['r1lab+fused_head']:.2f} s/step: "
              f"{med['r1lab'] / med['r1lab+fused_head']:.2f}x")
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
