"""Interoperability with the MLX ecosystem: checkpoints written by mlx-vlm's converter (the
mlx-community layout of `gemma4_unified`) and mlx-lm's (Gemma 3 text) load with `gemma_mlx.load`,
and ours load in each peer. Same text prompt, logits compared; quantized tensors compared exactly.

The sources are tiny random checkpoints under Hugging Face names. Each test skips where its peer
is not installed (`pip install -e ".[peers]"`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import GEMMA3_CONFIG, UNIFIED_CONFIG, VOCAB, save_checkpoint

import gemma_mlx
from gemma_mlx.checkpoint import read_weights
from gemma_mlx.convert import convert

pytestmark = pytest.mark.slow  # each peer conversion takes seconds on CPU

# max |ours - peer| over the logits of the same weights: 0.0 measured on MLX's CPU backend (the
# same kernels run in the same order); the bound leaves room for other backends' kernels
TOLERANCE = 1e-5
PROMPT = [[2, *np.random.default_rng(0).integers(5, VOCAB, 23).tolist()]]  # past the window of 12

# The released 12B config's text schema (`global_head_dim`, not transformers 5.24's
# `per_layer_config`), which is what the peers read.
UNIFIED = copy.deepcopy(UNIFIED_CONFIG)
UNIFIED["text_config"].pop("per_layer_config")
UNIFIED["text_config"].update(global_head_dim=64, num_global_key_value_heads=1, hidden_size_per_layer_input=0)
UNIFIED["vocab_size"] = VOCAB  # mlx-lm reads the top-level one (default 262144, the 12B's)


def hf_checkpoint(path: Path, config: dict) -> Path:
    """A tiny float32 checkpoint as Hugging Face saves it (`model.language_model.layers...`, a bare
    text model's `model.layers...`), with the tiny tokenizer."""
    save_checkpoint(path, config)
    f = path / "model.safetensors"
    weights = mx.load(str(f))
    text_only = config["model_type"] != "gemma4_unified"
    renamed = {
        "model." + (k.removeprefix("language_model.") if text_only else k): v for k, v in weights.items()
    }
    mx.save_safetensors(str(f), renamed, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def unified_src(tmp_path_factory) -> Path:
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "unified", UNIFIED)


@pytest.fixture(scope="module")
def gemma3_src(tmp_path_factory) -> Path:
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "gemma3", GEMMA3_CONFIG)


def logits(model, embed_scale: float | None = None) -> np.ndarray:
    """Logits of PROMPT; `embed_scale` replaces the model's sqrt(hidden) (ours only)."""
    ids = mx.array(PROMPT)
    if embed_scale is None:
        out = model(ids)
    else:
        out = model(inputs_embeds=model.language_model.embed_tokens(ids) * embed_scale)
    out = getattr(out, "logits", out)
    return np.array(out.astype(mx.float32), dtype=np.float64)


def numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def assert_same_model(ours, peer, quantized: bool, embed_scale: float | None = None) -> None:
    """The peer's parameters, mapped by our `sanitize`, equal ours tensor for tensor, and so do
    the logits (within TOLERANCE)."""
    theirs = ours.sanitize(dict(tree_flatten(peer.parameters())))
    mine = dict(tree_flatten(ours.parameters()))
    assert sorted(theirs) == sorted(mine)
    for k, v in mine.items():
        assert v.dtype == theirs[k].dtype and np.array_equal(numpy(v), numpy(theirs[k])), k
    assert any(k.endswith(".scales") for k in mine) == quantized
    diff = np.abs(logits(ours, embed_scale) - logits(peer)).max()
    assert diff <= TOLERANCE, diff


# mlx-lm's Gemma 3 rounds the embedding scale sqrt(hidden) to bfloat16 in every dtype (transformers
# casts it to the weight dtype): in float32 that alone moves its logits by 2e-3 on the tiny model
# (measured). With the same rounded scale ours equal its logits exactly (0.0 measured), so that is
# what the test compares. (In bfloat16 mlx-lm also adds Gemma 3's norm `1 + w` in bfloat16, where
# transformers and we add in float32.)
MLX_LM_GEMMA3_SCALE = mx.array(GEMMA3_CONFIG["hidden_size"] ** 0.5, mx.bfloat16).item()


def mlp_8bit(path: str, module) -> bool | dict:
    """The early mlx-vlm Gemma 4 rule behind mlx-community's "4bit" 12B: every MLP at 8 bits,
    multimodal modules float (mlx-vlm's own `skip_multimodal_module`)."""
    from mlx_vlm.utils import skip_multimodal_module

    if skip_multimodal_module(path):
        return False
    return {"group_size": 64, "bits": 8} if ".mlp." in path else True


VLM_LAYOUTS = {
    "float": {},
    "4bit": dict(quantize=True, q_bits=4, q_group_size=64),
    "mlp8": dict(quantize=True, q_bits=4, q_group_size=64, quant_predicate=mlp_8bit),
}


@pytest.fixture(scope="module")
def vlm_checkpoints(unified_src, tmp_path_factory) -> dict[str, Path]:
    """The tiny unified model converted by mlx-vlm in each layout."""
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.convert import convert

    out = {}
    for name, kwargs in VLM_LAYOUTS.items():
        out[name] = tmp_path_factory.mktemp("vlm") / name
        convert(str(unified_src), str(out[name]), **kwargs)
    return out


