"""Checkpoint conversion: Hugging Face safetensors or llama.cpp GGUF -> (quantized) MLX checkpoints."""

from .convert import ConversionReport, check_conversion, convert, convert_drafter, resolve_source
from .quantize import RECIPES, QuantSpec, bytes_per_token, plan

__all__ = [
    "RECIPES",
    "ConversionReport",
    "QuantSpec",
    "bytes_per_token",
    "check_conversion",
    "convert",
    "convert_drafter",
    "plan",
    "resolve_source",
]
