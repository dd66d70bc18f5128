"""Calibration sets: the prompts a calibrated quantizer (AWQ, GPTQ) or a sensitivity measure runs
through the model to see real activations.

`calibration_set(processor, "builtin" | FILE, ...)` -> a list of `Inputs` (token ids plus media
tensors, as `Processor.prepare` makes them).

- `builtin` works offline anywhere and shares nothing with the held-out evaluation text (KJV
  Genesis prose in benchmarks/data): English docstrings and source code of a fixed list of Python
  standard-library modules, read with `inspect` at run time (no text is shipped), tokenized and cut
  into evenly spaced windows. The text depends on the Python version (its stdlib), nothing else.
  For a model with vision/audio, some samples carry a synthetic image (deterministic gradients,
  stripes and noise) or a synthetic audio clip (deterministic chirps and noise), put through the
  same processor and media code as real prompts, so the vision/audio projections and the image
  blocks' bidirectional masks see the activations they see in use.
- A `.txt` file is tokenized and cut into windows the same way.
- A `.jsonl` file holds one prompt per line: `{"text": ..., "image": path, "audio": path}` (media
  optional, paths relative to the file); each line is one sample, cut at `length` tokens when it
  has no media.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from gemma_mlx import media
from gemma_mlx.processor import Inputs, Processor

BUILTIN = "builtin"
# Modules whose docstrings and source make the builtin text: long, English, stable, pure Python.
MODULES = (
    "argparse",
    "collections",
    "json.decoder",
    "textwrap",
    "dataclasses",
    "functools",
    "pathlib",
    "inspect",
    "statistics",
    "fractions",
    "difflib",
    "string",
    "calendar",
    "heapq",
    "bisect",
    "shutil",
    "csv",
    "logging",
    "unittest.case",
    "email.message",
    "http.client",
    "urllib.parse",
    "zipfile",
    "tarfile",
    "decimal",
    "typing",
)
MEDIA_PROMPTS = (
    "Describe this picture in detail.",
    "What does this image show? Answer in one sentence.",
    "Transcribe the audio and describe the sound.",
    "What can you hear in this recording?",
)


class CalibrationError(ValueError):
    """A calibration file that cannot be used (names the file and line)."""


def _module_text(name: str) -> str:
    """A module's docstrings (module, then its public classes and functions in name order) and its
    source, as one text."""
    try:
        module = importlib.import_module(name)
    except ImportError:  # a trimmed Python lacks some modules: the rest still make the set
        return ""
    parts = [inspect.getdoc(module) or ""]
    with warnings.catch_warnings():  # `typing.io` and friends warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
    try:
        parts.append(inspect.getsource(module))
    except (OSError, TypeError):
        pass
    return "\n\n".join(p for p in parts if p)


def builtin_text(chars: int) -> Iterator[str]:
    """Standard-library documentation and code: an equal share of `chars` characters from the
    start of each module's text (its docstrings, then its source), so every module contributes."""
    share = max(chars // len(MODULES), 2000)
    for name in MODULES:
        text = _module_text(name)
        if text:
            yield text[:share]


def _windows(ids: list[int], samples: int, length: int, bos: int | None, where: str) -> list[list[int]]:
    """`samples` windows of `length` tokens (BOS first) spread evenly over `ids`; fewer (with a
    shorter last one) when the text is short."""
    body = length - (bos is not None)
    if not ids:
        raise CalibrationError(f"{where}: no text to calibrate on")
    n = max(1, min(samples, len(ids) // body))
    stride = max(body, (len(ids) - body) // max(n - 1, 1)) if n > 1 else body
    prefix = [bos] if bos is not None else []
    return [prefix + ids[i * stride : i * stride + body] for i in range(n)]


def _tokens(processor: Processor, texts: Iterator[str] | list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += processor.encode_text(text, add_bos=False)
    return ids


def _media_samples(
    processor: Processor, count: int, vision: bool, audio: bool, max_soft_tokens: int
) -> list[Inputs]:
    out = []
    for i in range(count):
        if vision and (i % 2 == 0 or not audio):
            image = media.synthetic_image(i)
            out.append(
                processor.prepare(MEDIA_PROMPTS[i % 2], images=[image], max_soft_tokens=max_soft_tokens)
            )
        elif audio:
            out.append(
                processor.prepare(
                    MEDIA_PROMPTS[2 + i % 2], audio=[(media.synthetic_audio(i), float(media.SAMPLE_RATE))]
                )
            )
    return out


def _jsonl(processor: Processor, path: Path, length: int, samples: int) -> list[Inputs]:
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or not entry["text"]:
            raise CalibrationError(f'{where}: expected an object with a non-empty "text" string')
        unknown = set(entry) - {"text", "image", "audio"}
        if unknown:
            raise CalibrationError(f"{where}: unknown keys {sorted(unknown)} (expected text, image, audio)")
        found = {}
        for key in ("image", "audio"):
            if key in entry:
                if not isinstance(entry[key], str):
                    raise CalibrationError(f'{where}: "{key}" must be a path string')
                p = (path.parent / entry[key]).expanduser()
                if not p.is_file():
                    raise CalibrationError(f"{where}: {key} file {p} does not exist")
                found[key] = p
        try:
            inputs = processor.prepare(
                entry["text"],
                images=[found["image"]] if "image" in found else [],
                audio=[found["audio"]] if "audio" in found else [],
            )
        except ValueError as e:  # MediaError included
            raise CalibrationError(f"{where}: {e}") from None
        if not inputs.has_media:
            inputs.ids = inputs.ids[:length]
        out.append(inputs)
        if len(out) == samples:
            break
    if not out:
        raise CalibrationError(f"{path}: no calibration prompts (the file has no non-empty lines)")
    return out


def calibration_set(
    processor: Processor,
    source: str | Path = BUILTIN,
    samples: int = 32,
    length: int = 256,
    vision: bool = False,
    audio: bool = False,
    media_fraction: float = 0.25,
    max_soft_tokens: int = 280,
) -> list[Inputs]:
    """The calibration prompts: `samples` windows of `length` tokens of `source` ("builtin", a
    .txt or a .jsonl file). With `vision`/`audio` (the model has them) the builtin set replaces
    `media_fraction` of its windows (at least one each) with synthetic image/audio prompts
    (images at `max_soft_tokens`, the processor's default budget)."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration: samples ({samples}) must be >= 1 and length ({length}) >= 2")
    bos = processor.tokenizer.bos_token_id
    if str(source) == BUILTIN:
        n_media = max(int(vision) + int(audio), round(samples * media_fraction)) if vision or audio else 0
        n_text = max(samples - n_media, 1)
        # about 3.5 characters per token in English prose and code; twice that, for spread
        ids = _tokens(processor, builtin_text(7 * n_text * length))
        text = [Inputs(w) for w in _windows(ids, n_text, length, bos, "builtin calibration text")]
        return text + _media_samples(processor, n_media, vision, audio, max_soft_tokens)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CalibrationError(f"--calibration {source}: no such file (expected 'builtin', a .txt or .jsonl)")
    if path.suffix == ".jsonl":
        return _jsonl(processor, path, length, samples)
    if path.suffix != ".txt":
        raise CalibrationError(f"{path}: expected a .txt or .jsonl calibration file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise CalibrationError(f"{path}: the file is empty")
    return [Inputs(w) for w in _windows(_tokens(processor, [text]), samples, length, bos, str(path))]
