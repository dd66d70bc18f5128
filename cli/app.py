"""The `gemma-mlx` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gemma_mlx import (
    CheckpointError,
    ConfigError,
    Drafter,
    GenerationStats,
    __version__,
    load,
    load_config,
    load_drafter,
    stream_generate,
)
from gemma_mlx.benchmark import benchmark
from gemma_mlx.chat import ChatSession
from gemma_mlx.convert.default_model import DESCRIPTION, default_model_path
from gemma_mlx.footprint import footprint, memory_bytes, memory_warning
from gemma_mlx.hub import resolve
from gemma_mlx.models.gemma import Model
from gemma_mlx.processor import Processor
from gemma_mlx.sample import SamplingParams

from . import chat as chat_repl
from .convert import convert_command

app = typer.Typer(
    name="gemma-mlx",
    help="Run Google's Gemma 4 12B (and Gemma 3) with MLX: convert, chat, generate, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
state = {"debug": False}

# Options shared by several commands, declared once.
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Checkpoint directory (default: the offline model).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy.")
]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (1 = off).")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Min-p sampling (0 = off).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
ImageOpt = Annotated[
    list[str] | None,
    typer.Option("--image", metavar="FILE", help="An image (repeatable; chat: first message)."),
]
AudioOpt = Annotated[
    list[str] | None,
    typer.Option("--audio", metavar="FILE", help="An audio clip (repeatable; chat: first message)."),
]
KvBitsOpt = Annotated[
    int | None,
    typer.Option("--kv-bits", help="Quantize the KV cache to 8 or 4 bits (less memory for long contexts)."),
]
KvGroupOpt = Annotated[int, typer.Option("--kv-group-size", help="KV quantization group: 32, 64 or 128.")]
DraftOpt = Annotated[
    str | None, typer.Option("--draft", help="MTP drafter checkpoint: speculative decoding.")
]
DraftBlockOpt = Annotated[
    int, typer.Option("--draft-block-size", min=2, help="Tokens per speculative round (last token + drafts).")
]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def resolve_model(model: str | None) -> Path:
    """A local checkpoint directory or a Hub id `org/name[@revision]`; without one, the offline
    default model."""
    if model is not None:
        try:
            return resolve(model, "checkpoint")
        except CheckpointError as e:
            fail(f"--model {e}")
    typer.secho(f"Using the offline default model: {DESCRIPTION}", err=True, fg=typer.colors.CYAN)
    return default_model_path(log=lambda line: typer.secho(f"{line} (once; about 20 s)", err=True))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def version_callback(value: bool) -> None:
    if value:
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


class PrefillBar:
    """A progress bar for prompts long enough to make the wait visible (several prefill chunks)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and total > 1024:
            self.bar = Progress(transient=True, console=None)
            self.bar.start()
            self.task = self.bar.add_task("prefill", total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            if done >= total:
                self.bar.stop()
                self.bar = None


def load_draft(draft: str | None) -> Drafter | None:
    """The MTP drafter for --draft (a `gemma4_unified_assistant` checkpoint directory or Hub id)."""
    if draft is None:
        return None
    try:
        return load_drafter(resolve(draft, "drafter checkpoint"))
    except CheckpointError as e:
        fail(f"--draft {e}")


def check_media(path: Path, images: list[str], audio: list[str]) -> None:
    """Refuse media the model cannot take, before its weights are loaded."""
    config = load_config(path)
    if images and config.vision is None:
        fail(f"{path}: this model has no vision input (--image)")
    if audio and config.audio is None:
        fail(f"{path}: this model has no audio input (--audio)")


def load_checked(path: Path, kv_bits: int | None = None, kv_group_size: int = 64) -> tuple[Model, Processor]:
    """Load after warning when weights plus the KV cache will not fit the memory available now."""
    warning = memory_warning(footprint(path, kv_bits=kv_bits, kv_group_size=kv_group_size))
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    model, processor = load(path)
    if processor is None:
        fail(f"{path}: the checkpoint has no tokenizer files")
    return model, processor


def stats_line(stats: GenerationStats) -> str:
    line = (
        f"{stats.prompt_tokens} prompt tokens at {stats.prompt_tps:.1f} tok/s, {stats.generation_tokens} "
        f"generated at {stats.generation_tps:.1f} tok/s"
    )
    if stats.drafted:
        line += f", drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance:.0%})"
    return line


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text; read from stdin when omitted.")] = None,
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate.")] = 128,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    image: ImageOpt = None,
    audio: AudioOpt = None,
    as_json: JsonOpt = False,
    draft: DraftOpt = None,
    draft_block_size: DraftBlockOpt = 4,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
) -> None:
    """Complete a prompt and print the text as it is generated."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt as an argument or on stdin")
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    else:  # bytes that were not UTF-8 reach argv as surrogates: show them as U+FFFD instead
        prompt = prompt.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    path = resolve_model(model)
    images, clips = image or [], audio or []
    check_media(path, images, clips)
    model_obj, processor = load_checked(path, kv_bits, kv_group_size)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    last, text = None, []
    chunks = stream_generate(
        model_obj,
        processor,
        prompt,
        max_tokens=max_tokens,
        **vars(sampling),
        images=images,
        audio=clips,
        prefill_progress=PrefillBar(),
        drafter=load_draft(draft),
        draft_block_size=draft_block_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
    )
    try:
        for last in chunks:
            if not as_json:
                typer.echo(last.text, nl=False)
            text.append(last.text)
    except KeyboardInterrupt:
        typer.echo()
        raise
    if as_json:
        result = {"model": str(path), "text": "".join(text), "finish_reason": last.finish_reason}
        typer.echo(json.dumps({**result, **last.stats.as_dict()}, ensure_ascii=False))
        return
    typer.echo()
    typer.secho(
        f"[{stats_line(last.stats)}, peak memory {last.stats.peak_memory_gb:.2f} GB]", err=True, dim=True
    )


@app.command()
def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Let the model think first.")] = False,
    image: ImageOpt = None,
    audio: AudioOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens per answer.")] = 512,
    temperature: TemperatureOpt = 1.0,
    top_k: TopKOpt = 64,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    draft: DraftOpt = None,
    draft_block_size: DraftBlockOpt = 4,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
) -> None:
    """Chat in the terminal: multi-turn with cache reuse, streaming, images and audio, /commands."""
    path = resolve_model(model)
    check_media(path, image or [], audio or [])
    model_obj, processor = load_checked(path, kv_bits, kv_group_size)
    if think and not processor.supports_thinking:
        fail(f"--think: the chat template of {path} has no thinking mode")
    session = ChatSession(
        model_obj,
        processor,
        system=system,
        think=think,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature, top_k, top_p, min_p, seed),
        prefill_progress=PrefillBar(),
        drafter=load_draft(draft),
        draft_block_size=draft_block_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
    )
    for i in image or []:
        session.attach_image(i)
    for a in audio or []:
        session.attach_audio(a)
    chat_repl.repl(session, f"gemma-mlx chat - {path.name} ({model_obj.config.model_type})")


@app.command()
def info(
    model: ModelOpt = None,
    context: Annotated[int, typer.Option("--context", min=1, help="Context for the memory estimate.")] = 8192,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
    as_json: JsonOpt = False,
) -> None:
    """What a checkpoint is and costs: parameters, bits per weight, bytes per token, memory."""
    path = resolve_model(model)
    fp = footprint(path, context, kv_bits=kv_bits, kv_group_size=kv_group_size)
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
        f"KV cache at {context} tokens" + (f" ({kv_bits}-bit)" if kv_bits else ""): human_bytes(fp.kv_bytes),
        "estimated memory": human_bytes(fp.total_bytes),
        "this machine": f"{human_bytes(available)} available of {human_bytes(total)}: "
        + ("fits" if fp.total_bytes <= available else "does NOT fit"),
    }
    if as_json:
        machine = {"kv_bits": kv_bits, "memory_available_bytes": available, "memory_total_bytes": total}
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
    model: ModelOpt = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", min=1)] = 512,
    generation_tokens: Annotated[int, typer.Option("--generation-tokens", "-g", min=2)] = 128,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1)] = 3,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
    as_json: JsonOpt = False,
) -> None:
    """Measure prefill and decode tokens/s and peak memory (random prompt, greedy decode)."""
    path = resolve_model(model)
    model_obj, _ = load(path)
    typer.secho(
        f"measuring: 1 warm-up + {trials} trials of {prompt_tokens} prompt and {generation_tokens} "
        "generated tokens",
        err=True,
        dim=True,
    )
    stats = benchmark(
        model_obj, prompt_tokens, generation_tokens, trials, kv_bits=kv_bits, kv_group_size=kv_group_size
    )
    per_token = footprint(path).bytes_per_token
    data = {
        "model": str(path),
        **stats.as_dict(),
        "trials": trials,
        "bytes_per_token": per_token,
        "weights_gb_per_s": round(per_token * stats.generation_tps / 1e9, 2),
    }
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(
        f"{path.name}: prefill {stats.prompt_tps:.1f} tok/s ({prompt_tokens} tokens), decode "
        f"{stats.generation_tps:.1f} tok/s ({generation_tokens} tokens; {data['weights_gb_per_s']} GB/s "
        f"of weights read), peak memory {stats.peak_memory_gb:.2f} GB, mean of {trials} trials"
    )


app.command("convert")(convert_command)


def main() -> None:
    """Console entry point: user errors become one red line and a non-zero exit code."""
    if "--debug" in sys.argv[2:]:  # accepted after the sub-command too
        sys.argv.remove("--debug")
        sys.argv.insert(1, "--debug")
    try:
        app()
    except (ValueError, OSError, RuntimeError, ConfigError) as e:
        if state["debug"]:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
