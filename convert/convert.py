"""Hugging Face checkpoint -> (quantized) MLX checkpoint, tensor by tensor, shard by shard.

1. Every safetensors header is read and checked first (names, shapes against config.json, dtypes,
   truncation), so a corrupt input fails in a second, naming the file and tensor, before any work.
2. Tensors are then read lazily one at a time: each is quantized (or cast), evaluated, and its
   input released, so memory holds one output shard plus one tensor, never the model.
3. The output appears only when complete (`writer.atomic_directory`): an exception or Ctrl-C
   leaves nothing behind.

Output tensors and quantization-block paths carry the names the MLX ecosystem uses (`saved_name`:
mlx-vlm's `language_model.model.*` for the unified model, mlx-lm's `model.*` for text models, the
assistant checkpoint's own for the MTP drafter), so mlx-vlm and mlx-lm load our output too; the
models' `sanitize` reads every layout back.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as ProgressBar,
)

from gemma_mlx.checkpoint import CheckpointError, layer_quantization, listing, load_drafter, load_model
from gemma_mlx.config import ConfigError, load_config, parse_config, parse_drafter_config, read_config
from gemma_mlx.footprint import TEXT_PREFIX, decode_bytes, footprint
from gemma_mlx.hub import parse_repo_id, resolve
from gemma_mlx.models.drafter import Drafter
from gemma_mlx.models.gemma import Model
from gemma_mlx.processor import Processor
from gemma_mlx.safetensors_file import DTYPE_SIZES, FLOAT_DTYPES, read_headers

from .calibrate import METHODS as CALIBRATED
from .calibrate import CalibrationReport, calibrate
from .calibration import BUILTIN, calibration_set
from .dwq import DISTILLED, STEPS, check_settings, distill
from .quantize import (
    FLOAT_BYTES,
    Override,
    QuantSpec,
    check_supported,
    config_block,
    layout_sizes,
    plan,
    quantize_weight,
)
from .sensitivity import BudgetError, Sensitivity, allocate, measure, plan_json, units_of
from .writer import SHARD_BYTES, atomic_directory, human_size, write_json, write_shards

DRAFTER = "gemma4_unified_assistant"
# calibration windows for --bits-per-weight: each unit's variants run these through the model
SENSITIVITY_SAMPLES, SENSITIVITY_LENGTH = 8, 128
METHODS = (*CALIBRATED, *DISTILLED)  # every --method
# Files of a checkpoint besides the weights that a converted directory keeps.
COPIED = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
FLOAT_ARRAY_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
}
Progress = Callable[[str, int], None]  # (tensor name, input bytes) after each converted tensor


@dataclass
class ConversionReport:
    out: Path
    source: str
    kind: str = "model"  # or "drafter"
    quantization: dict | None = None  # the config block written (None: float conversion)
    recipe: str = "uniform"
    dtype: str | None = None  # float dtype of the unquantized parts (None: as in the source)
    parameters: int = 0
    tensors: int = 0  # tensors written
    weight_bytes: int = 0  # their data
    bytes_on_disk: int = 0  # the whole directory: shards with headers, config, tokenizer, ...
    # bytes of weights read per decoded token (model: text weights, tied embedding once as the
    # LM head, vision/audio excluded; drafter: all of its weights, per draft step)
    bytes_per_token: int = 0
    source_bytes_per_token: int = 0  # the same measure for the source (model conversions)
    kept_float: dict[str, str] = field(default_factory=dict)  # quantizable layer -> why float
    seconds: float = 0.0  # writing the output
    check: dict | None = None
    check_seconds: float = 0.0  # the --check comparison (it loads both models)
    allocation: list[tuple[str, str]] | None = None  # --bits-per-weight: (spec, its units) rows
    method: str = "rtn"  # rtn, or a calibrated method (`calibrate.METHODS`)
    calibration: CalibrationReport | None = None
    calibration_source: str | None = None

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per parameter over the whole model (scales, biases and float parts included)."""
        return 8 * self.weight_bytes / max(self.parameters, 1)

    @property
    def how(self) -> str:
        if self.quantization is None:
            return f"not quantized ({self.dtype or 'source dtype'})"
        q = self.quantization
        return f"{q['mode']} {q['bits']}-bit, group {q['group_size']}, recipe {self.recipe}"

    @property
    def method_text(self) -> str:
        c = self.calibration
        if c is None:
            return "rtn (round to nearest)"
        return (
            f"{self.method}, calibrated on {c.samples} prompts ({c.tokens:,} tokens, "
            f"{self.calibration_source}) in {c.seconds:.0f} s"
        )

    def rows(self) -> list[tuple[str, str]]:
        """(measure, value) lines for the summary table and the model card."""
        per = "bytes read per draft step" if self.kind == "drafter" else "bytes read per decoded token"
        rows = [
            ("quantization", self.how),
            *([("method", self.method_text)] if self.quantization else []),
            ("bits per weight", f"{self.bits_per_weight:.3f}"),
            ("size on disk", human_size(self.bytes_on_disk)),
            (per, human_size(self.bytes_per_token)),
            *(
                [("source bytes read per token", human_size(self.source_bytes_per_token))]
                if self.source_bytes_per_token
                else []
            ),
            ("parameters", f"{self.parameters:,}"),
        ]
        if self.kept_float:
            rows.append(("quantizable layers kept in float", str(len(self.kept_float))))
        rows += [(f"units at {spec}", units) for spec, units in self.allocation or []]
        for key, value in (self.check or {}).items():
            rows.append((f"check: {key.replace('_', ' ')}", f"{value:.4f}"))
        if self.check is not None:
            rows.append(("check: time", f"{self.check_seconds:.1f} s"))
        return rows


