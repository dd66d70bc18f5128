"""What the commands share: options declared once, model and drafter resolution, loading with a
memory check, the prefill progress bar."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import typer
from rich.progress import Progress

from gemma_mlx import CheckpointError, Drafter, load, load_config, load_drafter
from gemma_mlx.convert.default_model import DESCRIPTION, default_model_path
from gemma_mlx.distributed import init_group
from gemma_mlx.footprint import footprint, memory_warning
from gemma_mlx.generate import check_kv_quantization
from gemma_mlx.hub import resolve
from gemma_mlx.models.gemma import Model
from gemma_mlx.processor import Processor

# Options shared by several commands, declared once.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Checkpoint directory or Hub id org/name[@revision] (default: offline model)."
    ),
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
CheckFiniteOpt = Annotated[
    bool,
    typer.Option("--check-finite", help="Refuse weights with NaN or infinite values, naming them."),
]
DraftOpt = Annotated[
    str | None, typer.Option("--draft", help="MTP drafter checkpoint: speculative decoding.")
]
DraftBlockOpt = Annotated[
    int,
    typer.Option(
        "--draft-block-size",
        min=2,
        help="Most tokens per speculative round (last token + drafts); each round's size adapts to "
        "what pays, down to plain decoding.",
    ),
]
DistributedOpt = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Be one rank of a layer pipeline started by mlx.launch (same command on every host): "
        "rank 0 owns the terminal or HTTP side, the other ranks hold the earlier layers.",
    ),
]
LayersPerRankOpt = Annotated[
    str | None,
    typer.Option(
        "--layers-per-rank",
        metavar="N,N,...",
        help="With --distributed: layers on rank 0, 1, ... (rank 0 holds the last ones); default: "
        "balanced by bytes.",
    ),
]


DEBUG = {"on": False}  # --debug: tracebacks for every error, also those turned into a red line here


def show_error(message: str, prefix: str = "") -> None:
    """One red line; with --debug, the traceback of the exception being handled first."""
    if DEBUG["on"] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.secho(f"{prefix}error: {message}", fg=typer.colors.RED, err=True)


def fail(message: str, code: int = 1) -> None:
    show_error(message)
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


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        fail(f"{option} {text!r}: expected comma-separated integers >= 0, like 0,1024,4096")
    return values


def join_group(distributed: bool) -> mx.distributed.Group | None:
    """The group of --distributed (None without it); a clear error when it cannot be formed."""
    if not distributed:
        return None
    hint = "start the same command on every host with mlx.launch --hosts HOST1,HOST2 -- gemma-mlx ..."
    try:
        group = init_group(timeout=120)
    except RuntimeError as e:
        fail(f"--distributed: no distributed group could be formed ({e}); {hint}")
    if group.size() < 2:
        fail(f"--distributed: the group has only this process; {hint}")
    return group


def is_follower(group: mx.distributed.Group | None) -> bool:
    """Whether this process is a rank > 0 of a pipeline: it serves rank 0 and prints nothing."""
    return group is not None and group.rank() != 0


def load_checked(
    path: Path,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    group: mx.distributed.Group | None = None,
    layers_per_rank: str | None = None,
    check_finite: bool = False,
) -> tuple[Model, Processor]:
    """Load after warning when weights plus the KV cache will not fit the memory available now.
    With a `group` (--distributed) this rank loads only its stage; a follower serves rank 0 here
    and exits when rank 0 is done. Option values are checked first: a bad one fails in a second,
    not after minutes of loading."""
    try:
        check_kv_quantization(kv_bits, kv_group_size)
    except ValueError as e:
        fail(f"--kv-bits/--kv-group-size: {e}")
    if group is None:
        warning = memory_warning(footprint(path, kv_bits=kv_bits, kv_group_size=kv_group_size))
        if warning:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    counts = int_list(layers_per_rank, "--layers-per-rank") if layers_per_rank else None
    model, processor = load(path, check_finite=check_finite, distributed=group, layers_per_rank=counts)
    if model is None:  # a follower whose rank 0 finished
        raise typer.Exit(0)
    if processor is None:
        fail(f"{path}: the checkpoint has no tokenizer files")
    return model, processor
