"""The `gemma-mlx` command line."""

from __future__ import annotations

import json
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


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


SAMPLING = "Sampling: temperature 0 = greedy."


def guard_memory(path: Path, context: int = 8192) -> None:
    """Warn before loading a model that will not fit the memory available now."""
    from gemma_mlx.footprint import footprint, memory_warning

    warning = memory_warning(footprint(path, context))
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


class PrefillBar:
    """A progress bar for prompts long enough to make the wait visible (several prefill chunks)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from rich.progress import Progress

        if self.bar is None and total > 1024:
            self.bar = Progress(transient=True, console=None)
            self.bar.start()
            self.task = self.bar.add_task("prefill", total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            if done >= total:
                self.bar.stop()
                self.bar = None


def load_draft(draft: str | None):
    """The MTP drafter for --draft (a `gemma4_unified_assistant` checkpoint directory)."""
    if draft is None:
        return None
    from gemma_mlx import load_drafter

    path = Path(draft).expanduser()
    if not path.is_dir():
        fail(f"--draft {draft}: no such drafter checkpoint directory")
    return load_drafter(path)


def load_checked(path: Path):
    from gemma_mlx import load

    guard_memory(path)
    model, processor = load(path)
    if processor is None:
        fail(f"{path}: the checkpoint has no tokenizer files")
    return model, processor


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text; read from stdin when omitted.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help=SAMPLING)] = 0.0,
    top_k: Annotated[
        int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
    ] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Min-p sampling.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="An image (repeatable).")] = None,
    audio: Annotated[list[str] | None, typer.Option("--audio", help="An audio clip (repeatable).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with text and speed.")
    ] = False,
    draft: Annotated[
        str | None, typer.Option("--draft", help="MTP drafter checkpoint: speculative decoding.")
    ] = None,
    draft_block_size: Annotated[
        int,
        typer.Option("--draft-block-size", min=2, help="Tokens per speculative round (last token + drafts)."),
    ] = 4,
) -> None:
    """Complete a prompt and print the text as it is generated."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt as an argument or on stdin")
        prompt = sys.stdin.read()
    from gemma_mlx import stream_generate

    path = resolve_model(model)
    model_obj, processor = load_checked(path)
    images, clips = image or [], audio or []
    if (images or clips) and "<|image|>" not in prompt and "<|audio|>" not in prompt:
        prompt = "<|image|>" * len(images) + "<|audio|>" * len(clips) + prompt  # media first
    last, text = None, []
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
        images=images,
        audio=clips,
        prefill_progress=PrefillBar(),
        drafter=load_draft(draft),
        draft_block_size=draft_block_size,
    ):
        if not as_json:
            typer.echo(chunk.text, nl=False)
        text.append(chunk.text)
        last = chunk
    if as_json:
        result = {
            "model": str(path),
            "text": "".join(text),
            "prompt_tokens": last.prompt_tokens,
            "generation_tokens": last.generation_tokens,
            "prompt_tps": round(last.prompt_tps, 2),
            "generation_tps": round(last.generation_tps, 2),
            "peak_memory_gb": round(last.peak_memory_gb, 3),
            "finish_reason": last.finish_reason,
            "draft_acceptance": round(last.accepted / last.drafted, 3) if last.drafted else None,
        }
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    typer.echo()
    typer.secho(
        f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} "
        f"generated at {last.generation_tps:.1f} tok/s, peak memory {last.peak_memory_gb:.2f} GB"
        + (f", {last.accepted}/{last.drafted} drafts accepted]" if last.drafted else "]"),
        err=True,
        dim=True,
    )