# ---------------------------------------------------------------------------------------------
# Source: local directory or Hub id; headers checked before any work


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint directory, or a Hub id `org/name[@revision]` downloaded into the Hugging
    Face cache (`gemma_mlx.hub.resolve`, the resolver `--model` and `--draft` use too)."""
    return resolve(src, "checkpoint")


class _Checker:
    """Every tensor must be a float parameter of the configured model with the configured shape;
    each exactly once; none missing at the end."""

    def __init__(self, expected: dict[str, tuple[int, ...]]):
        self.expected, self.seen = expected, {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: str, ok: bool, where: str) -> None:
        if not ok:
            raise CheckpointError(
                f"{where}: tensor {name} has unsupported dtype {dtype} "
                "(expected float32, bfloat16 or float16)"
            )
        if name in self.seen:
            raise CheckpointError(f"{where}: tensor {name} also appears in {self.seen[name]}")
        if name not in self.expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} for the model config.json describes")
        if tuple(shape) != self.expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(shape)}, config.json implies {self.expected[name]}"
            )
        self.seen[name] = where

    def finish(self, where: str) -> None:
        missing = sorted(set(self.expected) - set(self.seen))
        if missing:
            raise CheckpointError(f"{where}: missing tensors: {listing(missing)}")


@dataclass
class _Target:
    """What is being written: the lazy skeleton (shapes only) and how source names map to it."""

    kind: str
    module: nn.Module
    rename: Callable[[str], str | None]  # None: drop (the tied `lm_head.weight`)
    prefix: str  # parameters read per decoded token (model) / per draft step (drafter)

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in tree_flatten(self.module.parameters())}


def _renamer(module: Model | Drafter) -> Callable[[str], str | None]:
    """One source name -> its name in `module` (by the module's own `sanitize`), None if dropped."""
    return lambda name: next(iter(module.sanitize({name: None})), None)


def _target(raw: dict, where: str) -> _Target:
    if raw.get("model_type") == DRAFTER:
        drafter = Drafter(parse_drafter_config(raw, where))
        return _Target("drafter", drafter, _renamer(drafter), "")
    model = Model(parse_config(raw, where))
    return _Target("model", model, _renamer(model), TEXT_PREFIX)


def _read_config(src: Path) -> dict:
    f = src / "config.json"
    try:
        raw = read_config(f)
    except ConfigError as e:  # the source checkpoint as a whole is what cannot be converted
        raise CheckpointError(str(e)) from None
    if raw.get("quantization_config") and not raw.get("quantization"):
        raise CheckpointError(
            f"{f}: quantized by another tool (quantization_config without an MLX 'quantization' block); "
            "convert from the float checkpoint"
        )
    return raw


def _source_quantization(raw: dict, target: _Target, names: list[str]) -> dict[str, QuantSpec]:
    """Our module path -> how the source stores it, for every layer an MLX source has quantized."""
    if not raw.get("quantization"):
        return {}
    found = layer_quantization(target.module, raw["quantization"], [target.rename(n) or "" for n in names])
    try:
        return {path: QuantSpec(**spec) for path, spec in found.items()}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: unsupported 'quantization' block ({e})") from None


def _check_source(
    src: Path, raw: dict, target: _Target
) -> tuple[list[Path], int, int, dict[str, int], dict[str, QuantSpec]]:
    """Check every header against the config before converting anything -> (shards, tensors,
    bytes, element size of each tensor by our name, the source's quantized layers). A quantized
    layer is checked with its float shape."""
    headers = read_headers(src)
    quantized = _source_quantization(raw, target, [n for h in headers.values() for n in h])
    check, count, nbytes, itemsize = _Checker(target.expected), 0, 0, {}
    tied = raw.get("tie_word_embeddings", (raw.get("text_config") or {}).get("tie_word_embeddings", True))
    for f, header in headers.items():
        for name, t in header.items():
            if name == "lm_head.weight" and tied is False:
                raise CheckpointError(f"{f}: an untied lm_head.weight; Gemma's LM head is the tied embedding")
            ours = target.rename(name)
            if ours is None:
                continue
            path, _, leaf = ours.rpartition(".")
            nbytes += t.nbytes
            itemsize[ours] = DTYPE_SIZES[t.dtype]
            if path in quantized and leaf in ("scales", "biases"):
                continue  # checked with their weight when dequantized
            if path in quantized and leaf == "weight":
                shape = (*t.shape[:-1], t.shape[-1] * 32 // quantized[path].bits)
                check(ours, shape, t.dtype, t.dtype == "U32", str(f))
            else:
                check(ours, t.shape, t.dtype, t.dtype in FLOAT_DTYPES, str(f))
            count += 1
    check.finish(str(src))
    for path in quantized:  # dequantized in the dtype of the scales (fp modes: uint8 scales)
        scales = itemsize.pop(f"{path}.scales", 2)
        itemsize.pop(f"{path}.biases", None)
        itemsize[f"{path}.weight"] = scales if scales > 1 else 2
    return list(headers), count, nbytes, itemsize, quantized


def _quantized_part(name: str, quantized: Mapping[str, QuantSpec]) -> bool:
    path, _, leaf = name.rpartition(".")
    return path in quantized and leaf in ("weight", "scales", "biases")


def _read_source(
    files: list[Path],
    rename: Callable[[str], str | None],
    quantized: Mapping[str, QuantSpec],
    packed: Collection[str] = (),
) -> Iterator[tuple[str, mx.array, int]]:
    """(our name, lazy array, input bytes) shard by shard; each tensor is dropped from the shard's
    dict when handed out, so it is freed as soon as the consumer has converted it. Quantized
    layers come out dequantized (MLX's own `mx.dequantize` with the source's spec); their
    `scales`/`biases` are held (lazily) until their weight arrives; those in `packed` (kept as
    they are) come out as stored."""
    held: dict[str, mx.array] = {}
    packed_names = {f"{p}.{leaf}" for p in packed for leaf in ("weight", "scales", "biases")}
    for f in files:
        try:
            shard = mx.load(str(f))
        except Exception as e:  # MLX raises RuntimeError/ValueError for bad headers and truncation
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        names = {rename(k): k for k in shard}
        names.pop(None, None)
        held.update(
            {
                n: shard.pop(k)
                for n, k in names.items()
                if _quantized_part(n, quantized) and n not in packed_names
            }
        )
        for name, key in names.items():
            if key not in shard:
                continue
            a = shard.pop(key)
            yield name, a, a.nbytes
        for name in [n for n in held if n.endswith(".weight")]:
            path = name.removesuffix(".weight")
            if f"{path}.scales" not in held or (
                quantized[path].mode == "affine" and f"{path}.biases" not in held
            ):
                continue  # its scales/biases are in a later shard
            w, scales, biases = held.pop(name), held.pop(f"{path}.scales"), held.pop(f"{path}.biases", None)
            spec = quantized[path]
            nbytes = w.nbytes + scales.nbytes + (0 if biases is None else biases.nbytes)
            yield name, mx.dequantize(w, scales, biases, spec.group_size, spec.bits, mode=spec.mode), nbytes
    if held:
        raise CheckpointError(f"quantized tensors without their weight or scales: {listing(sorted(held))}")


def _refuse_more_bits(
    src: Path, layout: Mapping[str, QuantSpec | None], quantized: Mapping[str, QuantSpec]
) -> None:
    """Requantizing cannot restore precision the source has already lost."""
    for path, spec in layout.items():
        have = quantized.get(path)
        if spec is not None and have is not None and spec.bits > have.bits:
            raise CheckpointError(
                f"{src}: {path} is stored at {have.bits} bits; requantizing it to {spec.bits} bits "
                f"cannot restore what was lost. Choose at most {have.bits} bits for it (--bits, --recipe, "
                "--override), or convert from the float checkpoint"
            )


# ---------------------------------------------------------------------------------------------
# Writing


def _float_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"--dtype {dtype!r}: expected bfloat16, float16 or float32 (bf16, fp16, fp32)")
    return name


@contextmanager
def _progress(progress: bool | Progress | None, total_bytes: int | None, total_tensors: int | None):
    """A rich bar (bytes and tensors) on stderr for `True`, the caller's callback if callable."""
    if callable(progress) or not progress:
        yield progress or None
        return

    columns = (
        TextColumn("[bold]converting"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
        TimeRemainingColumn(),
    )
    with ProgressBar(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("converting", total=total_bytes, done=0, count=total_tensors or "?")
        done = 0

        def advance(name: str, nbytes: int) -> None:
            nonlocal done
            done += 1
            bar.update(task, advance=nbytes, done=done)

        yield advance


def _encode(
    items: Iterable[tuple[str, mx.array, int]],
    layout: Mapping[str, QuantSpec | None],
    dtype: mx.Dtype | None,
    advance: Progress | None,
    packed: Collection[str] = (),
) -> Iterator[tuple[str, mx.array]]:
    """Quantize the planned `.weight`s, cast the rest; evaluate each result at once so that its
    input can be freed (a lazy graph would keep every input alive until the shard is saved).
    Layers in `packed` arrive already quantized as planned and are written as they are."""
    for name, a, nbytes in items:
        path, _, leaf = name.rpartition(".")
        spec = layout.get(path) if leaf == "weight" else None
        if path in packed:
            out = [(name, a)]
        elif spec is not None:
            out = [(f"{path}.{k}", v) for k, v in quantize_weight(a, spec, dtype or a.dtype).items()]
        else:
            out = [(name, a if dtype is None else a.astype(dtype))]
        del a
        mx.eval(*(v for _, v in out))
        if advance is not None:
            advance(name, nbytes)
        yield from out


def _with_dtype(raw: dict, dtype: str | None) -> dict:
    """Record a new float dtype where the config names one (`dtype`/`torch_dtype`, sub-configs too)."""
    if dtype is None:
        return raw
    out = {}
    for k, v in raw.items():
        if k in ("dtype", "torch_dtype"):
            v = dtype
        elif isinstance(v, dict) and k.endswith("_config"):
            v = _with_dtype(v, dtype)
        out[k] = v
    return out


def _write(
    out: Path,
    raw: dict,
    items: Iterable[tuple[str, mx.array, int]],
    target: _Target,
    report: ConversionReport,
    layout: dict[str, QuantSpec | None],
    spec: QuantSpec,
    *,
    extra_files: Mapping[str, Path | str | bytes],
    force: bool,
    shard_bytes: int,
    progress: bool | Progress | None,
    totals: tuple[int | None, int | None],
    itemsize: Mapping[str, int] | None = None,
    packed: Collection[str] = (),
    finalize: Callable[[Path], None] | None = None,
) -> ConversionReport:
    """The output directory, atomically: shards + index, config.json (with the quantization block
    if anything is quantized), extra files, model card. `itemsize`: element size of each source
    tensor (our names), for the expected output size checked against the free disk space."""
    for s in {s for s in layout.values() if s is not None}:
        check_supported(s)
    report.parameters = sum(v.size for _, v in tree_flatten(target.module.parameters()))
    report.kept_float = {p: report.kept_float.get(p, "") for p, s in layout.items() if s is None}
    save = target.module.saved_name
    if any(s is not None for s in layout.values()):
        report.quantization = config_block({save(p): s for p, s in layout.items()}, spec)
        raw = {**raw, "quantization": report.quantization, "quantization_config": report.quantization}
    dtype = report.dtype
    raw = _with_dtype(raw, dtype)
    start = time.perf_counter()
    # Freed buffers go back to the system instead of MLX's cache, which would otherwise grow
    # towards the size of the model over a conversion.
    cache_limit = mx.set_cache_limit(0)
    try:
        float_bytes = FLOAT_BYTES[dtype] if dtype else itemsize
        needed = sum(layout_sizes(target.module, layout, float_bytes).values()) if float_bytes else None
        sizes: dict[str, int] = {}
        with (
            atomic_directory(out, force=force, needed=needed) as tmp,
            _progress(progress, *totals) as advance,
        ):

            def counted(encoded: Iterable[tuple[str, mx.array]]) -> Iterator[tuple[str, mx.array]]:
                for name, a in encoded:
                    report.tensors += 1
                    report.weight_bytes += a.nbytes
                    sizes[name] = a.nbytes
                    yield save(name), a

            float_dtype = getattr(mx, dtype) if dtype else None
            write_shards(tmp, counted(_encode(items, layout, float_dtype, advance, packed)), shard_bytes)
            report.bytes_per_token = decode_bytes(sizes, target.prefix)
            write_json(tmp / "config.json", raw)
            for name, content in extra_files.items():
                if isinstance(content, Path):
                    shutil.copyfile(content, tmp / name)
                elif isinstance(content, bytes):
                    (tmp / name).write_bytes(content)
                else:
                    (tmp / name).write_text(content)
            report.bytes_on_disk = sum(f.stat().st_size for f in tmp.iterdir())
            report.seconds = time.perf_counter() - start
            if "README.md" not in extra_files:
                (tmp / "README.md").write_text(model_card(report))
            if finalize is not None:
                finalize(tmp)
    finally:
        mx.set_cache_limit(cache_limit)
    return report


def _refuse_overlap(src: Path, out: Path) -> None:
    """OUT may be neither SRC, nor inside it (the source would change under the converter and
    keep the result), nor around it (--force would delete the source with the old OUT)."""
    src, out = src.resolve(), out.resolve()
    if out == src or out in src.parents:
        raise CheckpointError(f"{out}: would replace the source checkpoint {src}; choose another output")
    if src in out.parents:
        raise CheckpointError(f"{out}: lies inside the source checkpoint {src}; choose another output")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    quantize: bool = True,
    dtype: str | None = None,
    quantize_embedding: bool = True,
    quantize_multimodal: bool = False,
    quantize_drafter: bool = False,
    overrides: Mapping[str, Override] | None = None,
    bits_per_weight: float | None = None,
    sensitivity: Sensitivity | None = None,
    force: bool = False,
    check: bool = False,
    progress: bool | Progress | None = True,
    shard_bytes: int = SHARD_BYTES,
    method: str = "rtn",
    calibration: str | Path = BUILTIN,
    calibration_samples: int = 32,
    calibration_length: int = 256,
    dwq_steps: int | None = None,
) -> ConversionReport:
    """Convert a checkpoint (local directory, Hugging Face or float MLX, or a Hub repo id) into an
    MLX checkpoint at `out`.

    - `bits`/`group_size`/`mode`: MLX quantization (group size default: 64 affine, 32 mxfp4/mxfp8,
      16 nvfp4) of every text Linear and of the tied embedding (`quantize_embedding=False` keeps
      it); the vision/audio projections stay float unless `quantize_multimodal`.
    - `recipe`: None/"uniform" or a mixed recipe (`quantize.RECIPES`); `overrides`: regex on the
      module path -> `QuantSpec`, bits, or None (float); later patterns win.
    - `bits_per_weight`: instead of a recipe, per-unit precisions (embedding; each layer's
      attention and MLP) chosen from `sensitivity.CANDIDATES` by their measured effect on the
      output (`sensitivity.measure` on `calibration`: "builtin" or a .txt/.jsonl file) to this
      budget, as `ConversionReport.bits_per_weight` counts it; `quantization_plan.json` in `out`
      records the choice. `sensitivity`: a measurement of this source to reuse.
    - `dtype`: float dtype of everything not quantized ("bfloat16"/"float16"/"float32"; default
      as in the source); `quantize=False` writes a float checkpoint.
    - A `gemma4_unified_assistant` drafter stays float unless `quantize_drafter`.
    - `progress`: True for a rich bar on stderr, or a callback `(tensor name, input bytes)`.
    - `check`: compare the result with the source on a short prompt (`check_conversion`).
    - `method`: "rtn" (round to nearest, MLX's quantizer), or "awq" / "gptq" calibrated on
      `calibration` ("builtin" or a .txt/.jsonl file, `calibration_samples` prompts of
      `calibration_length` tokens) layer by layer (`calibrate`); the output layout is the same.
      "dwq" / "awq+dwq" / "gptq+dwq": the codes of RTN / AWQ / GPTQ, then the scales and biases
      trained end to end for `dwq_steps` steps against the float model on the calibration
      text (`dwq.distill`).
    """
    spec = QuantSpec.make(bits, group_size, mode)  # bad flags fail before any download
    if bits_per_weight is not None:
        _check_budget_flags(bits_per_weight, recipe, mode, overrides, quantize)
        # the base plan: units get the budget's choice; the rest (--quantize-multimodal) 4-bit g64
        spec = QuantSpec()
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method not in ("rtn", "awq") and mode != "affine":
        raise ValueError(f"--method {method}: affine quantization only (got --mode {mode})")
    if method in DISTILLED:
        check_settings(STEPS if dwq_steps is None else dwq_steps, 1.0, 1, 1)
    dtype = _float_dtype(dtype)
    source = resolve_source(src)
    out = Path(out)
    _refuse_overlap(source, out)
    raw = _read_config(source)
    target = _target(raw, str(source / "config.json"))
    if target.kind == "drafter":
        quantize = quantize and quantize_drafter
    files, count, nbytes, itemsize, quantized = _check_source(source, raw, target)
    notes: dict[str, str] = {}
    layout = (
        plan(target.module, spec, recipe, quantize_embedding, overrides, notes, quantize_multimodal)
        if quantize
        else {}
    )
    extra = {n: source / n for n in COPIED if (source / n).is_file()}
    allocation = None
    if bits_per_weight is not None:
        if target.kind != "model":
            raise ValueError(
                "--bits-per-weight measures a model's output; it does not apply to an MTP drafter"
            )
        if quantized:
            raise CheckpointError(
                f"{source}: --bits-per-weight measures the float model; convert from a float checkpoint"
            )
        float_bytes = FLOAT_BYTES[dtype] if dtype else itemsize
        layout, allocation, plan_doc = _budget(
            source, target.module, layout, bits_per_weight, float_bytes, calibration, sensitivity, progress
        )
        extra["quantization_plan.json"] = json.dumps(plan_doc, indent=1) + "\n"
        specs = [s for s in layout.values() if s is not None]
        spec = max(sorted(set(specs), key=str), key=specs.count)  # the config's global entry
    _refuse_more_bits(source, layout, quantized)
    # a layer the source already stores as planned is copied: requantizing is not idempotent
    # (measured: 12 % of 4-bit attention weights move by up to 2/3 of a step)
    packed = {p for p, q in quantized.items() if layout.get(p) == q and dtype is None}
    report = ConversionReport(
        out, str(src), target.kind, recipe=recipe or "uniform", dtype=dtype, kept_float=notes
    )
    if allocation is not None:
        report.recipe, report.allocation = f"budget {bits_per_weight} bits per weight", allocation.table()
    if target.kind == "model":
        report.source_bytes_per_token = footprint(source).bytes_per_token
    items = _read_source(files, target.rename, quantized, packed)
    calibrated = quantize and method != "rtn" and any(s is not None for s in layout.values())
    if calibrated:
        if target.kind != "model":
            raise ValueError(f"--method {method}: calibration is for models, not the {target.kind}")
        if quantized:
            raise CheckpointError(f"{source}: --method {method} needs a float source checkpoint")
    with ExitStack() as stack:
        if calibrated:
            out.resolve().parent.mkdir(parents=True, exist_ok=True)
            # next to the output: the calibrated layers wait there (on disk, not in memory)
            scratch = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".calibration-", dir=out.resolve().parent)
            )
            report.method, report.calibration_source = method, str(calibration)
            replaced, done = _calibrate(
                source, layout, method, dtype, Path(scratch), report, progress,
                calibration, calibration_samples, calibration_length, dwq_steps,
            )  # fmt: skip
            items, packed = _replaced(items, replaced, done), packed | done
        _write(
            out,
            raw,
            items,
            target,
            report,
            layout,
            spec,
            extra_files=extra,
            force=force,
            shard_bytes=shard_bytes,
            progress=progress,
            totals=(nbytes, count),
            itemsize=itemsize,
            packed=packed,
        )
    if check:
        check_fn = check_drafter if target.kind == "drafter" else check_conversion
        start = time.perf_counter()
        if progress is True:  # the check loads both models: say so rather than sit silent
            with Console(stderr=True).status("checking the result against the source (loads both models)"):
                report.check = check_fn(source, out)
        else:
            report.check = check_fn(source, out)
        report.check_seconds = time.perf_counter() - start
    return report


