"""Atomic, streaming writer of MLX checkpoint directories (sharded safetensors + index + config).

Everything is written into a hidden sibling directory that is renamed onto the output path only
once complete, so an interrupted run never leaves a directory that looks like a model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale partials are judged by PID alone
    fcntl = None

SHARD_BYTES = 4 << 30


def human_size(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


class OutputExistsError(FileExistsError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `docker stop`, systemd) raised as an interrupt, so the same cleanup
    as Ctrl-C runs instead of the process dying with its partial output left on disk."""


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


def _lock(directory: Path) -> int | None:
    """An exclusive advisory lock on `directory`, held through the returned descriptor until it
    is closed or the process dies (even by SIGKILL); None where locks are unsupported. Raises
    BlockingIOError when another live process holds it."""
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _sweep_partials(out: Path, force: bool) -> None:
    """Remove the partial outputs of earlier runs whose owner is gone (killed by SIGKILL or out
    of memory: no cleanup ran). A partial whose lock is held belongs to a live conversion into
    the same OUT: an error without `force`. One whose lock is free but whose PID is alive again
    (PID reuse, another host) is reported, not removed."""
    for stale in sorted(out.parent.glob(f".{out.name}.partial-*")):
        pid = stale.name.rpartition("-")[2]
        try:
            fd = _lock(stale) if stale.is_dir() and not stale.is_symlink() else None
        except BlockingIOError:
            if force:
                continue
            raise OutputExistsError(
                f"{out}: another conversion (PID {pid}) is writing it now; wait for it or use --force"
            ) from None
        except OSError:
            fd = None
        try:
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(stale)
            elif pid != str(os.getpid()):
                warnings.warn(
                    f"{stale}: a partial output of an earlier conversion (PID {pid} is running, "
                    "but holds no lock on it); remove it if no conversion into "
                    f"{out} is running",
                    stacklevel=3,
                )
        finally:
            if fd is not None:
                os.close(fd)


@contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into `Terminated` for the duration (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _space_error(out: Path, tmp: Path, needed: int | None, e: BaseException) -> OSError:
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
    free = shutil.disk_usage(out.parent).free
    need = f"the output needs about {human_size(needed)}" if needed else f"{human_size(written)} were written"
    return OSError(
        errno.ENOSPC,
        f"{out}: no space left on the device ({need}; {human_size(free)} free in {out.parent}); "
        f"nothing was written ({e})",
    )


def _is_disk_full(e: BaseException) -> bool:
    # MLX's safetensors writer raises RuntimeError("[write] Unable to write N bytes") without errno.
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, RuntimeError) and "Unable to write" in str(e)
    )


def _check_writable(out: Path) -> None:
    """Say why `out` cannot be written before any work (a read-only file system or folder reports
    0 bytes free, which would otherwise read as a full disk)."""
    fs = os.statvfs(out.parent)
    if fs.f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, f"{out}: {out.parent} is on a read-only file system")
    if fs.f_blocks == 0:
        raise OSError(errno.EINVAL, f"{out}: {out.parent} is on a virtual file system (like /proc)")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"{out}: the folder {out.parent} is not writable")


@contextmanager
def atomic_directory(out: str | Path, force: bool = False, needed: int | None = None):
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` in one rename,
    on any exception (Ctrl-C and SIGTERM included) it is removed and `out` is left as it was.

    - Partial directories of runs that were killed outright (SIGKILL, out of memory) are removed
      first; the temporary directory is locked, so a concurrent run into the same `out` is seen.
    - Without `force`, `out` is checked again at the swap: if it appeared meanwhile (another
      conversion finished first), this one fails instead of replacing it.
    - `needed` (expected bytes): refused up front when the disk has less free; a disk that fills
      up anyway is reported with that figure."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(out, force)
    _check_writable(out)
    free = shutil.disk_usage(out.parent).free
    if needed and needed > free:
        raise OSError(
            errno.ENOSPC,
            f"{out}: the output needs about {human_size(needed)}, but only {human_size(free)} is free "
            f"in {out.parent}",
        )
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    with _terminate_as_interrupt():
        _remove(tmp)
        tmp.mkdir()
        lock = None
        try:
            lock = _lock(tmp)
            try:
                yield tmp
            except BaseException as e:
                if _is_disk_full(e):
                    raise _space_error(out, tmp, needed, e) from None
                raise
            _swap(tmp, out, force)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            if lock is not None:
                os.close(lock)


def _swap(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished `tmp` at `out`. Without `force`, an `out` that appeared since the start
    (another conversion finished first) is an error, never replaced."""
    appeared = OutputExistsError(
        f"{out} appeared while converting (another conversion finished first); use --force to replace it"
    )
    if out.exists() or out.is_symlink():
        if not force:
            raise appeared
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        out.rename(old)
        tmp.rename(out)
        _remove(old)
        return
    try:
        tmp.rename(out)  # fails on a non-empty directory created since the check: never merged
    except OSError:
        if out.exists():
            raise appeared from None
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
