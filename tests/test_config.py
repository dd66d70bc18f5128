"""Config parsing: the released 12B schema, the transformers 5.24 schema, Gemma 3, and errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from gemma_mlx.config import FULL, SLIDING, ConfigError, load_config, parse_config
from gemma_mlx.models.gemma import Model

# Reconstructed field by field from the released google/gemma-4-12B-it config.json as quoted in
# shared/design/gemma4-12b.md (sections 2 and 7); the original file cannot be downloaded here.
RELEASED_12B = json.loads((Path(__file__).parent / "data" / "gemma-4-12b-config.json").read_text())


def test_released_12b_geometry():
    cfg = parse_config(RELEASED_12B)
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (3840, 48, 16, 262144)
    full = [i for i, s in enumerate(t.layers) if not s.sliding]
    assert full == [5, 11, 17, 23, 29, 35, 41, 47]
    for s in t.layers:
        if s.sliding:
            assert (s.head_dim, s.num_kv_heads, s.k_eq_v, s.rope.base, s.rope.dims) == (
                256,
                8,
                False,
                10000.0,
                256,
            )
        else:
            assert (s.head_dim, s.num_kv_heads, s.k_eq_v, s.rope.base) == (512, 1, True, None)
            finite = [f for f in s.rope.freqs if math.isfinite(f)]
            assert len(finite) == 64 and len(s.rope.freqs) == 256
    assert (t.final_logit_softcapping, t.sliding_window, t.norm_offset, t.query_scale) == (
        30.0,
        1024,
        0.0,
        1.0,
    )
    assert t.layer_scalar and t.v_norm and t.bidirectional_vision
    assert cfg.vision.patch_dim == 6912 and cfg.audio.audio_embed_dim == 640
    assert (cfg.eoi_token_id, cfg.eoa_token_id, cfg.image_token_id, cfg.audio_token_id) == (
        258882,
        258883,
        258880,
        258881,
    )


def test_released_12b_parameter_count():
    """The full 12B skeleton (lazy: nothing is allocated) has exactly the published 11,959,730,224
    parameters: text 11,907,350,320 + vision 49,922,304 + audio 2,457,600."""
    model = Model(parse_config(RELEASED_12B))
    sizes = {k: v.size for k, v in tree_flatten(model.parameters())}
    assert sum(sizes.values()) == 11_959_730_224
    assert sum(v for k, v in sizes.items() if k.startswith("language_model.")) == 11_907_350_320
    assert (
        sum(v for k, v in sizes.items() if k.startswith(("vision_embedder.", "embed_vision."))) == 49_922_304
    )
    assert sizes["embed_audio.embedding_projection.weight"] == 2_457_600
    assert "language_model.layers.47.self_attn.v_proj.weight" not in sizes
    assert "language_model.layers.46.self_attn.v_proj.weight" in sizes


def test_geometry_and_rope_match_transformers():
    """Per-layer head_dim / KV heads and RoPE frequencies as transformers derives them."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.Gemma4UnifiedConfig.from_dict(copy.deepcopy(RELEASED_12B)).text_config
    ours = parse_config(RELEASED_12B).text
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for i, spec in enumerate(ours.layers):
        lc = ref.per_layer_config[i]
        assert (spec.head_dim, spec.num_kv_heads) == (lc.head_dim, lc.num_key_value_heads)
    inv, _ = ROPE_INIT_FUNCTIONS["proportional"](ref, layer_type=FULL)
    ours_inv = [1.0 / f for f in ours.layers[5].rope.freqs]  # MLX wavelengths -> inverse frequencies
    np.testing.assert_allclose(ours_inv, inv.numpy(), rtol=1e-6)


def test_saved_schema_equals_released_schema():
    """transformers 5.24 saves per_layer_config instead of global_head_dim/num_global_kv_heads."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.Gemma4UnifiedConfig.from_dict(copy.deepcopy(RELEASED_12B))
    saved = ref.to_dict()
    assert "per_layer_config" in saved["text_config"] and "global_head_dim" not in saved["text_config"]
    assert parse_config(saved).text.layers == parse_config(RELEASED_12B).text.layers


def test_bare_text_config_and_gemma3():
    text = dict(RELEASED_12B["text_config"])
    assert parse_config(text).text.layers == parse_config(RELEASED_12B).text.layers
    g3 = dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    )
    t = parse_config(g3).text
    assert (t.norm_offset, t.query_scale, t.layer_scalar, t.v_norm) == (1.0, 1 / 16, False, False)
    assert [s.sliding for s in t.layers][:6] == [True] * 5 + [False]
    assert (t.layers[0].rope.base, t.layers[5].rope.base) == (10_000.0, 1_000_000.0)
    g3_new = dict(
        g3,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )
    assert parse_config(g3_new).text.layers[5].rope.scale == 1 / 8


def broken(edit) -> dict:
    cfg = copy.deepcopy(RELEASED_12B)
    edit(cfg)
    return cfg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="llama"), "field 'model_type' is 'llama'"),
        (lambda c: c["text_config"].update(model_type="gemma4_text"), "text_config.model_type"),
        (lambda c: c.pop("text_config"), "'text_config' is missing"),
        (lambda c: c["text_config"]["layer_types"].__setitem__(47, SLIDING), "layer_types[47]"),
        (lambda c: c["text_config"]["layer_types"].pop(), "layer_types"),
        (lambda c: c["text_config"].update(hidden_activation="silu"), "hidden_activation"),
        (lambda c: c["text_config"].update(num_kv_shared_layers=4), "num_kv_shared_layers"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda c: c["text_config"].pop("hidden_size"), "'text_config.hidden_size' is missing"),
        (lambda c: c["text_config"]["rope_parameters"][FULL].update(rope_type="yarn"), "rope_type"),
        (lambda c: c["text_config"].update(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    ],
)
def test_errors_name_the_field(edit, message):
    with pytest.raises(ConfigError) as e:
        parse_config(broken(edit))
    assert message in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