def _check_budget_flags(
    budget: float, recipe: str | None, mode: str, overrides: Mapping | None, quantize: bool
) -> None:
    if not isinstance(budget, int | float) or not math.isfinite(budget):
        raise BudgetError(f"--bits-per-weight {budget!r}: expected a finite number, e.g. 4.5")
    if not quantize:
        raise ValueError("--bits-per-weight quantizes; it cannot go with --no-quantize")
    if recipe not in (None, "uniform"):
        raise ValueError(
            f"--bits-per-weight chooses every unit's precision itself; drop --recipe {recipe} (or the budget)"
        )
    if mode != "affine":
        raise ValueError(f"--bits-per-weight uses affine candidates; drop --mode {mode}")
    if overrides:
        raise ValueError("--bits-per-weight chooses every unit's precision itself; drop --override")


def _budget(
    source: Path,
    module: Model,
    base: dict[str, QuantSpec | None],
    budget: float,
    float_bytes: int | Mapping[str, int],
    calibration: str | Path,
    sensitivity: Sensitivity | None,
    progress: bool | Progress | None,
):
    """The layout for `budget` bits per weight from the measured sensitivity of the float source
    (measured here unless given) -> (layout, `Allocation`, the plan JSON document)."""
    units = units_of([p for p, s in base.items() if s is not None])
    if sensitivity is None:
        processor = Processor.from_dir(source)
        if processor is None:
            raise CheckpointError(
                f"{source}: --bits-per-weight needs the tokenizer to read the calibration text"
            )
        windows = [
            c.ids for c in calibration_set(processor, calibration, SENSITIVITY_SAMPLES, SENSITIVITY_LENGTH)
        ]
        console = Console(stderr=True)
        log = console.print if progress is True else None
        if log:
            log(f"measuring the sensitivity of {len(units)} units on {sum(map(len, windows))} tokens")
        model = load_model(source)
        sensitivity = measure(model, windows, units, log=log)
        del model
        mx.clear_cache()
    alloc = allocate(module, base, sensitivity.kl, units, budget, float_bytes)
    return alloc.layout, alloc, plan_json(alloc, sensitivity, str(calibration))


