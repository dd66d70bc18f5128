"""Loading checkpoints: shards and index, tied head, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import rel_err

from gemma_mlx import CheckpointError, load
from gemma_mlx.checkpoint import load_model


@pytest.fixture
def ckpt(causal, tmp_path):
    """A writable copy of the tiny text checkpoint and its tensors."""
    path, ref = causal
    out = tmp_path / "ckpt"
    shutil.copytree(path, out)
    return out, load_file(str(out / "model.safetensors")), ref


def reshard(path, tensors: dict, parts: int = 3) -> None:
    """Split into `parts` shards with an index, as large checkpoints come."""
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: tensors[k] for k in names[i::parts]}
        save_file(chunk, str(path / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_with_lm_head_loads(ckpt):
    path, tensors, ref = ckpt
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: ignored if present
    reshard(path, tensors)
    model = load_model(path)
    ids = np.arange(5, 25)[None]
    import torch

    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(model(mx.array(ids)), expected) <= 1e-4


def test_mismatched_weights_are_listed(ckpt):
    path, tensors, _ = ckpt
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.surprise.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.zeros(7, np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "missing: language_model.layers.2.self_attn.k_proj.weight" in msg
    assert "unexpected: language_model.layers.0.self_attn.surprise.weight" in msg
    assert "wrong shape: language_model.norm.weight (7,) (expected (128,))" in msg


def test_missing_shard_named(ckpt):
    path, tensors, _ = ckpt
    reshard(path, tensors)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_named(ckpt, damage):
    path, _, _ = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        data[: len(data) // 2] if damage == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}!!!"
    )
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_no_weights_and_not_a_directory(tmp_path, ckpt):
    path, _, _ = ckpt
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load(tmp_path / "nowhere")


def test_dtype_argument(ckpt):
    path, _, _ = ckpt
    assert load_model(path, dtype="float16").language_model.norm.weight.dtype == mx.float16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(path, dtype="int8")
