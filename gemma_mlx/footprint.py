"""What a checkpoint costs before loading it: weights, bytes read per decoded token, KV cache
for a context length, and whether that fits this machine's memory. Reads only headers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten

from .config import ModelConfig, TextConfig, load_config
from .models.gemma import Model
from .safetensors_file import read_headers

TEXT_PREFIX = "language_model."


def decode_bytes(sizes: Mapping[str, int], prefix: str = TEXT_PREFIX) -> int:
    """Bytes of weights one decoded token reads, from stored tensor sizes (our names): every text
    weight once, the tied embedding once as the LM head (its row lookup is negligible); vision
    and audio weights are idle in decode. The one rule behind `info`, the converter's report and
    its estimate (a drafter passes prefix "": all of its weights, per draft step)."""
    return sum(n for name, n in sizes.items() if name.startswith(prefix))


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor of a checkpoint (our names), from its checked safetensors headers."""
    sizes = {name: t.nbytes for header in read_headers(path).values() for name, t in header.items()}
    return Model.sanitize(sizes)


@dataclass
class Footprint:
    config: ModelConfig
    parameters: int
    weight_bytes: int
    bytes_per_token: int  # text weights, tied embedding once as the LM head
    kv_bytes_per_token: int  # growing cache of the global layers, per token of context
    kv_fixed_bytes: int  # sliding-window rings (window + rollback slack)
    context: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_fixed_bytes + self.kv_bytes_per_token * self.context

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.parameters

    def as_dict(self) -> dict:
        """Plain numbers (bytes, counts) for JSON output; `info --json` prints these."""
        t, q = self.config.text, self.config.quantization
        return {
            "model_type": self.config.model_type,
            "layers": t.num_hidden_layers,
            "sliding_layers": sum(s.sliding for s in t.layers),
            "sliding_window": t.sliding_window,
            "hidden_size": t.hidden_size,
            "vocab_size": t.vocab_size,
            "vision": self.config.vision is not None,
            "audio": self.config.audio is not None,
            "parameters": self.parameters,
            "quantization": {k: q[k] for k in ("mode", "bits", "group_size") if k in q} if q else None,
            "bits_per_weight": self.bits_per_weight,
            "weight_bytes": self.weight_bytes,
            "bytes_per_token": self.bytes_per_token,
            "context": self.context,
            "kv_cache_bytes": self.kv_bytes,
            "total_bytes": self.total_bytes,
        }


def kv_cache_bytes(
    text: TextConfig,
    context: int,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    dtype_bytes: int = 2,
    slack: int = 128,
) -> tuple[int, int]:
    """(bytes per token of the growing global caches, fixed bytes of the sliding-window rings) at
    `context` tokens; quantized caches hold `kv_bits` per element plus a scale and a bias
    (`dtype_bytes` each) per group of `kv_group_size`."""
    element = dtype_bytes if kv_bits is None else kv_bits / 8 + 2 * dtype_bytes / kv_group_size
    per_token = fixed = 0.0
    for spec in text.layers:
        token = 2 * spec.num_kv_heads * spec.head_dim * element  # K and V (they differ)
        if spec.sliding:
            fixed += token * min(context, text.sliding_window + slack)
        else:
            per_token += token
    return round(per_token), round(fixed)


def footprint(
    path: str | Path,
    context: int = 8192,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    kv_dtype_bytes: int = 2,
    slack: int = 128,
) -> Footprint:
    path = Path(path)
    config = load_config(path)
    sizes = tensor_bytes(path)
    kv_per_token, fixed = kv_cache_bytes(
        config.text,
        context,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        dtype_bytes=kv_dtype_bytes,
        slack=slack,
    )
    parameters = sum(v.size for _, v in tree_flatten(Model(config).parameters()))  # lazy skeleton
    return Footprint(
        config=config,
        parameters=parameters,
        weight_bytes=sum(sizes.values()),
        bytes_per_token=decode_bytes(sizes),
        kv_bytes_per_token=kv_per_token,
        kv_fixed_bytes=fixed,
        context=context,
    )


def memory_bytes() -> tuple[int, int]:
    """(total, available) memory of this machine in bytes (available = total where unknown)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = total
    if sys.platform == "linux":
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    elif sys.platform == "darwin":  # free + inactive pages can be reclaimed
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
            pages = {
                k.strip(): int(v.strip(" ."))
                for k, v in (line.split(":") for line in out.splitlines()[1:] if ":" in line)
            }
            available = (pages.get("Pages free", 0) + pages.get("Pages inactive", 0)) * os.sysconf(
                "SC_PAGE_SIZE"
            )
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return total, available


def memory_warning(fp: Footprint) -> str | None:
    """A suggestion when weights plus the KV cache will not fit the memory available now."""
    total, available = memory_bytes()
    if fp.total_bytes <= available:
        return None
    return (
        f"this model needs about {fp.total_bytes / 1e9:.1f} GB (weights {fp.weight_bytes / 1e9:.1f} GB + "
        f"KV cache "
        f"{fp.kv_bytes / 1e9:.1f} GB at {fp.context} tokens) but only {available / 1e9:.1f} GB of "
        f"{total / 1e9:.1f} GB is available: convert with fewer bits (gemma-mlx convert SRC OUT --bits 4), "
        "quantize the KV cache (--kv-bits 8 or 4) or use a shorter context"
    )


ROW_CONTEXT = 8192  # the context a concurrent request is budgeted for (the server's default answer length)


def default_concurrency(
    text: TextConfig,
    available: int,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    dtype_bytes: int = 2,
    row_context: int = ROW_CONTEXT,
    cap: int = 8,
) -> int:
    """How many requests may decode together: half of the `available` memory (after the weights
    are loaded; the rest is for the prefix cache, activations and the system) over one row's KV
    cache at `row_context` tokens, between 1 and `cap` (beyond 8 rows a laptop's decode step stops
    being bandwidth-bound)."""
    per_token, fixed = kv_cache_bytes(
        text, row_context, kv_bits=kv_bits, kv_group_size=kv_group_size, dtype_bytes=dtype_bytes
    )
    row = per_token * row_context + fixed
    return max(1, min(cap, int(available / 2 // max(row, 1))))