def _calibrate(
    source: Path,
    layout: dict[str, QuantSpec | None],
    method: str,
    dtype: str | None,
    scratch: Path,
    report: ConversionReport,
    progress: bool | Progress | None,
    calibration: str | Path,
    samples: int,
    length: int,
    dwq_steps: int | None = None,
) -> tuple[dict[str, mx.array], set[str]]:
    """Run the calibrated method on the source's float layers, loaded lazily one at a time (and a
    distilled method's training after it: `dwq.distill`)."""
    processor = Processor.from_dir(source)
    if processor is None:
        raise CheckpointError(f"{source}: --method {method} needs the checkpoint's tokenizer for calibration")
    model = load_model(source, dtype=None, lazy=True)
    prompts = calibration_set(
        processor,
        calibration,
        samples,
        length,
        vision=model.config.vision is not None,
        audio=model.config.audio is not None,
    )
    stored = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    if dtype is not None:
        stored = dict.fromkeys(stored, getattr(mx, dtype))

    def dtype_of(name: str) -> mx.Dtype:
        return stored[name]

    log = None
    if progress is True:
        console = Console(stderr=True)
        log = console.print
    first = DISTILLED.get(method, method)
    replaced, done = {}, set()
    if first != "rtn":
        replaced, done, report.calibration = calibrate(model, layout, first, prompts, scratch, dtype_of, log)
    if method in DISTILLED:
        if first != "rtn":  # calibration released the layers it went through
            model = load_model(source, dtype=None, lazy=True)
        replaced, done, report.calibration = distill(
            model, layout, prompts, dtype_of, method=method, start=replaced, steps=dwq_steps, log=log
        )
    return replaced, done


