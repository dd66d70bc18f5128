"""Import a llama.cpp GGUF file (Gemma 3 text) as an ordinary MLX checkpoint directory.

Tensors are dequantized to float with the `gguf` package, renamed to ours, and llama.cpp's
storage conventions are undone; the SentencePiece vocabulary in the metadata becomes
`tokenizer.model`. The rest of the stack then sees a normal checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from .writer import atomic_directory, write_json, write_shards

# llama.cpp block tensor -> our name under language_model.layers.N
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "language_model.embed_tokens", "output_norm": "language_model.norm"}
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}


class GGUFError(ValueError):
    """A GGUF file we cannot import; names the file and the tensor or field."""


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def our_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"language_model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    raise KeyError(gguf_name)


def gemma3_config(reader, path: Path) -> dict:
    """An HF-style `gemma3_text` config.json from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'gemma3' GGUF files can be imported")

    def need(key: str):
        value = _field(reader, f"gemma3.{key}")
        if value is None:
            raise GGUFError(f"{path}: metadata field 'gemma3.{key}' is missing")
        return value

    head_dim = int(need("attention.key_length"))
    n_layers = int(need("block_count"))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(need("attention.head_count_kv")),
        "head_dim": head_dim,
        # llama.cpp scales queries by key_length**-0.5; HF's GGUF loader maps it the same way
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "sliding_window": int(need("attention.sliding_window")),
        "max_position_embeddings": int(need("context_length")),
        # Gemma 3: every 6th layer is global (llama.cpp hard-codes the same pattern)
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
        ],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(need("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


def tensors(reader, path: Path, dtype: mx.Dtype = mx.float32) -> Iterator[tuple[str, mx.array]]:
    """Dequantized, renamed tensors. llama.cpp stores Gemma norm weights with the +1 of
    `(1 + w)` already added (its converter's `norm_shift`; transformers' GGUF loader subtracts it
    again); we undo it so the checkpoint holds the HF values. Q/K are not permuted for Gemma
    (NEOX-style RoPE), so nothing else changes."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name} has unsupported type {kind}")
        try:
            name = our_name(t.name)
        except KeyError:
            raise GGUFError(f"{path}: unexpected tensor {t.name} for a Gemma 3 text model") from None
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("norm.weight"):
            w = w - 1.0
        yield name, mx.array(w).astype(dtype)


def sentencepiece_model(reader, path: Path) -> bytes:
    """A SentencePiece model proto from `tokenizer.ggml.*` (token types share SentencePiece's
    numbering: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise GGUFError(
            f"{path}: tokenizer.ggml.model is {_field(reader, 'tokenizer.ggml.model')!r}, expected 'llama'"
        )
    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    m = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        if (
            kind == 4
        ):  # llama.cpp un-escapes user-defined pieces ("▁▁" -> "  "); SentencePiece matches escaped text
            piece = piece.replace(" ", "\u2581")
        m.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    for key, name in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        i = int(_field(reader, f"tokenizer.ggml.{name}_token_id", -1))
        setattr(spec, f"{key}_id", i)
        if i >= 0:
            setattr(spec, f"{key}_piece", pieces[i])
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return m.SerializeToString()


def import_gguf(src: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Convert a Gemma 3 GGUF file into an MLX checkpoint directory at `out` (atomically)."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise GGUFError(f"{src}: no such GGUF file")
    reader = _reader(src)
    config = gemma3_config(reader, src)
    tokenizer = sentencepiece_model(reader, src)
    pieces = _field(reader, "tokenizer.ggml.tokens")
    eos = [config["eos_token_id"]] + ([pieces.index("<end_of_turn>")] if "<end_of_turn>" in pieces else [])
    with atomic_directory(out, force=force) as tmp:
        write_shards(tmp, tensors(reader, src, getattr(mx, dtype)))
        config["torch_dtype"] = dtype
        write_json(tmp / "config.json", config)
        (tmp / "tokenizer.model").write_bytes(tokenizer)
        write_json(
            tmp / "tokenizer_config.json",
            {
                "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            },
        )
        write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": eos,
                "pad_token_id": config["pad_token_id"],
            },
        )
        template = resources.files("gemma_mlx").joinpath("templates/gemma3.jinja").read_text()
        (tmp / "chat_template.jinja").write_text(template)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": src.name, "size": src.stat().st_size}) + "\n")
    return out
