"""The one checked reader of safetensors headers and of a checkpoint's list of shards.

Everything that looks at a checkpoint's weights before loading them (the loader, the memory
guard and `info`, the converter) goes through here, so a hostile or broken file fails the same
way everywhere: a `CheckpointError` naming the file, never a hang, a traceback or a huge
allocation. A FIFO, device or directory named `*.safetensors` is refused before it is opened
(opening a FIFO for reading blocks until a writer appears), and an index may only name files
inside the checkpoint folder.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Element sizes of the safetensors dtypes (the format's own list); anything else is refused.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F32", "BF16", "F16")
# The reference implementation refuses headers over 100 MB; the 12B's is about 100 KB.
MAX_HEADER_BYTES = 100 << 20
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensors."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section (after the header)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def regular_file_size(path: Path) -> int:
    """The size of `path` (symlinks followed), or a CheckpointError unless it is a regular file.
    Checked with stat before any open, so a FIFO or a device cannot block the reader."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise CheckpointError(f"{path}: is {kind}, expected a regular safetensors file")
    return st.st_size


def _read_exactly(path: Path, n: int) -> tuple[bytes, int]:
    """The first `n` bytes of a regular file and its size. Opened non-blocking and re-checked
    with fstat, so a file swapped for a FIFO after the stat still cannot hang us."""
    regular_file_size(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(min(n, st.st_size)), st.st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
    finally:
        os.close(fd)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, info: object, data_bytes: int) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: bad safetensors header: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise bad(f"data_offsets ({start}, {end}) are not an ordered pair of offsets")
    if end > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends {end - data_bytes} bytes past the end of the "
            f"file ({data_bytes} data bytes after the header)"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise bad(f"data_offsets span {end - start} bytes, but {dtype} {tuple(shape)} needs {expected}")
    return TensorInfo(dtype, tuple(shape), start, end)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """`name -> TensorInfo` of one safetensors file, every field checked against the file itself
    (header length within the file, JSON object, known dtypes, offsets inside the data section
    and matching shape x dtype size). Raises CheckpointError naming the file."""
    path = Path(path)
    head, size = _read_exactly(path, 8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: bad safetensors header: it claims {n} header bytes, the file has {size} "
            "(not a safetensors file, or corrupt)"
        )
    raw, size = _read_exactly(path, 8 + n)
    if len(raw) < 8 + n:  # shrank since the first read
        raise CheckpointError(f"{path}: truncated while reading its header")
    try:
        header = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: bad safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: bad safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: bad safetensors header: __metadata__ is not a JSON object")
    return {name: _entry(path, name, info, size - 8 - n) for name, info in header.items()}


def _index_entry(folder: Path, index: Path, entry: object) -> Path:
    """The shard an index names, refused unless it stays inside the checkpoint folder. The shard
    itself may be a symlink (the Hub cache links snapshots to blobs), but the path leading to it
    may not leave the folder, lexically or through a symlinked subdirectory."""
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{index}: malformed index (shard name {entry!r} is not a file name)")
    parts = PurePosixPath(entry.replace("\\", "/"))
    if not parts.parts or parts.is_absolute() or ".." in parts.parts or Path(entry).is_absolute():
        raise CheckpointError(f"{index}: shard {entry!r} lies outside the checkpoint folder")
    f = folder.joinpath(*parts.parts)
    if not f.parent.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index}: shard {entry!r} lies outside the checkpoint folder")
    return f


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names (each inside the
    folder, each a regular file), else every `*.safetensors` in it."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        regular_file_size(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            entries = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        files = sorted({_index_entry(folder, index, e) for e in entries})
        missing = [str(f.relative_to(folder)) for f in files if not os.path.lexists(f)]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors weight files")
    for f in files:
        regular_file_size(f)
    return files


def read_headers(folder: str | Path) -> dict[Path, dict[str, TensorInfo]]:
    """Every shard of a checkpoint folder with its checked header."""
    return {f: read_header(f) for f in shard_files(folder)}