def _replaced(
    items: Iterable[tuple[str, mx.array, int]], replaced: Mapping[str, mx.array], done: Collection[str]
) -> Iterator[tuple[str, mx.array, int]]:
    """The source's tensors with the calibrated ones in their place; a layer calibrated into its
    quantized form comes as its weight, scales and biases."""
    for name, a, nbytes in items:
        path = name.removesuffix(".weight")
        if path in done and name.endswith(".weight"):
            del a
            yield name, replaced[name], nbytes
            yield f"{path}.scales", replaced[f"{path}.scales"], 0
            yield f"{path}.biases", replaced[f"{path}.biases"], 0
        elif name in replaced:
            del a
            yield name, replaced[name], nbytes
        else:
            yield name, a, nbytes


def convert_drafter(
    src: str | Path, out: str | Path, *, quantize: bool = False, **kwargs
) -> ConversionReport:
    """Convert an MTP assistant checkpoint; float unless `quantize` (peers saw quantized drafters
    lose the speculative-decoding gain). Other arguments as for `convert`."""
    return convert(src, out, quantize=quantize, quantize_drafter=quantize, **kwargs)


def write_checkpoint(
    out: str | Path,
    config: dict,
    weights: Mapping[str, mx.array] | Iterable[tuple[str, mx.array]],
    *,
    quantization: QuantSpec | None = None,
    recipe: str | None = None,
    quantize_embedding: bool = True,
    quantize_multimodal: bool = False,
    overrides: Mapping[str, Override] | None = None,
    dtype: str | None = None,
    extra_files: Mapping[str, Path | str | bytes] | None = None,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
    progress: bool | Progress | None = False,
    source: str = "in-memory weights",
    finalize: Callable[[Path], None] | None = None,
) -> ConversionReport:
    """Write an MLX checkpoint from an in-memory `config` dict and float `weights` (our names or
    the checkpoint's; any order; an iterator is consumed tensor by tensor), quantized with
    `quantization` (None: float), atomically. `extra_files` maps a file name to a `Path` to copy,
    `bytes` or `str` content (tokenizer, templates, ...); `finalize(tmp)` runs on the complete
    directory just before it is moved into place. Same checks and layout as `convert` (every
    writer of checkpoints goes through here or `convert`: one layout, which mlx-lm and mlx-vlm load)."""
    config = dict(config)
    if config.get("quantization") or config.get("quantization_config"):
        raise CheckpointError(f"{source}: config already has a quantization block")
    dtype = _float_dtype(dtype)
    target = _target(config, f"{source} (config)")
    check = _Checker(target.expected)
    totals: tuple[int | None, int | None] = (None, None)
    itemsize = None
    if isinstance(weights, Mapping):
        totals = (sum(a.nbytes for a in weights.values()), len(weights))
        itemsize = {target.rename(k): a.dtype.size for k, a in weights.items()}
        weights = weights.items()

    def items() -> Iterator[tuple[str, mx.array, int]]:
        for key, a in weights:
            name = target.rename(key)
            if name is not None:
                check(name, a.shape, str(a.dtype), a.dtype in FLOAT_ARRAY_DTYPES, source)
                yield name, a, a.nbytes
        check.finish(source)

    spec = quantization or QuantSpec()
    notes: dict[str, str] = {}
    layout = (
        plan(target.module, spec, recipe, quantize_embedding, overrides, notes, quantize_multimodal)
        if quantization
        else {}
    )
    report = ConversionReport(
        Path(out), source, target.kind, recipe=recipe or "uniform", dtype=dtype, kept_float=notes
    )
    return _write(
        Path(out),
        config,
        items(),
        target,
        report,
        layout,
        spec,
        extra_files=extra_files or {},
        force=force,
        shard_bytes=shard_bytes,
        progress=progress,
        totals=totals,
        itemsize=itemsize,
        finalize=finalize,
    )


