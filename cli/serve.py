"""`gemma-mlx serve`: the OpenAI-compatible HTTP server (`gemma_mlx.server`) on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gemma_mlx.server import create_app
from gemma_mlx.server.serving import KEEP_ALIVE, MAX_CONNECTIONS, REQUEST_TIMEOUT, run

from .common import (
    DistributedOpt,
    DraftBlockOpt,
    DraftOpt,
    KvBitsOpt,
    KvGroupOpt,
    LayersPerRankOpt,
    ModelOpt,
    fail,
    join_group,
    load_checked,
    load_draft,
    resolve_model,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8080,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="GEMMA_MLX_API_KEY",
            help="Require 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
            "(repeatable: each key gets its own prefix cache).",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option("--api-keys-file", help="File with one accepted key per line.")
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-origin",
            help="Browser origin allowed to call the API, e.g. https://app.example ('*': any).",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host", help="Host name clients may use beside IP addresses and localhost ('*': any)."
        ),
    ] = None,
    default_max_tokens: Annotated[
        int,
        typer.Option("--default-max-tokens", min=1, help="Answer length when a request sets no max_tokens."),
    ] = 8192,
    request_timeout: Annotated[
        float,
        typer.Option("--request-timeout", min=1.0, help="Seconds a connection has to send a whole request."),
    ] = REQUEST_TIMEOUT,
    max_connections: Annotated[
        int, typer.Option("--max-connections", min=1, help="Open connections served at once (beyond: 503).")
    ] = MAX_CONNECTIONS,
    draft: DraftOpt = None,
    draft_block_size: DraftBlockOpt = 4,
    kv_bits: KvBitsOpt = None,
    kv_group_size: KvGroupOpt = 64,
    cache_gb: Annotated[
        float, typer.Option("--cache-gb", min=0.0, help="Memory for the prefix cache's snapshots (0 = off).")
    ] = 4.0,
    allow_files: Annotated[
        list[Path] | None,
        typer.Option("--allow-files", help="Directory whose files may be sent as images (repeatable)."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests that may wait for the model (beyond: 429).")
    ] = 32,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            "--max-concurrency",
            min=1,
            help="Requests decoded together (default: from free memory and a request's KV cache at 8K "
            "tokens, at most 8; 1 with --distributed).",
        ),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="The model name clients send (default: the directory's).")
    ] = None,
    model_alias: Annotated[
        list[str] | None,
        typer.Option(
            "--model-alias",
            help="Another name the model answers to (repeatable), e.g. a claude-... name for Claude Code.",
        ),
    ] = None,
    any_model: Annotated[
        bool, typer.Option("--any-model", help="Answer whatever model name a client sends.")
    ] = False,
    ui: Annotated[
        bool, typer.Option("--ui/--no-ui", help="Serve the chat page at / (on by default).")
    ] = True,
    distributed: DistributedOpt = False,
    layers_per_rank: LayersPerRankOpt = None,
) -> None:
    """Serve the model over HTTP: OpenAI's API (/v1/chat/completions, /v1/responses, /v1/completions,
    /v1/models), Anthropic's (/v1/messages) and a chat page at /."""
    keys = list(api_key or [])
    if api_keys_file is not None:
        try:
            lines = api_keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--api-keys-file {api_keys_file}: cannot be read ({e.__class__.__name__})")
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            fail(f"--api-keys-file {api_keys_file}: holds no key")
    if any(not k.strip() for k in keys):
        fail("--api-key: a key must not be empty (leave the option out to serve without a key)")
    for d in allow_files or []:
        if not d.expanduser().is_dir():
            fail(f"--allow-files {d}: no such directory")
    group = join_group(distributed)
    path = resolve_model(model)
    loaded, processor = load_checked(path, kv_bits, kv_group_size, group, layers_per_rank)
    drafter = load_draft(draft)
    if host not in LOOPBACK and not allow_host:
        typer.secho(
            f"note: clients must reach {host} by IP address or localhost; allow host names with --allow-host",
            err=True,
        )
    if host not in LOOPBACK and not keys:
        typer.secho(f"warning: serving on {host} without --api-key", fg=typer.colors.YELLOW, err=True)
    name = model_id or path.name
    app = create_app(
        loaded,
        processor,
        model_id=name,
        drafter=drafter,
        draft_block_size=draft_block_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        api_keys=keys,
        allow_origins=allow_origin or (),
        allow_hosts=allow_host or (),
        default_max_tokens=default_max_tokens,
        allow_files=allow_files or (),
        cache_gb=cache_gb,
        max_queue=max_queue,
        max_concurrency=max_concurrency,
        model_aliases=model_alias or (),
        any_model=any_model,
        ui=ui,
    )
    shown = f"[{host}]" if ":" in host else host
    typer.secho(f"Serving {name!r} at http://{shown}:{port}/v1", fg=typer.colors.CYAN, err=True)
    if ui:
        typer.secho(f"Chat page: http://{shown}:{port}/", fg=typer.colors.CYAN, err=True)
    run(
        app,
        host,
        port,
        request_timeout=request_timeout,
        max_connections=max_connections,
        keep_alive=KEEP_ALIVE,
    )