@app.command()
def chat(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Let the model think first.")] = False,
    image: Annotated[list[str] | None, typer.Option("--image", help="Attach to the first message.")] = None,
    audio: Annotated[list[str] | None, typer.Option("--audio", help="Attach to the first message.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help=SAMPLING)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 64,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    draft: Annotated[
        str | None, typer.Option("--draft", help="MTP drafter checkpoint: speculative decoding.")
    ] = None,
    draft_block_size: Annotated[
        int,
        typer.Option("--draft-block-size", min=2, help="Tokens per speculative round (last token + drafts)."),
    ] = 4,
) -> None:
    """Chat in the terminal: multi-turn with cache reuse, streaming, images and audio, /commands."""
    from gemma_mlx.chat import ChatSession

    from .chat import repl

    path = resolve_model(model)
    model_obj, processor = load_checked(path)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    session = ChatSession(
        model_obj,
        processor,
        system=system,
        think=think,
        max_tokens=max_tokens,
        sampling=sampling,
        prefill_progress=PrefillBar(),
        drafter=load_draft(draft),
        draft_block_size=draft_block_size,
    )
    for i in image or []:
        session.attach_image(i)
    for a in audio or []:
        session.attach_audio(a)
    banner = f"gemma-mlx chat - {path.name} ({model_obj.config.model_type})"
    if model is None:  # the offline default
        banner += "\nNote: a base (pre-trained) model: it continues text rather than following instructions."
    repl(session, banner)


@app.command()
def info(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory.")] = None,
    context: Annotated[int, typer.Option("--context", min=1, help="Context for the memory estimate.")] = 8192,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What a checkpoint is and costs: parameters, bits per weight, bytes per token, memory."""
    from rich.console import Console
    from rich.table import Table

    from gemma_mlx.footprint import footprint, memory_bytes

    path = resolve_model(model)
    fp = footprint(path, context)
    total, available = memory_bytes()
    t, q = fp.config.text, fp.config.quantization
    quant = "none" if not q else f"{q.get('mode', 'affine')} {q.get('bits')}-bit, group {q.get('group_size')}"
    rows = {
        "model type": fp.config.model_type,
        "layers": f"{t.num_hidden_layers} ({sum(s.sliding for s in t.layers)} sliding, window "
        f"{t.sliding_window})",
        "hidden size / vocabulary": f"{t.hidden_size} / {t.vocab_size}",
        "vision / audio": f"{'yes' if fp.config.vision else 'no'} / {'yes' if fp.config.audio else 'no'}",
        "parameters": f"{fp.parameters:,}",
        "quantization": quant,
        "bits per weight": f"{fp.bits_per_weight:.3f}",
        "weights": human_bytes(fp.weight_bytes),
        "bytes read per decoded token": human_bytes(fp.bytes_per_token),
        f"KV cache at {context} tokens": human_bytes(fp.kv_bytes),
        "estimated memory": human_bytes(fp.total_bytes),
        "this machine": f"{human_bytes(available)} available of {human_bytes(total)}: "
        + ("fits" if fp.total_bytes <= available else "does NOT fit"),
    }
    if as_json:
        machine = {"memory_available_bytes": available, "memory_total_bytes": total}
        typer.echo(
            json.dumps({"path": str(path), **fp.as_dict(), **machine, "fits": fp.total_bytes <= available})
        )
        return
    table = Table(title=str(path), show_header=False)
    for k, v in rows.items():
        table.add_row(k, v)
    Console().print(table)


@app.command()
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory.")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", min=1)] = 512,
    generation_tokens: Annotated[int, typer.Option("--generation-tokens", "-g", min=2)] = 128,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1)] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure prefill and decode tokens/s and peak memory (random prompt, greedy decode)."""
    from gemma_mlx import load
    from gemma_mlx.benchmark import benchmark
    from gemma_mlx.footprint import footprint

    path = resolve_model(model)
    model_obj, _ = load(path)
    result = benchmark(model_obj, prompt_tokens, generation_tokens, trials)
    per_token = footprint(path).bytes_per_token
    data = {
        "model": str(path),
        **result.as_dict(),
        "bytes_per_token": per_token,
        "weights_gb_per_s": round(per_token * result.generation_tps / 1e9, 2),
    }
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(
        f"{path.name}: prefill {result.prompt_tps:.1f} tok/s ({prompt_tokens} tokens), decode "
        f"{result.generation_tps:.1f} tok/s ({generation_tokens} tokens; {data['weights_gb_per_s']} GB/s "
        f"of weights read), peak memory {result.peak_memory_gb:.2f} GB, mean of {trials} trials"
    )


@app.command()
def convert(
    src: Annotated[
        str, typer.Argument(help="Checkpoint directory or Hugging Face repo id (e.g. google/gemma-4-12B-it).")
    ],
    out: Annotated[Path, typer.Argument(help="Output directory (written atomically).")],
    bits: Annotated[
        int, typer.Option(help="Bits per weight: affine 2/3/4/5/6/8; mxfp4/nvfp4 4; mxfp8 8.")
    ] = 4,
    group_size: Annotated[int | None, typer.Option(help="Weights per scale (affine 32/64/128).")] = None,
    mode: Annotated[str, typer.Option(help="affine, mxfp4, mxfp8 or nvfp4.")] = "affine",
    recipe: Annotated[
        str, typer.Option(help="uniform, mixed_3_6, mixed_4_6, mixed_4_8 or mlp_8bit.")
    ] = "uniform",
    quantize: Annotated[
        bool, typer.Option("--quantize/--no-quantize", help="--no-quantize: float conversion.")
    ] = True,
    quantize_embedding: Annotated[
        bool,
        typer.Option("--quantize-embedding/--keep-embedding", help="Quantize the tied embedding/LM head."),
    ] = True,
    quantize_drafter: Annotated[
        bool,
        typer.Option("--quantize-drafter/--keep-drafter", help="Quantize an MTP drafter (default: keep)."),
    ] = False,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 for unquantized parts.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Compare the result with the source model.")] = False,
) -> None:
    """Convert a Hugging Face checkpoint into a (quantized) MLX checkpoint."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from gemma_mlx.convert import convert as run_convert
    from gemma_mlx.convert import convert_drafter, resolve_source

    console = Console(stderr=True)
    source = resolve_source(src)
    raw = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    total = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("converting", total=None)
        bytes_task = bar.add_task("reading", total=total)

        def progress(name: str, nbytes: int) -> None:
            bar.update(task, advance=1, description=f"[cyan]{name}")
            bar.update(bytes_task, advance=nbytes)

        kw = dict(bits=bits, group_size=group_size, mode=mode, dtype=dtype, force=force, progress=progress)
        if raw.get("model_type") == "gemma4_unified_assistant":
            report = convert_drafter(source, out, quantize=quantize_drafter, **kw)
        else:
            report = run_convert(
                source,
                out,
                recipe=recipe,
                quantize=quantize,
                quantize_embedding=quantize_embedding,
                check=check,
                **kw,
            )
    table = Table(title=f"Converted {src} -> {out}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("bits per weight", f"{report.bits_per_weight:.3f}")
    table.add_row("size on disk", human_bytes(report.bytes_on_disk))
    if report.bytes_per_token:
        table.add_row("bytes read per decoded token", human_bytes(report.bytes_per_token))
    if report.kept_float:
        table.add_row("layers kept in float", str(len(report.kept_float)))
    for key, value in (report.check or {}).items():
        table.add_row(f"check: {key.replace('_', ' ')}", f"{value:.4f}")
    Console().print(table)


def main() -> None:
    """Console entry point: user errors become one red line and a non-zero exit code."""
    try:
        app()
    except (ValueError, OSError, RuntimeError) as e:
        if state["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
