"""Smoke tests per model family without the reference stack (in the style of mlx-lm's model test
runner): float32 and bfloat16, batch rows independent, cached decoding equal to one full pass."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from tiny import GEMMA3_CONFIG, UNIFIED_CONFIG, VOCAB, randomized_weights, rel_err

from gemma_mlx import Drafter, Model, make_cache
from gemma_mlx.config import parse_config, parse_drafter_config

TEXT_CONFIG = UNIFIED_CONFIG["text_config"]
FAMILIES = {
    "gemma4_unified": UNIFIED_CONFIG,
    "gemma4_unified_text": TEXT_CONFIG,
    "gemma3_text": GEMMA3_CONFIG,
}
# cached vs full pass and one row vs the batch, max |diff| / max |logit|: 0.0 measured on MLX's CPU
# backend in both dtypes; other backends' kernels may sum in another order along the two paths
TOLERANCE = {mx.float32: 1e-4, mx.bfloat16: 0.02}


def build(config: dict, dtype: mx.Dtype) -> Model:
    model = Model(parse_config(copy.deepcopy(config)))
    model.load_weights([(k, v.astype(dtype)) for k, v in randomized_weights(model, seed=0).items()])
    return model


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_family(family, dtype):
    model = build(FAMILIES[family], dtype)
    ids = mx.array(np.random.default_rng(0).integers(5, VOCAB, size=(2, 20)))
    full = model(ids)
    assert full.shape == (2, 20, VOCAB) and full.dtype == dtype
    as_f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    assert np.isfinite(as_f32(full)).all()
    assert rel_err(as_f32(model(ids[1:])[0]), as_f32(full[1])) <= TOLERANCE[dtype]  # rows independent
    cache = make_cache(model)
    steps = [model(ids[:, :15], cache)] + [model(ids[:, i : i + 1], cache) for i in range(15, 20)]
    assert cache[0].offset == 20 and all(c.offset == 20 for c in cache)
    assert rel_err(as_f32(mx.concatenate(steps, axis=1)), as_f32(full)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_drafter_family(dtype):
    target = build(TEXT_CONFIG, dtype)
    text = {
        **TEXT_CONFIG,
        "num_hidden_layers": 4,
        "num_kv_shared_layers": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "per_layer_config": {"3": {"head_dim": 64, "num_key_value_heads": 1}},
    }
    config = {"model_type": "gemma4_unified_assistant", "text_config": text, "backbone_hidden_size": 128}
    drafter = Drafter(parse_drafter_config(config))
    drafter.load_weights([(k, v.astype(dtype)) for k, v in randomized_weights(drafter, seed=1).items()])
    cache = make_cache(target)
    out = target.forward(mx.array([[5, 6, 7, 8] * 5]), cache)  # 20 tokens: the ring has wrapped
    drafts = drafter.draft(target, cache, 9, out.hidden[:, -1:], 3)
    assert drafts.shape == (1, 3) and all(0 <= t < VOCAB for t in drafts.tolist()[0])
    logits, hidden = drafter(
        target.language_model.embed(mx.array([[9]])),
        out.hidden[:, -1:],
        Drafter.shared_kv(target, cache, 20),
        20,
    )
    assert logits.dtype == hidden.dtype == dtype and hidden.shape == (1, 1, 128)
