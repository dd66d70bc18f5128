"""Import a llama.cpp GGUF file (Gemma 3 text) as an ordinary MLX checkpoint directory.

Tensors are dequantized to float with the `gguf` package, renamed to ours, and llama.cpp's
storage conventions are undone; the SentencePiece vocabulary in the metadata becomes
`tokenizer.model` and the `gemma3.*` metadata an HF-style `gemma3_text` config.json. The rest of
the stack then sees a normal checkpoint.

llama.cpp conventions, from its `convert_hf_to_gguf.py` (`Gemma3Model`) and `llama-model.cpp`:
- norm weights are stored as `1 + w` (`norm_shift = 1.0`, "Gemma3RMSNorm adds 1.0"). Checked on
  the 270M file: every stored norm value minus 1 is exactly a bfloat16 number (the released
  weights' dtype) while only 75% of the stored values are, and 143 values are exactly 0 (w = -1:
  channels switched off); undoing the shift is also what makes the model good (tests).
- Q/K are not permuted (only llama.cpp's LLaMA converter permutes; Gemma uses NEOX RoPE).
- the attention scale is `key_length**-0.5`, except for the 62-layer 27B:
  `(embedding_length / head_count)**-0.5`; every 6th layer is global; sliding layers use RoPE
  base 10000 and no scaling; `rope.scaling.*` applies to global layers only.
- dims are listed innermost first; the token embedding is tied (no `output.weight`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx.config import ConfigError, parse_config
from gemma_mlx.models.gemma import Model

from .convert import write_checkpoint

ARCH = "gemma3"
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
NORM_SHIFT = 1.0


class GGUFError(ValueError):
    """A GGUF file we cannot import; names the file and the tensor or metadata field."""


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` on `path` (memory-mapped), or a GGUFError for a damaged file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def our_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `language_model.layers.3.self_attn.q_proj.weight` (KeyError if unknown)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"language_model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    raise KeyError(gguf_name)


SPECIAL_IDS = ("bos", "eos", "unknown", "padding")


def check_tokenizer(reader, path: str | Path = "<gguf>", pieces: bool = True) -> list[str]:
    """The vocabulary (`tokenizer.ggml.tokens`), after checking the tokenizer metadata: special
    token ids inside the vocabulary and, with `pieces` (what a SentencePiece model is built from),
    scores and token types with one entry per token, types SentencePiece knows. Each failure
    names the key."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.tokens' is missing or not a list of strings")
    for key in ("scores", "token_type") if pieces else ():
        values = _field(reader, f"tokenizer.ggml.{key}")
        if not isinstance(values, list):
            raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.{key}' is missing")
        if len(values) != len(tokens):
            raise GGUFError(
                f"{path}: metadata field 'tokenizer.ggml.{key}' has {len(values)} entries for "
                f"{len(tokens)} tokens"
            )
    bad = [t for t in set(_field(reader, "tokenizer.ggml.token_type") or []) if t not in range(1, 7)]
    if bad:
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.token_type' has unknown types {sorted(bad)}")
    for name in SPECIAL_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        i = _field(reader, key)
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise GGUFError(
                f"{path}: metadata field '{key}' is {i!r}, outside the vocabulary of {len(tokens)}"
            )
    return tokens


