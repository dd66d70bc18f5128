"""The `gemma-mlx` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="gemma-mlx",
    help="Run Google's Gemma 4 12B (and Gemma 3) with MLX: convert, chat, generate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
state = {"debug": False}


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def resolve_model(model: str | None) -> Path:
    """A local checkpoint directory; without one, the offline default model."""
    if model is not None:
        path = Path(model).expanduser()
        if not path.is_dir():
            fail(f"--model {model}: no such checkpoint directory")
        return path
    try:
        from gemma_mlx.default_model import DESCRIPTION, default_model_path
    except ImportError:
        fail("no --model given and no offline default model is available")
    typer.secho(f"Using the offline default model: {DESCRIPTION}", err=True, fg=typer.colors.CYAN)
    return default_model_path()


def version_callback(value: bool) -> None:
    if value:
        from gemma_mlx import __version__

        typer.echo(f"gemma-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state["debug"] = debug


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text; read from stdin when omitted.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[
        int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
    ] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Min-p sampling.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = None,
) -> None:
    """Complete a prompt and print the text as it is generated."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt as an argument or on stdin")
        prompt = sys.stdin.read()
    from gemma_mlx import load, stream_generate

    model_obj, processor = load(resolve_model(model))
    if processor is None:
        fail(f"{model}: the checkpoint has no tokenizer files")
    last = None
    for chunk in stream_generate(
        model_obj,
        processor,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
    ):
        typer.echo(chunk.text, nl=False)
        last = chunk
    typer.echo()
    if last is not None:
        typer.secho(
            f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} "
            f"generated at {last.generation_tps:.1f} tok/s, peak memory {last.peak_memory_gb:.2f} GB]",
            err=True,
            dim=True,
        )


def main() -> None:
    """Console entry point: user errors become one red line and a non-zero exit code."""
    try:
        app()
    except (ValueError, OSError) as e:
        if state["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
