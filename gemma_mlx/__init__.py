"""gemma-mlx: a native MLX runtime for Gemma 4 12B (and Gemma 3 text)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from .chat import ChatSession
from .checkpoint import CheckpointError, load_drafter, load_model
from .config import ConfigError, ModelConfig, load_config
from .generate import (
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    NonFiniteLogitsError,
    batch_generate,
    generate,
    make_cache,
    stream_generate,
)
from .hub import resolve
from .media import MediaError
from .models.drafter import Drafter
from .models.gemma import Model, ModelOutput
from .processor import Processor
from .sample import SamplingParams, make_sampler

__version__ = "0.1.0"


def load(
    path: str | Path,
    dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
    check_finite: bool = False,
    *,
    distributed: mx.distributed.Group | None = None,
    layers_per_rank: Sequence[int] | None = None,
) -> tuple[Model | None, Processor | None]:
    """Load a checkpoint (a directory: Hugging Face, mlx-vlm / mlx-lm / mlx-community or ours; or a
    Hub id `org/name[@revision]`, downloaded into the Hugging Face cache) -> `(model, processor)`.

    The processor is None when the directory has no tokenizer files (weights-only checks).
    `dtype` ("bfloat16", "float16", "float32") casts the float weights (of a quantized checkpoint:
    scales, biases, norms), which sets the compute dtype; None keeps them as stored; "auto" (the
    default) is float32 for quantized checkpoints on MLX's CPU backend, where quantized matmuls
    with 16-bit activations are several times slower, and as stored otherwise (`compute_dtype`).
    `check_finite` refuses weights with NaN or infinite values, naming them (reads every weight).

    `distributed` (a group of 2 or more ranks, `mx.distributed.init()` under `mlx.launch`) splits
    the layers into a pipeline (`gemma_mlx.distributed`; `layers_per_rank[r]` layers on rank r,
    rank 0 holding the last ones, else balanced by bytes): rank 0 gets the model and processor,
    the other ranks serve it and return `(None, None)` when rank 0 closes (or exits).
    """
    path = resolve(path)
    if distributed is not None and distributed.size() > 1:
        from .distributed import load_pipeline

        model = load_pipeline(path, distributed, dtype, lazy, check_finite, layers_per_rank)
        return model, (Processor.from_dir(path) if model is not None else None)
    return load_model(path, dtype, lazy, check_finite), Processor.from_dir(path)


__all__ = [
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "Drafter",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "MediaError",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "NonFiniteLogitsError",
    "Processor",
    "SamplingParams",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "load_config",
    "load_drafter",
    "make_cache",
    "make_sampler",
    "stream_generate",
]