# ---------------------------------------------------------------------------------------------
# Report


def model_card(report: ConversionReport) -> str:
    hub = None if Path(report.source).expanduser().exists() else parse_repo_id(report.source)
    front = ["---", "library_name: mlx", "tags: [mlx, gemma-mlx, gemma4]"]
    if hub:
        front.append(f"base_model: {hub[0]}")
    lines = [
        *front,
        "---",
        "",
        f"# {Path(report.source).name} for MLX ({report.how})",
        "",
        f"Converted by gemma-mlx from `{report.source}`. Load with `gemma_mlx.load(path)` or run "
        "`gemma-mlx chat --model path`.",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in report.rows()),
        "",
    ]
    if report.kind == "model":
        lines.append(
            "\nBytes per decoded token: every text weight is read once per token, the tied embedding "
            "once as the LM head (its row lookup is negligible); vision and audio weights are idle "
            "in decode. Decode speed is about memory bandwidth divided by this figure."
        )
    if report.quantization:
        lines.append(
            "\nQuantized with MLX's own quantizer (`mx.quantize`); norms, layer scalars, position "
            "tables and LayerNorms stay in float."
        )
        if report.calibration is not None:
            how = {
                "awq": "AWQ: activation-aware per-input-channel scales, searched on calibration "
                "activations and folded into the preceding norm (q/k/v, gate/up) or up_proj (down_proj), "
                "then round to nearest",
                "gptq": "GPTQ: each decoder Linear quantized column by column with its rounding error "
                "compensated through the calibration Hessian",
            }
            c = report.calibration
            if report.method in DISTILLED:
                trained = (
                    "decoder Linears and the tied embedding / LM head"
                    if any(".layers." not in p for p in getattr(c, "trained", ()))
                    else "decoder Linears (the tied embedding / LM head: round to nearest)"
                )
                lines.append(
                    f"\nMethod: DWQ: the integer codes of {DISTILLED[report.method].upper()}, then the "
                    f"quantization scales and biases of the {trained} trained end to end ({c.steps} Adam "
                    "steps on the KL from the float model's next-token distribution) on "
                    f"{c.samples} calibration prompts ({report.calibration_source}). The stored layout is "
                    "plain MLX affine quantization."
                )
            else:
                lines.append(
                    f"\nMethod: {how[report.method]}; layer by layer on {c.samples} calibration prompts "
                    f"({report.calibration_source}). The stored layout is plain MLX affine quantization. "
                    "The tied embedding / LM head and any quantized vision/audio projection use round to "
                    "nearest."
                )
    if report.kept_float:
        lines += ["", "Quantizable layers kept in float:", ""]
        lines += [f"- `{p}`: {why}" for p, why in sorted(report.kept_float.items())]
    return "\n".join(lines) + "\n"


