"""`gemma-mlx convert SRC OUT`: the Typer command (registered in cli/app.py)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemma_mlx.convert import MODES, RECIPES, QuantSpec, convert, parse_override
from gemma_mlx.convert.convert import METHODS
from gemma_mlx.convert.dwq import BATCH_SIZE, LEARNING_RATE, STEPS, TOP_K, check_settings
from gemma_mlx.convert.writer import SHARD_BYTES

from .common import DEBUG


def report_table(report, title: str):
    """The end-of-conversion summary as a rich Table."""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in report.rows():
        table.add_row(key, value)
    return table


def convert_command(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Checkpoint directory or Hub id org/name[@revision] (e.g. google/gemma-4-12B-it); "
            "float, or an MLX one already quantized (requantized to at most its bits).",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (written atomically).")],
    bits: Annotated[
        int, typer.Option(help="Bits per weight: affine 2/3/4/5/6/8; mxfp4/nvfp4 4; mxfp8 8.")
    ] = 4,
    group_size: Annotated[
        int | None, typer.Option(help="Weights per scale: affine 32/64/128 (default 64); fp modes fixed.")
    ] = None,
    mode: Annotated[str, typer.Option(help=f"Quantization mode: {', '.join(MODES)}.")] = "affine",
    recipe: Annotated[
        str,
        typer.Option(
            help="uniform, or mixed_L_H: L bits, H bits on v_proj/down_proj of favoured layers and "
            f"the LM head ({', '.join(r for r in RECIPES if r != 'uniform')})."
        ),
    ] = "uniform",
    override: Annotated[
        list[str] | None,
        typer.Option(
            help="Per-layer override PATTERN=SPEC (regex on module paths; SPEC: float, BITS, "
            "BITS:GROUP, mxfp4, mxfp8, nvfp4). Repeatable; later ones win."
        ),
    ] = None,
    bits_per_weight: Annotated[
        float | None,
        typer.Option(
            help="Budget instead of --bits/--recipe: per-unit precisions (embedding, each layer's "
            "attention and MLP; affine 3-bit, 4-bit g64/g32, 5/6/8-bit) chosen by their measured effect "
            "on the output, e.g. 4.5 (the result's bits per weight, scales included).",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Float dtype of unquantized parts: bfloat16, float16, float32.")
    ] = None,
    quantize: Annotated[
        bool, typer.Option("--quantize/--no-quantize", help="--no-quantize: float conversion.")
    ] = True,
    quantize_embedding: Annotated[
        bool,
        typer.Option("--quantize-embedding/--keep-embedding", help="Quantize the tied embedding / LM head."),
    ] = True,
    quantize_multimodal: Annotated[
        bool,
        typer.Option(
            "--quantize-multimodal/--keep-multimodal",
            help="Quantize the vision/audio projections too (default: keep them in float, as mlx-vlm).",
        ),
    ] = False,
    quantize_drafter: Annotated[
        bool,
        typer.Option(
            "--quantize-drafter/--no-quantize-drafter",
            help="Quantize an MTP drafter checkpoint (default: keep it in float).",
        ),
    ] = False,
    shard_gb: Annotated[
        float, typer.Option(help="Output shard size in GiB (memory use is about one shard).")
    ] = SHARD_BYTES / 2**30,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Compare the result with the source on a short prompt.")
    ] = False,
    method: Annotated[
        str,
        typer.Option(
            help="rtn (round to nearest), awq (activation-aware scales folded into the norms) or gptq "
            "(Hessian error compensation); awq/gptq calibrate layer by layer. dwq / awq+dwq / gptq+dwq: "
            "the codes of rtn / awq / gptq, then the scales and biases trained end to end against the "
            "float model (distilled weight quantization). Same output layout."
        ),
    ] = "rtn",
    calibration: Annotated[
        str,
        typer.Option(
            help="Calibration prompts for awq/gptq and --bits-per-weight: builtin (stdlib docs and "
            "code, plus synthetic "
            "images/audio for the unified model), a .txt file, or a .jsonl of "
            '{"text", "image", "audio"} lines.'
        ),
    ] = "builtin",
    calibration_samples: Annotated[int, typer.Option(help="Calibration prompts (awq/gptq).")] = 32,
    calibration_length: Annotated[int, typer.Option(help="Tokens per calibration prompt.")] = 256,
    dwq_steps: Annotated[
        int | None,
        typer.Option(help=f"Adam steps of --method dwq / awq+dwq / gptq+dwq (default {STEPS})."),
    ] = None,
) -> None:
    """Convert a Hugging Face or MLX checkpoint into a (quantized) MLX checkpoint."""
    try:  # flag errors before any download or reading
        spec = QuantSpec.make(bits, group_size, mode)
        if recipe not in RECIPES:
            raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
        overrides = dict(parse_override(o, spec) for o in override or [])
        if bits_per_weight is not None and (recipe != "uniform" or overrides):
            flag = f"--recipe {recipe}" if recipe != "uniform" else "--override"
            raise ValueError(f"--bits-per-weight chooses every unit's precision itself; drop {flag}")
        if method not in METHODS:
            raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
        if dwq_steps is not None:
            check_settings(dwq_steps, LEARNING_RATE, BATCH_SIZE, TOP_K)
    except ValueError as e:
        if DEBUG["on"]:
            traceback.print_exc()
        raise typer.BadParameter(str(e)) from None
    report = convert(
        src,
        out,
        bits=spec.bits,
        group_size=spec.group_size,
        mode=spec.mode,
        recipe=recipe,
        quantize=quantize,
        dtype=dtype,
        quantize_embedding=quantize_embedding,
        quantize_multimodal=quantize_multimodal,
        quantize_drafter=quantize_drafter,
        overrides=overrides,
        bits_per_weight=bits_per_weight,
        force=force,
        check=check,
        progress=True,
        shard_bytes=int(shard_gb * 2**30),
        method=method,
        calibration=calibration,
        calibration_samples=calibration_samples,
        calibration_length=calibration_length,
        dwq_steps=dwq_steps,
    )
    console = Console()
    took = f"{report.seconds:.0f} s" + (f" + {report.check_seconds:.0f} s check" if report.check else "")
    console.print(report_table(report, f"{src} -> {out} ({took})"))
    for path, why in sorted(report.kept_float.items())[:12]:
        console.print(f"  kept in float: {path} ({why})", style="dim")
