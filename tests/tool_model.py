"""A tiny Gemma 4 checkpoint that really calls a tool: greedy decoding through the normal path emits
`<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>` and stops at `<|tool_response>`.

How: the next token is a fixed function of the last one. Embeddings are one-hot over a few "slots"
(hidden >= the tokens used), attention's output projection is zero (so position and context do not
matter), and the MLP maps the slot of token t to the slot of its successor, which the post-MLP norm
makes dominate the residual; the tied LM head reads the slot back as that token's logit. A token can
have only one successor, so the second `<|"|>` (the real special token is used for the first) comes
from an extra *special* token `<|"|>,days:3}` appended to the tiny test tokenizer (markup counts
only when a special token spells it); decoding keeps special tokens as text, so the text is exactly
what the real model writes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tiny import UNIFIED_CONFIG, save_tokenizer

from gemma_mlx.config import parse_config
from gemma_mlx.models.gemma import Model

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer", "description": "Forecast days"},
            },
            "required": ["city"],
        },
    },
}
CALL_NAME, CALL_ARGUMENTS = "get_weather", {"city": "Paris", "days": 3}
# the generated pieces, in order; <|tool_response> ends generation (an EOS id, as in Gemma 4's config)
PIECES = ["<|tool_call>", "call:get_weather{city:", '<|"|>', "Paris", '<|"|>,days:3}', "<tool_call|>"]
NEW_PIECES = [PIECES[1], PIECES[3]]  # plain tokens the tiny tokenizer lacks
NEW_SPECIAL = [PIECES[4]]  # the closing quote, fused with the text after it
STOP = "<|tool_response>"
HIDDEN = 16
# a text-only Gemma 4 (Gemma4UnifiedForCausalLM's config.json): one full-attention layer
CONFIG = {
    **copy.deepcopy(UNIFIED_CONFIG["text_config"]),
    "architectures": ["Gemma4UnifiedForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": HIDDEN,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": HIDDEN,
    "layer_types": ["full_attention"],
    "per_layer_config": {},
    "sliding_window": 8,
    "attention_k_eq_v": False,
    "final_logit_softcapping": None,
}


def _append_pieces(path: Path, pieces: list[str], special: list[str]) -> None:
    """Append `pieces` (plain) and `special` to `path/tokenizer.json` as added tokens, after every
    existing id, so the ids other tests know stay as they are."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    tok.save(str(path / "tokenizer.json"))


def build_tool_model(
    path: Path, tool: str = CALL_NAME, again: bool = False, vision: bool = False, answer: str | None = None
) -> str:
    """Write the checkpoint (config, weights, tokenizer) to `path`; returns the text greedy decoding
    produces after a chat prompt (thinking on or off), the stop token excluded. Needs MLX only.
    `tool`: the tool it calls (same arguments); `again`: after a tool's result (a prompt ending in
    "<tool_response|>") it calls once more, endlessly; `answer`: after a tool's result it writes
    this text instead and ends its turn, so an agent loop finishes; `vision`: a unified model with a
    (zero) vision embedder, so that prompts can hold images."""
    from tokenizers import Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(path)
    pieces = [p.replace(CALL_NAME, tool) for p in PIECES]
    plain = [p.replace(CALL_NAME, tool) for p in NEW_PIECES] + ([answer] if answer else [])
    _append_pieces(path, plain, NEW_SPECIAL)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = [tok.token_to_id(p) for p in pieces]
    stop, newline = tok.token_to_id(STOP), tok.encode("\n").ids
    assert None not in ids and stop is not None and len(newline) == 1
    assert len(ids) == len(set(ids)), "a token with two successors cannot be expressed"
    # the prompt ends in "<channel|>" (thinking off) or "<|turn>model\n" (thinking on)
    successor = {tok.token_to_id("<channel|>"): ids[0], newline[0]: ids[0]}
    if again:
        successor[tok.token_to_id("<tool_response|>")] = ids[0]
    successor.update(zip(ids, [*ids[1:], stop], strict=True))
    if answer:
        said = tok.token_to_id(answer)
        successor.update({tok.token_to_id("<tool_response|>"): said, said: tok.token_to_id("<turn|>")})
    slots = {t: i for i, t in enumerate(dict.fromkeys([*successor, *successor.values()]))}
    assert len(slots) <= HIDDEN

    config = CONFIG
    if vision:
        text = {**CONFIG, "model_type": "gemma4_unified_text"}
        del text["architectures"]
        vision_config = {
            **UNIFIED_CONFIG["vision_config"],
            "output_proj_dims": HIDDEN,
            "mm_embed_dim": HIDDEN,
        }
        config = {**copy.deepcopy(UNIFIED_CONFIG), "text_config": text, "vision_config": vision_config}
        config["image_token_id"] = tok.token_to_id("<|image|>")
        config["audio_token_id"] = tok.token_to_id("<|audio|>")
        config.pop("audio_config")
    model = Model(parse_config(config))
    weights = {name: np.zeros(p.shape, np.float32) for name, p in tree_flatten(model.parameters())}
    prefix = "language_model."
    layer = prefix + "layers.0."
    for name, w in weights.items():
        if name.endswith(("norm.weight", "layer_scalar")):
            w.fill(1.0)
    for t, s in slots.items():  # one-hot embeddings; the LM head is tied to them
        weights[prefix + "embed_tokens.weight"][t, s] = 1.0
    # attention's o_proj stays zero: the last token alone decides; the MLP maps t to its successor
    for row, (t, nxt) in enumerate(successor.items()):
        weights[layer + "mlp.gate_proj.weight"][row, slots[t]] = 1.0
        weights[layer + "mlp.up_proj.weight"][row, slots[t]] = 1.0
        weights[layer + "mlp.down_proj.weight"][slots[nxt], row] = 1.0
    # the MLP's one-hot output, normed to sqrt(hidden) and scaled x4, outweighs the input token
    weights[layer + "post_feedforward_layernorm.weight"].fill(4.0)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    # Gemma 4 also stops at <|tool_response>
    eos = [1, tok.token_to_id("<turn|>"), stop]
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": eos}))
    return "".join(pieces)
