"""GRPO on a real checkpoint: r1lab's trainer vs TRL's GRPOTrainer (HF-generate backend), same run, same GPU.

    python benchmarks/grpo_real.py --model /root/qwen05 --task jsonl:.whl/basic_arithmetic.jsonl \
        --holdout 0.5 --steps 5 [--skip-trl] --out grpo_real.json

Both train the same folder (fp32 weights) on the same prompts (the model's chat template, the R1-style
instruction of recipes/zero-qwen2.5-coder-0.5b.yaml), with the same reward (r1lab's accuracy + format, on the
text up to "</answer>"), 32 prompts x 8 samples per step, at most 384 new tokens, T = 1, lr 3e-6, beta 0, one
optimizer step per rollout. r1lab stops a sample at "</answer>"; TRL's generate backend has no stop strings,
so its samples run on to EOS (its reward still sees the text cut at "</answer>"). Reports seconds per step
(median of steps 2..N) and the training reward of every step.
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

INSTRUCTION = ("Think step by step inside <think> </think> tags, then give only the final answer inside "
               "<answer> </answer> tags.")
STOP = "</answer>"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _config(a, steps: int):
    from r1lab.train.grpo import GRPOConfig, TaskConfig

    return GRPOConfig(task=TaskConfig(name=a.task, train_size=4000, test_size=100, template="chat",
                                      instruction=INSTRUCTION, options={"holdout_fraction": a.holdout}),
                      stop_strings=[STOP], prompts_per_step=a.prompts, group_size=8,
                      max_new_tokens=a.max_new_tokens, lr=3e-6, warmup_steps=1, steps=steps, micro_batch_tokens=8192, gradient_checkpointing=True,
                      device=a.device, dtype="float32")


def bench_r1lab(a) -> dict:
    from r1lab.model import load_model_and_tokenizer
    from r1lab.run_dir import RunDir
    from r1lab.train.grpo import Trainer

    model, tok = load_model_and_tokenizer(a.model, device=a.device, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_config(a, a.steps), model, tok, RunDir(tmp))
        times, rewards = [], []
        for _ in range(a.steps):
            _sync(a.device)
            t0 = time.perf_counter()
            m = trainer.step()
            _sync(a.device)
            times.append(time.perf_counter() - t0)
            rewards.append(m["reward"])
            print(f"  r1lab step {len(times)}: {times[-1]:.2f}s (rollout {m['time/rollout']:.2f}s, train "
                  f"{m['time/training']:.2f}s) reward {m['reward']:.3f} len {m['response_length']:.0f}", flush=True)
    del trainer, model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": times, "reward": rewards, "peak_gib": _peak_gib(a.device)}


def bench_trl(a) -> dict:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from r1lab.rewards import format_reward

    task = _config(a, a.steps).task.load("train")
    by_question = {p.question: p for p in task.problems}
    rows = [{"prompt": [{"role": "user", "content": f"{p.question}\n{INSTRUCTION}"}], "question": p.question}
            for p in task.problems[: a.prompts * a.steps]]
    ds = datasets.Dataset.from_list(rows)

    def reward(completions, question, **_) -> list[float]:
        out = []
        for c, q in zip(completions, question):
            text = c[0]["content"] if isinstance(c, list) else c
            text = text[: text.find(STOP) + len(STOP)] if STOP in text else text
            out.append(task.score(by_question[q], text) + format_reward(text))
        return out

    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    times: list[float] = []
    rewards: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            _sync(a.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            _sync(a.device)
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])
                print(f"  TRL step {len(times)}: {times[-1] if times else 0:.2f}s reward {logs['reward']:.3f}", flush=True)

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=a.trl_micro_batch,
                          gradient_accumulation_steps=8 * a.prompts // a.trl_micro_batch, num_generations=8,
                          max_completion_length=a.max_new_tokens, max_steps=a.steps, learning_rate=3e-6, beta=0.0,
                          bf16=a.device == "cuda", use_cpu=a.device == "cpu",
                          gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                          temperature=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=1)
        trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {"step_s": times, "reward": rewards, "train_wall_s": wall, "peak_gib": _peak_gib(a.device)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="jsonl:.whl/basic_arithmetic.jsonl")
    p.add_argument("--holdout", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (x 8 samples)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of both sides on a small checkpoint")
    p.add_argument("--trl-micro-batch", type=int, default=32,
                   help="TRL's per-device batch; 8 x prompts / it accumulation steps make one optimizer step per rollout")
    p.add_argument("--out", default="grpo_real.json")
    a = p.parse_args()
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result = {"gpu": gpu, "model": a.model, "r1lab": bench_r1lab(a)}
    if not a.skip_trl:
        try:
            result["trl"] = bench_trl(a)
        except Exception as e:  # report, don't hide, a peer that would not run
            result["trl_error"] = repr(e)
            print("TRL failed:", repr(e))
    med = {k: statistics.median(v["step_s"][1:]) for k, v in result.items()
           if isinstance(v, dict) and len(v.get("step_s", [])) > 1}
    result["median_step_s_after_first"] = med
    print(json.dumps(med))
    if "trl" in med:
        print(f"r1lab {med['r1lab']:.2f} s/step vs TRL {med['trl']:.2f} s/step: {med['trl'] / med['r1lab']:.1f}x")
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
