"""`gemma-mlx serve`: the OpenAI-compatible HTTP server (`gemma_mlx.server`) on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from gemma_mlx.server import create_app

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
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="GEMMA_MLX_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
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
    distributed: DistributedOpt = False,
    layers_per_rank: LayersPerRankOpt = None,
) -> None:
    """Serve the model over HTTP: OpenAI's API (/v1/chat/completions, /v1/responses, /v1/completions,
    /v1/models) and Anthropic's (/v1/messages)."""
    for d in allow_files or []:
        if not d.expanduser().is_dir():
            fail(f"--allow-files {d}: no such directory")
    group = join_group(distributed)
    path = resolve_model(model)
    loaded, processor = load_checked(path, kv_bits, kv_group_size, group, layers_per_rank)
    drafter = load_draft(draft)
    if host not in LOOPBACK and api_key is None:
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
        api_key=api_key,
        allow_files=allow_files or (),
        cache_gb=cache_gb,
        max_queue=max_queue,
        model_aliases=model_alias or (),
        any_model=any_model,
    )
    shown = f"[{host}]" if ":" in host else host
    typer.secho(f"Serving {name!r} at http://{shown}:{port}/v1", fg=typer.colors.CYAN, err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
