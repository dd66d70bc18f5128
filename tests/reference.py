"""Reference helpers: tiny random Gemma 4 unified models built and saved by transformers (the
reference), with the real on-disk tensor names and config schema.

Importing this module skips the importing test module where torch or transformers is missing:
those tests compare with the reference stack (`pip install -e ".[test]"`); the rest run without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny import TEXT, VISION


def randomize(model) -> None:
    """Move norm weights and layer scalars away from their all-ones init, so a wrong norm
    offset or a skipped scalar changes the logits."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention scale is 1.0 on RMS-normed q/k: larger weights make the softmax so
                # peaked that float32 itself drifts ~1e-4 from float64 (measured), masking bugs.
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.2)
            elif ("norm" in name and name.endswith("weight")) or name.endswith("layer_scalar"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def build(kind: str, path: Path, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "unified":
        cfg = transformers.Gemma4UnifiedConfig(text_config=TEXT, vision_config=VISION, audio_config={})
        model = transformers.Gemma4UnifiedForConditionalGeneration(cfg)
    else:
        model = transformers.Gemma4UnifiedForCausalLM(transformers.Gemma4UnifiedTextConfig(**TEXT))
    randomize(model)
    model = model.float().eval()
    model.save_pretrained(path)
    return model