def gemma3_config(reader, path: str | Path = "<gguf>") -> dict:
    """An HF-style `gemma3_text` config.json from the `gemma3.*` metadata, interpreted as llama.cpp
    runs the file (see the module docstring)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only {ARCH!r} GGUF files can be imported")

    def need(key: str):
        value = _field(reader, f"{ARCH}.{key}")
        if value is None:
            raise GGUFError(f"{path}: metadata field '{ARCH}.{key}' is missing")
        return value

    def size(key: str) -> int:
        value = need(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GGUFError(
                f"{path}: metadata field '{ARCH}.{key}' is {value!r}, expected a positive integer"
            )
        return value

    vocab = len(check_tokenizer(reader, path, pieces=False))
    n_layers, hidden = size("block_count"), size("embedding_length")
    heads, head_dim = size("attention.head_count"), size("attention.key_length")
    value_dim = int(_field(reader, f"{ARCH}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GGUFError(f"{path}: '{ARCH}.attention.value_length' {value_dim} != key_length {head_dim}")
    window = int(_field(reader, f"{ARCH}.attention.sliding_window", 0) or 0)
    full_rope: dict = {"rope_type": "default", "rope_theta": float(need("rope.freq_base"))}
    factor = float(_field(reader, f"{ARCH}.rope.scaling.factor", 1.0) or 1.0)
    kind = _field(reader, f"{ARCH}.rope.scaling.type", "linear" if factor != 1.0 else "none")
    if kind == "linear" and factor != 1.0:
        full_rope = {**full_rope, "rope_type": "linear", "factor": factor}
    elif kind not in ("none", "linear"):
        raise GGUFError(f"{path}: '{ARCH}.rope.scaling.type' is {kind!r}, expected 'linear' or 'none'")
    sliding_theta = float(_field(reader, f"{ARCH}.rope.freq_base_swa", 10_000.0))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{ARCH}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if n_layers == 62 else head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "sliding_window": window or size("context_length"),
        "max_position_embeddings": size("context_length"),
        # without a window llama.cpp runs every layer as global
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 or not window else "sliding_attention"
            for i in range(n_layers)
        ],
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta},
        },
        "final_logit_softcapping": _field(reader, f"{ARCH}.final_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    w = dequantize(t.data, t.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def check_tensors(reader, config: dict, path: str | Path = "<gguf>") -> None:
    """Fail before any work if a tensor is unknown, missing, misshapen or of a type the `gguf`
    package cannot dequantize (each type is tried on one row)."""
    from gguf.quants import dequantize

    try:
        parsed = parse_config(config, f"{path} (metadata)")
    except ConfigError as e:  # a value the size checks above do not cover (eps, rope, head counts)
        raise GGUFError(str(e)) from None
    expected = {k: v.shape for k, v in tree_flatten(Model(parsed).parameters())}
    seen, tried = set(), set()
    for t in reader.tensors:
        try:
            name = our_name(t.name)
        except KeyError:
            raise GGUFError(f"{path}: tensor {t.name} is not part of a Gemma 3 text model") from None
        shape = tuple(int(d) for d in reversed(t.shape))
        if name not in expected or shape != tuple(expected[name]):
            want = tuple(expected[name]) if name in expected else "none (not in this config)"
            raise GGUFError(f"{path}: tensor {t.name} has shape {shape}, the metadata implies {want}")
        if t.tensor_type not in tried:
            try:
                dequantize(t.data[:1], t.tensor_type)
            except NotImplementedError:
                raise GGUFError(
                    f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                    "cannot dequantize"
                ) from None
            tried.add(t.tensor_type)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise GGUFError(f"{path}: missing tensors {', '.join(missing[:8])}")


def tensors(reader, dtype: mx.Dtype = mx.float32) -> Iterator[tuple[str, mx.array]]:
    """Dequantized tensors under our names, with the norm shift undone (in float32, exact)."""
    for t in reader.tensors:
        name, w = our_name(t.name), _dequantize(t)
        if name.endswith("norm.weight"):
            w = w - NORM_SHIFT
        yield name, mx.array(w).astype(dtype)


def sentencepiece_model(reader, path: str | Path = "<gguf>") -> bytes:
    """A serialized SentencePiece model from `tokenizer.ggml.*` (GGUF token types use
    SentencePiece's numbering: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}, expected 'llama' (SentencePiece)")
    pieces = check_tokenizer(reader, path)
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    m = pb.ModelProto()
    for piece, score, t in zip(pieces, scores, types, strict=True):
        if t == 4:  # llama.cpp stores user-defined pieces un-escaped ("▁▁" as "  "); SentencePiece escapes
            piece = piece.replace(" ", "\u2581")
        m.pieces.add(piece=piece, score=float(score), type=int(t))
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = 6 in set(types)  # <0x00>..<0xFF> pieces present
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


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def import_gguf(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Convert a Gemma 3 GGUF file into an MLX checkpoint directory at `out` (written atomically;
    `finalize(tmp)` runs on the complete directory just before it is moved into place)."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise GGUFError(f"{src}: no such GGUF file")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    reader = open_gguf(src)
    config = gemma3_config(reader, src)
    tokenizer = sentencepiece_model(reader, src)  # all metadata is checked before the tensors
    check_tensors(reader, config, src)
    pieces = _field(reader, "tokenizer.ggml.tokens")
    eos = [config["eos_token_id"]] + ([pieces.index("<end_of_turn>")] if "<end_of_turn>" in pieces else [])
    # a GGUF of an instruction-tuned model may carry its own template; otherwise ours
    template = _field(reader, "tokenizer.chat_template") or (
        resources.files("gemma_mlx").joinpath("templates/gemma3.jinja").read_text()
    )
    tokenizer_config = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        **{f"{k}_token": pieces[config[f"{k}_token_id"]] for k in ("bos", "eos", "pad")},
        "unk_token": pieces[int(_field(reader, "tokenizer.ggml.unknown_token_id", 3))],
    }
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos,
        "pad_token_id": config["pad_token_id"],
    }
    meta = {k: _field(reader, k) for k in ("general.name", "general.size_label", "general.file_type")}
    # through the converter's writer: the same checks and the one tensor layout (mlx-lm's `model.*`
    # for this text model) that mlx-lm and mlx-vlm load, as `gemma-mlx convert` writes
    write_checkpoint(
        out,
        {**config, "torch_dtype": dtype},
        tensors(reader, getattr(mx, dtype)),
        dtype=dtype,
        extra_files={
            "tokenizer.model": tokenizer,
            "tokenizer_config.json": _json(tokenizer_config),
            "generation_config.json": _json(generation),
            "chat_template.jinja": template,
            "SOURCE.json": _json({"gguf": src.name, "size": src.stat().st_size, **meta}),
        },
        force=force,
        source=str(src),
        finalize=finalize,
    )
    return out
