"""The `gemma-mlx` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import typer
from rich.console import Console
from rich.table import Table

from gemma_mlx import (
    ConfigError,
    GenerationStats,
    __version__,
    load,
    stream_generate,
)
from gemma_mlx.benchmark import bench_report
from gemma_mlx.chat import ChatSession
from gemma_mlx.footprint import footprint, memory_bytes
from gemma_mlx.generate import check_kv_quantization
from gemma_mlx.sample import SamplingParams

from . import agent as agent_cli
from . import chat as chat_repl
from .bench_plot import PlotUnavailable, plot_decode, pyplot
from .common import (
    DEBUG,
    AudioOpt,
    CheckFiniteOpt,
    DistributedOpt,
    DraftBlockOpt,
    DraftOpt,
    ImageOpt,
    JsonOpt,
    KvBitsOpt,
    KvGroupOpt,
    LayersPerRankOpt,
    MinPOpt,
    ModelOpt,
    PrefillBar,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    check_media,
    fail,
    int_list,
    is_follower,
    join_group,
    load_checked,
    load_draft,
    resolve_model,
)
from .convert import convert_command
from .serve import serve

app = typer.Typer(
    name="gemma-mlx",
    help="Run Google's Gemma 4 12B (and Gemma 3) with MLX. Commands: generate (complete a prompt), chat "
    "(terminal chat), serve (OpenAI-compatible server), convert (HF/MLX checkpoints -> MLX, quantized), "
    "info (what a checkpoint costs), bench (measure speed).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
state = {"debug": False}


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
    state["debug"] = DEBUG["on"] = debug


def stats_line(stats: GenerationStats) -> str:
    line = f"{stats.prompt_tokens} prompt tokens at {stats.prompt_tps:.1f} tok/s"
    line += f", {stats.generation_tokens} generated"
    if stats.generation_tokens > 1:  # the first token comes with the prefill: one token has no decode rate
        line += f" at {stats.generation_tps:.1f} tok/s"
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
    distributed: DistributedOpt = False,
    layers_per_rank: LayersPerRankOpt = None,
    mcp: agent_cli.McpOpt = None,
    mcp_config: agent_cli.McpConfigOpt = None,
    yes: agent_cli.YesOpt = False,
    max_tool_calls: agent_cli.MaxToolCallsOpt = 8,
    tool_timeout: agent_cli.ToolTimeoutOpt = 60.0,
    check_finite: CheckFiniteOpt = False,
) -> None:
    """Complete a prompt and print the text as it is generated; with --mcp, answer it as a chat
    turn in which the model may call tools from MCP servers."""
    if (mcp or mcp_config) and (distributed or draft is not None):
        fail("--mcp: not with --distributed or --draft in generate (use chat)")
    group = join_group(distributed)
    if is_follower(group):
        prompt = ""  # rank 0 reads the prompt; this rank only runs its layers
    elif prompt is None:
        if sys.stdin.isatty():
            fail("give a prompt as an argument or on stdin")
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    else:  # bytes that were not UTF-8 reach argv as surrogates: show them as U+FFFD instead
        prompt = prompt.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    path = resolve_model(model)
    servers = agent_cli.server_specs(mcp, mcp_config)
    if servers and not yes and not sys.stdin.isatty():
        fail("--mcp: tool calls need consent at a terminal; pass --yes to allow every call")
    images, clips = image or [], audio or []
    check_media(path, images, clips)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)  # option checks before the load
    drafter = load_draft(draft)
    model_obj, processor = load_checked(path, kv_bits, kv_group_size, group, layers_per_rank, check_finite)
    if servers:
        session = ChatSession(
            model_obj,
            processor,
            max_tokens=max_tokens,
            sampling=sampling,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
        for i in images:
            session.attach_image(i)
        for a in clips:
            session.attach_audio(a)
        with agent_cli.open_tools(servers, tool_timeout) as tools:
            agent = agent_cli.make_agent(session, tools, yes, max_tool_calls)
            answer = agent_cli.render(agent.send(prompt), echo_text=not as_json)
        if as_json:
            calls = [m for m in session.history if m["role"] == "tool"]
            result = {"model": str(path), "text": answer, "tool_results": calls}
            typer.echo(json.dumps({**result, **session.stats.as_dict()}, ensure_ascii=False))
        else:
            typer.echo()
        return
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
        drafter=drafter,
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
    distributed: DistributedOpt = False,
    layers_per_rank: LayersPerRankOpt = None,
    mcp: agent_cli.McpOpt = None,
    mcp_config: agent_cli.McpConfigOpt = None,
    yes: agent_cli.YesOpt = False,
    max_tool_calls: agent_cli.MaxToolCallsOpt = 8,
    tool_timeout: agent_cli.ToolTimeoutOpt = 60.0,
    check_finite: CheckFiniteOpt = False,
) -> None:
    """Chat in the terminal: multi-turn with cache reuse, streaming, images and audio, /commands;
    with --mcp, the model calls tools from MCP servers (each call asked first)."""
    group = join_group(distributed)
    path = resolve_model(model)
    servers = agent_cli.server_specs(mcp, mcp_config)
    check_media(path, image or [], audio or [])
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)  # option checks before the load
    drafter = load_draft(draft)
    model_obj, processor = load_checked(path, kv_bits, kv_group_size, group, layers_per_rank, check_finite)
    if think and not processor.supports_thinking:
        fail(f"--think: the chat template of {path} has no thinking mode")
    session = ChatSession(
        model_obj,
        processor,
        system=system,
        think=think,
        max_tokens=max_tokens,
        sampling=sampling,
        prefill_progress=PrefillBar(),
        drafter=drafter,
        draft_block_size=draft_block_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
    )
    for i in image or []:
        session.attach_image(i)
    for a in audio or []:
        session.attach_audio(a)
    banner = f"gemma-mlx chat - {path.name} ({model_obj.config.model_type})"
    tools = agent_cli.open_tools(servers, tool_timeout)
    if tools is None:
        chat_repl.repl(session, banner)
        return
    with tools:  # the servers are stopped on the way out, whatever ends the chat
        agent = agent_cli.make_agent(session, tools, yes, max_tool_calls)
        chat_repl.repl(session, banner + f", {len(tools.tools)} MCP tools", agent)


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
    prompt_tokens: Annotated[
        str, typer.Option("--prompt-tokens", "-p", help="Prompt lengths for prefill and TTFT, e.g. 128,512.")
    ] = "128,512",
    generation_tokens: Annotated[
        int, typer.Option("--generation-tokens", "-g", min=2, help="Tokens decoded per run.")
    ] = 64,
    trials: Annotated[int, typer.Option("--trials", "-r", min=1, help="Runs after a warm-up (median).")] = 3,
    depths: Annotated[
        str | None,
        typer.Option(
            "--depths", "-d", help="Context depths to decode at (default 0,1024,4096,16384; CPU: 0,256)."
        ),
    ] = None,
    draft: DraftOpt = None,
    draft_block_size: DraftBlockOpt = 4,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
    as_json: JsonOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Also write decode tok/s against context depth to this PNG (extra: plot)."
        ),
    ] = None,
) -> None:
    """Measure prefill (tok/s, time to first token), decode at context depths, achieved GB/s
    against this machine's copy bandwidth, peak memory, a unified model's image and audio prefill
    latency, and with --draft speculative decoding against plain decoding in the same run (random
    prompts, greedy)."""
    if plot is not None:
        try:
            pyplot()  # before minutes of measuring
        except PlotUnavailable as e:
            fail(str(e))
    lengths = int_list(prompt_tokens, "--prompt-tokens")
    if min(lengths) < 1:
        fail(f"--prompt-tokens {prompt_tokens!r}: prompts need at least 1 token")
    depth_list = None if depths is None else int_list(depths, "--depths")
    check_kv_quantization(kv_bits, kv_group_size)
    path = resolve_model(model)
    drafter = load_draft(draft)
    model_obj, processor = load(path)
    typer.secho(
        f"measuring on {mx.default_device()}: 1 warm-up + {trials} trials per row, {generation_tokens} "
        "tokens decoded per run",
        err=True,
        dim=True,
    )
    report = bench_report(
        model_obj,
        footprint(path).bytes_per_token,
        prompt_lengths=lengths,
        depths=depth_list,
        generation_tokens=generation_tokens,
        trials=trials,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        drafter=drafter,
        draft_block_size=draft_block_size,
        processor=processor,
    )
    if plot is not None:
        plot_decode(report, plot, path.name)
        typer.secho(f"plot written to {plot}", err=True, dim=True)
    if as_json:
        typer.echo(json.dumps({"model": str(path), **report}))
        return
    console = Console()
    table = Table(title=f"{path.name} on {report['device']}")
    for column in ("test", "tok/s", "TTFT", "bytes/token", "GB/s", "of copy bw"):
        table.add_column(column, justify="right")
    for row in report["prefill"]:
        tps, ttft = f"{row['prefill_tps']:.1f}", f"{row['ttft_s']:.3f} s"
        table.add_row(f"prefill {row['prompt_tokens']}", tps, ttft)
    for row in report.get("media", []):  # prompt tokens and the preprocessing time alongside
        table.add_row(
            f"prefill {row['input']}",
            f"{row['prefill_tps']:.1f}",
            f"{row['ttft_s']:.3f} s",
            f"{row['prompt_tokens']} tokens",
            "",
            f"+{row['preprocess_s']:.2f} s prep",
        )
    for row in report["decode"]:
        table.add_row(
            f"decode @ {row['depth']}",
            f"{row['decode_tps']:.1f}",
            "",
            human_bytes(row["bytes_per_token"]),
            f"{row['gb_per_s']:.2f}",
            f"{row['bandwidth_fraction']:.0%}",
        )
    if "draft" in report:
        d = report["draft"]
        table.add_row(
            f"MTP decode @ {d['depth']} (<= {d['max_block_size']}/round)",
            f"{d['decode_tps']:.1f}",
            "",
            f"{d['speedup']:.2f}x plain",
            f"accepted {d['acceptance']:.0%}",
            f"{d['tokens_per_round']:.2f} tok/round",
        )
    console.print(table)
    console.print(
        f"copy bandwidth {report['copy_bandwidth_gb_per_s']:.1f} GB/s, peak memory "
        f"{report['peak_memory_gb']:.2f} GB, median of {trials} trials"
    )


app.command("convert")(convert_command)
app.command()(serve)


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
