"""Hugging Face checkpoint -> (quantized) MLX checkpoint, tensor by tensor and shard by shard.

Peak memory stays near one input shard plus one output shard: inputs are memory-mapped shard
by shard, each output tensor is evaluated as soon as it is made, and output shards are written
and released as they fill. The output appears only when complete (`writer.atomic_directory`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.checkpoint import DTYPES, CheckpointError, _shard_files, sanitize
from gemma_mlx.config import parse_config
from gemma_mlx.models.gemma import Model

from .quantize import DEFAULT_GROUP, QuantSpec, bytes_per_token, config_block, plan, quantize_weight
from .writer import atomic_directory, write_json, write_shards

COPIED = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass
class ConversionReport:
    out: Path
    parameters: int = 0
    bytes_on_disk: int = 0
    bytes_per_token: int = 0
    bits_per_weight: float = 0.0
    kept_float: list[str] = field(default_factory=list)  # layers that could not be quantized
    check: dict | None = None


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint directory, or a Hub repo id downloaded (only the needed files) into
    the user's Hugging Face cache, honouring HF_HUB_OFFLINE and the saved token."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(src).count("/") != 1 or str(src).startswith((".", "/", "~")):
        raise CheckpointError(
            f"{src}: not a checkpoint directory (and not a Hub repo id like 'google/gemma-4-12B-it')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(
            f"{src}: not in the local Hugging Face cache and the Hub cannot be reached ({e})"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{src}: download failed ({e})") from None


def _check_dtype(name: str, a: mx.array, file: Path) -> None:
    if a.dtype not in FLOAT_DTYPES and a.dtype not in (mx.uint32, mx.uint8):
        raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {a.dtype}")


def _source_tensors(src: Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    for f in _shard_files(src):
        try:
            yield f, mx.load(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


def convert(
    src: str | Path,
    out: str | Path,
    *,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str = "uniform",
    quantize: bool = True,
    dtype: str | None = None,
    quantize_embedding: bool = True,
    overrides: dict[str, QuantSpec | None] | None = None,
    force: bool = False,
    check: bool = False,
    shard_bytes: int = 4 << 30,
    progress: Callable[[str, int], None] | None = None,
) -> ConversionReport:
    """Convert a checkpoint (local directory or Hub id) into an MLX checkpoint at `out`.

    `dtype` is for the unquantized parts (default: the source's). `overrides` maps a regex on
    module paths to a `QuantSpec` (or None to keep it float). `progress(name, nbytes)` is called
    per written tensor. Drafter (`gemma4_unified_assistant`) checkpoints stay float unless
    `quantize` is given explicitly by the caller through `convert_drafter`."""
    src = resolve_source(src)
    raw = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if raw is None:
        raise CheckpointError(f"{src}: no config.json")
    if raw.get("model_type") == "gemma4_unified_assistant":
        return convert_drafter(
            src,
            out,
            bits=bits,
            group_size=group_size,
            mode=mode,
            quantize=False,
            dtype=dtype,
            force=force,
            shard_bytes=shard_bytes,
            progress=progress,
        )
    config = parse_config(raw, str(src / "config.json"))
    if config.quantization:
        raise CheckpointError(f"{src}: already quantized; convert from the float checkpoint")
    spec = QuantSpec(bits, group_size or DEFAULT_GROUP[mode], mode)
    skeleton = Model(config)  # lazy: shapes only, nothing is allocated
    expected = {k: v.shape for k, v in tree_flatten(skeleton.parameters())}
    layout = plan(skeleton, spec, recipe, quantize_embedding, overrides) if quantize else {}
    target = DTYPES[dtype] if dtype else None

    def tensors() -> Iterator[tuple[str, mx.array]]:
        seen = set()
        for file, shard in _source_tensors(src):
            for name, a in sanitize(shard).items():
                _check_dtype(name, a, file)
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name} for this config")
                if tuple(a.shape) != tuple(expected[name]):
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {tuple(a.shape)}, config.json implies "
                        f"{tuple(expected[name])}"
                    )
                seen.add(name)
                float_dtype = target or a.dtype
                path, _, leaf = name.rpartition(".")
                s = layout.get(path)
                if s is not None and leaf == "weight":
                    parts = quantize_weight(a, s, float_dtype)
                    mx.eval(*parts.values())
                    yield from ((f"{path}.{k}", v) for k, v in parts.items())
                else:
                    b = a.astype(float_dtype)
                    mx.eval(b)
                    yield name, b
            del shard
        missing = sorted(set(expected) - seen)
        if missing:
            raise CheckpointError(f"{src}: missing tensors: {', '.join(missing[:12])}")

    report = ConversionReport(out=Path(out))
    report.parameters = sum(v.size for _, v in tree_flatten(skeleton.parameters()))
    report.bytes_per_token = bytes_per_token(skeleton, layout, (target or mx.bfloat16).size)
    report.kept_float = sorted(p for p, s in layout.items() if s is None)
    _write(src, report, raw, tensors(), layout, spec, recipe, force, shard_bytes, progress)
    if check:
        report.check = check_conversion(src, out)
    return report


def convert_drafter(
    src: Path,
    out: str | Path,
    *,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    quantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
    shard_bytes: int = 4 << 30,
    progress=None,
) -> ConversionReport:
    """The MTP assistant: no model class is needed; its 2-D `*.weight` matrices other than norms
    are its Linears (and the tied embedding). Kept in float by default: quantized drafters were
    reported to lose the speculative-decoding gain."""
    spec = QuantSpec(bits, group_size or DEFAULT_GROUP[mode], mode)
    raw = json.loads((src / "config.json").read_text())
    target = DTYPES[dtype] if dtype else None
    layout: dict[str, QuantSpec | None] = {}

    def tensors() -> Iterator[tuple[str, mx.array]]:
        for file, shard in _source_tensors(src):
            for name, a in shard.items():
                _check_dtype(name, a, file)
                report.parameters += a.size
                path, _, leaf = name.rpartition(".")
                linear = leaf == "weight" and a.ndim == 2 and "norm" not in path
                if quantize and linear and a.shape[-1] % spec.group_size == 0:
                    layout[path] = spec
                    parts = quantize_weight(a, spec, target or a.dtype)
                    mx.eval(*parts.values())
                    yield from ((f"{path}.{k}", v) for k, v in parts.items())
                else:
                    yield name, a.astype(target or a.dtype)

    report = ConversionReport(out=Path(out))
    _write(src, report, raw, tensors(), layout, spec, "uniform", force, shard_bytes, progress)
    return report


def _write(
    src: Path,
    report: ConversionReport,
    raw: dict,
    tensors: Iterator[tuple[str, mx.array]],
    layout: dict[str, QuantSpec | None],
    spec: QuantSpec,
    recipe: str,
    force: bool,
    shard_bytes: int,
    progress: Callable[[str, int], None] | None,
) -> None:
    """The output directory of either conversion: shards, config with the quantization block (if
    anything was quantized), the tokenizer and template files, a model card; atomically."""
    with atomic_directory(report.out, force=force) as tmp:

        def on_tensor(name: str, a: mx.array) -> None:
            report.bytes_on_disk += a.nbytes
            if progress is not None:
                progress(name, a.nbytes)

        write_shards(tmp, tensors, shard_bytes, on_tensor)
        quantized = any(s is not None for s in layout.values())
        if quantized:
            block = config_block(layout, spec)
            raw = {**raw, "quantization": block, "quantization_config": block}
        write_json(tmp / "config.json", raw)
        for name in COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        report.bits_per_weight = 8 * report.bytes_on_disk / max(report.parameters, 1)
        (tmp / "README.md").write_text(model_card(src, report, spec if quantized else None, recipe))


def model_card(src: Path, report: ConversionReport, spec: QuantSpec | None, recipe: str) -> str:
    how = (
        "not quantized"
        if spec is None
        else f"{spec.mode} {spec.bits}-bit, group {spec.group_size}, recipe {recipe}"
    )
    lines = [
        f"# {src.name} (MLX, converted by gemma-mlx)",
        "",
        f"- source: `{src}`",
        f"- quantization: {how}",
        f"- bits per weight (all stored tensors / parameters): {report.bits_per_weight:.3f}",
        f"- size on disk: {report.bytes_on_disk / 1e9:.3f} GB",
    ]
    if report.bytes_per_token:
        lines.append(
            f"- bytes read per decoded token (text weights, tied head once): "
            f"{report.bytes_per_token / 1e9:.3f} GB"
        )
    if report.kept_float:
        lines.append(
            f"- kept in float (input width not a multiple of the group size): {', '.join(report.kept_float)}"
        )
    return "\n".join(lines) + "\n"


def check_conversion(src: Path, out: Path, ids: list[int] | None = None) -> dict:
    """Logit differences and top-1 agreement of the converted model against the source."""
    from gemma_mlx.checkpoint import load_model
    from gemma_mlx.quality import compare, log_probs

    reference, converted = load_model(src, dtype="float32"), load_model(out)
    vocab = reference.config.text.vocab_size
    ids = ids or [2] + [(i * 7919) % (vocab - 10) + 5 for i in range(63)]
    ref_lp, out_lp = log_probs(reference, ids), log_probs(converted, ids)
    q = compare(ref_lp, out_lp, ids)
    diff = abs(ref_lp - out_lp)
    return {
        "max_logprob_diff": float(diff.max()),
        "mean_logprob_diff": float(diff.mean()),
        "top1_agreement": q.top1_agreement,
        "mean_kl": q.mean_kl,
    }