def _logits_of(path: Path, ids: list[int], dtype: str | None) -> np.ndarray:
    model = load_model(path, dtype=dtype)
    logits = np.array(model(mx.array([ids])).astype(mx.float32), dtype=np.float64)[0]
    del model
    mx.clear_cache()
    return logits


def _compare(ref: np.ndarray, out: np.ndarray) -> dict:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    diff = np.abs(ref - out)
    lp_ref, lp_out = log_softmax(ref), log_softmax(out)
    return {
        "max_logit_diff": float(diff.max()),
        "mean_logit_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()),
        "mean_kl": float((np.exp(lp_ref) * (lp_ref - lp_out)).sum(-1).mean()),
    }


CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees Celsius at sea level, "
    "and the capital of France is Paris. def add(a, b):\n    return a + b\n"
)


def check_conversion(src: str | Path, out: str | Path, ids: list[int] | None = None) -> dict:
    """Logit differences, top-1 agreement and KL of the converted model against the source on a
    short prompt. The two models are loaded one after the other, so memory holds only one."""
    if ids is None:
        processor = Processor.from_dir(out)
        if processor is not None:
            ids = processor.encode_text(CHECK_TEXT)[:64]
        else:  # weights-only directory: spread token ids over the vocabulary
            vocab = load_config(out).text.vocab_size
            ids = [2] + [(i * 7919) % (vocab - 10) + 5 for i in range(31)]
    converted = _logits_of(Path(out), ids, None)
    return _compare(_logits_of(Path(src), ids, None), converted)


def check_drafter(src: str | Path, out: str | Path, steps: int = 8) -> dict:
    """The converted drafter against the source on random (seeded) target states and K/V: its
    draft logits are what decide acceptance."""

    def run(path: Path) -> np.ndarray:
        drafter = load_drafter(path)
        text, backbone = drafter.config.text, drafter.config.backbone_hidden_size
        keys = mx.random.split(mx.random.key(0), 6)
        emb = mx.random.normal((steps, 1, backbone), key=keys[0])
        hidden = mx.random.normal((steps, 1, backbone), key=keys[1])
        kv = {}
        for i, kind in enumerate(sorted(set(text.layer_types))):
            spec = text.layers[text.layer_types.index(kind)]
            shape = (steps, spec.num_kv_heads, 16, spec.head_dim)
            kv[kind] = (
                mx.random.normal(shape, key=keys[2 + 2 * i]),
                mx.random.normal(shape, key=keys[3 + 2 * i]),
                None,
            )
        logits, _ = drafter(emb, hidden, kv, 16)
        return np.array(logits.astype(mx.float32), dtype=np.float64)[:, 0]

    converted = run(Path(out))
    return _compare(run(Path(src)), converted)