@pytest.mark.parametrize("layout", VLM_LAYOUTS)
def test_loads_mlx_vlm_checkpoint(vlm_checkpoints, layout):
    from mlx_vlm.utils import load_model

    path = vlm_checkpoints[layout]
    names = mx.load(str(next(path.glob("*.safetensors"))))
    assert any(k.startswith("language_model.model.layers.") for k in names)  # the mlx-vlm layout
    quant = json.loads((path / "config.json").read_text()).get("quantization", {})
    if layout == "mlp8":  # per-layer overrides keyed by mlx-vlm's module paths
        assert quant["language_model.model.layers.0.mlp.down_proj"]["bits"] == 8
    ours, processor = gemma_mlx.load(path)
    assert processor is not None
    assert_same_model(ours, load_model(path), quantized=layout != "float")
    if layout == "mlp8":
        layer = ours.language_model.layers[0]
        assert (layer.mlp.down_proj.bits, layer.self_attn.q_proj.bits) == (8, 4)
    if layout != "float":  # mlx-vlm keeps the vision projection float
        assert not hasattr(ours.embed_vision.embedding_projection, "scales")


MLX_LM_LAYOUTS = {
    "float": {},
    "4bit": dict(quantize=True, q_bits=4, q_group_size=64),
    "mixed_4_6": dict(quantize=True, q_bits=4, q_group_size=64, quant_predicate="mixed_4_6"),
}


@pytest.mark.parametrize("layout", MLX_LM_LAYOUTS)
def test_loads_mlx_lm_gemma3_checkpoint(gemma3_src, tmp_path, layout):
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model

    path = tmp_path / layout
    convert(str(gemma3_src), str(path), **MLX_LM_LAYOUTS[layout])
    assert any(k.startswith("model.layers.") for k in mx.load(str(next(path.glob("*.safetensors")))))
    ours, _ = gemma_mlx.load(path)
    peer, _ = load_model(path)
    assert_same_model(ours, peer, quantized=layout != "float", embed_scale=MLX_LM_GEMMA3_SCALE)
    if layout == "mixed_4_6":  # mlx-lm's per-layer keys (`model.layers.0.mlp.down_proj`) mapped
        assert ours.language_model.layers[2].mlp.down_proj.bits == 6  # favoured: 2 and 5 of 6
        assert ours.language_model.layers[1].mlp.down_proj.bits == 4


def test_weights_read_for_every_layout(vlm_checkpoints):
    """Sanity of the fixture: the converted directories really differ in layout."""
    q4 = read_weights(vlm_checkpoints["4bit"])
    q8 = read_weights(vlm_checkpoints["mlp8"])
    key = "language_model.model.layers.0.mlp.down_proj.weight"
    assert q8[key].shape[-1] == 2 * q4[key].shape[-1]  # 8 bits pack half as many per uint32


# Our conversions in each peer: the unified model in mlx-vlm and mlx-lm (its text part), Gemma 3
# text in mlx-lm; float, uniform 4-bit and a mixed recipe (per-layer entries in the config).
OURS = {"float": dict(quantize=False), "uniform": {}, "mixed_4_6": dict(recipe="mixed_4_6")}
PEERS = {
    "mlx_vlm": ("unified",),
    "mlx_lm": ("unified", "gemma3"),
}


def peer_model(peer: str, path: Path):
    if peer == "mlx_vlm":
        from mlx_vlm.utils import load_model

        return load_model(path)
    from mlx_lm.utils import load_model

    return load_model(path)[0]


@pytest.mark.parametrize("recipe", OURS)
@pytest.mark.parametrize(("peer", "family"), [(p, f) for p, fs in PEERS.items() for f in fs])
def test_peers_load_our_conversion(unified_src, gemma3_src, tmp_path, peer, family, recipe):
    pytest.importorskip(peer)
    src = unified_src if family == "unified" else gemma3_src
    out = tmp_path / "out"
    convert(src, out, progress=False, **OURS[recipe])
    ours, _ = gemma_mlx.load(out)
    scale = MLX_LM_GEMMA3_SCALE if family == "gemma3" else None
    diff = np.abs(logits(ours, scale) - logits(peer_model(peer, out))).max()
    assert diff <= TOLERANCE, diff


def test_requantize_mlx_community_layout(vlm_checkpoints, tmp_path):
    """mlx-vlm's 8-bit-MLP "4bit" checkpoint -> a true 4-bit one: its 4-bit layers copied as they
    are, the MLPs requantized; mlx-vlm loads the result and agrees with us."""
    from mlx_vlm.utils import load_model

    src = vlm_checkpoints["mlp8"]
    report = convert(src, tmp_path / "q4", progress=False)
    assert report.bytes_per_token < report.source_bytes_per_token
    before, after = read_weights(src), read_weights(tmp_path / "q4")
    for k, v in before.items():
        if ".self_attn." in k:
            assert np.array_equal(numpy(v), numpy(after[k])), k
    ours, _ = gemma_mlx.load(tmp_path / "q4")
    assert {m.bits for m in ours.modules() if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)} == {
        4
    }
    assert np.abs(logits(ours) - logits(load_model(tmp_path / "q4"))).max() <= TOLERANCE
