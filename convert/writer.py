"""Atomic, streaming writer of MLX checkpoint directories (sharded safetensors + index + config).

Everything is written into a hidden sibling directory that is renamed onto the output path only
once complete, so an interrupted run never leaves a directory that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

SHARD_BYTES = 4 << 30


class OutputExistsError(FileExistsError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(out: str | Path, force: bool = False):
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` in one rename,
    on any exception (Ctrl-C included) it is removed and `out` is left as it was. Partial
    directories of runs that were killed outright (SIGKILL, out of memory) are removed first."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(stale)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(
    directory: Path,
    tensors: Iterable[tuple[str, mx.array]],
    shard_bytes: int = SHARD_BYTES,
    on_tensor: Callable[[str, mx.array], None] | None = None,
) -> dict[str, str]:
    """Write `(name, array)` pairs as `model-0000i-of-0000n.safetensors` shards of about
    `shard_bytes`, evaluating and releasing each shard before reading on (so peak memory stays
    near one shard), plus `model.safetensors.index.json`. Returns the weight map."""
    shard: dict[str, mx.array] = {}
    size = total = 0
    shards: list[list[str]] = []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            path = directory / f"shard-{len(shards)}.safetensors"
            mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
            shards.append(sorted(shard))
            shard, size = {}, 0

    for name, array in tensors:
        if size and size + array.nbytes > shard_bytes:
            flush()
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
        if on_tensor is not None:
            on_tensor(name, array)
    flush()
    weight_map = {}
    for i, names in enumerate(shards):  # the shard count is known only now
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / f"shard-{i}.safetensors").rename(directory / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / "model.safetensors.index.json", index)
    return weight_map


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
