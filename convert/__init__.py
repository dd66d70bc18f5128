"""Checkpoint conversion: Hugging Face safetensors or llama.cpp GGUF -> (quantized) MLX checkpoints."""

from gemma_mlx.safetensors_file import read_header

from .convert import (
    ConversionReport,
    check_conversion,
    check_drafter,
    convert,
    convert_drafter,
    model_card,
    resolve_source,
    write_checkpoint,
)
from .quantize import (
    MODES,
    RECIPES,
    Estimate,
    QuantSpec,
    bytes_per_token,
    config_block,
    estimate,
    layout_bytes,
    parse_override,
    plan,
    quantize_weight,
)

__all__ = [
    "MODES",
    "RECIPES",
    "ConversionReport",
    "Estimate",
    "QuantSpec",
    "bytes_per_token",
    "check_conversion",
    "check_drafter",
    "config_block",
    "convert",
    "convert_drafter",
    "estimate",
    "layout_bytes",
    "model_card",
    "parse_override",
    "plan",
    "quantize_weight",
    "read_header",
    "resolve_source",
    "write_checkpoint",
]
