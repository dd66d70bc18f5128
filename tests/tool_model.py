"""A tiny Gemma 4 checkpoint that really calls a tool: greedy decoding through the normal path emits
`<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>` and stops at `<|tool_response>`,
token by token as Gemma 4 writes it (`<|"|>` opens and closes the string: one special token, twice).

How: the next token is a fixed function of the last two. Embeddings are one-hot over a few "slots"
(the first half of the hidden size). The first layer is a sliding-window layer of window 2 whose
queries and keys are zero, so it averages the values of the previous and the last token; V reads
the slots and O writes them to the second half of the residual ("context" dims). The MLP maps the
last token to its successor: a token with one successor by one row gated on its slot alone, a
token used twice with different successors (`<|"|>`) by one row per predecessor, gated on its slot
and multiplied by the predecessor's context dim. The post-MLP norm makes that one-hot dominate the
residual; the tied LM head reads the slot back as the successor's logit. The second layer (Gemma 4
ends with a full-attention layer) is all zero: the identity. Pieces the tiny test
tokenizer lacks are appended to it as plain tokens; markup stays the real special tokens.
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
# (",days:" apart from "3}": where the call grammar forces text, as ",days:" when days is required,
# llguidance's mask did not allow a token running past it into the number, ",days:3}"; measured)
PIECES = ["<|tool_call>", "call:get_weather{city:", '<|"|>', "Paris", '<|"|>', ",days:", "3}", "<tool_call|>"]
STOP = "<|tool_response>"
SLOTS = 16  # tokens the model can read and write; the residual holds their slots and context dims
HIDDEN = 2 * SLOTS
# a text-only Gemma 4 (Gemma4UnifiedForCausalLM's config.json): a sliding layer of window 2 that does
# the work, and the full-attention layer Gemma 4 ends with, all zero (the identity)
CONFIG = {
    **copy.deepcopy(UNIFIED_CONFIG["text_config"]),
    "architectures": ["Gemma4UnifiedForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": SLOTS,
    "global_head_dim": SLOTS,
    "layer_types": ["sliding_attention", "full_attention"],
    "per_layer_config": {},
    "sliding_window": 2,
    "attention_k_eq_v": False,
    "final_logit_softcapping": None,
}


def _append_pieces(path: Path, pieces: list[str]) -> None:
    """Append the `pieces` that `path/tokenizer.json` lacks as plain added tokens, after every
    existing id, so the ids other tests know stay as they are."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    new = [p for p in dict.fromkeys(pieces) if tok.token_to_id(p) is None]
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in new])
    tok.save(str(path / "tokenizer.json"))


def _rules(base: dict[int, int], chain: list[int]) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
    """(token -> successor, (predecessor, token) -> successor): `base` (the ends of prompts) and
    the generated `chain`, whose transitions override the base; a token the chain uses with two
    successors is told apart by the token before it."""
    seen: dict[int, dict[int, int]] = {}
    for i, (t, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
        seen.setdefault(t, {})[chain[i - 1] if i else -1] = nxt
    first = dict(base)
    second: dict[tuple[int, int], int] = {}
    for t, by_prev in seen.items():
        if len(set(by_prev.values())) == 1:
            first[t] = next(iter(by_prev.values()))
            continue
        assert -1 not in by_prev and t not in by_prev, "a repeated token needs a distinct predecessor"
        first.pop(t, None)
        second.update({(p, t): nxt for p, nxt in by_prev.items()})
    return first, second


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
    _append_pieces(path, pieces + ([answer] if answer else []))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = [tok.token_to_id(p) for p in pieces]
    stop, newline = tok.token_to_id(STOP), tok.encode("\n").ids
    assert None not in ids and stop is not None and len(newline) == 1
    # the prompt ends in "<channel|>" (thinking off) or "<|turn>model\n" (thinking on)
    base = {tok.token_to_id("<channel|>"): ids[0], newline[0]: ids[0]}
    if again:
        base[tok.token_to_id("<tool_response|>")] = ids[0]
    if answer:
        said = tok.token_to_id(answer)
        base.update({tok.token_to_id("<tool_response|>"): said, said: tok.token_to_id("<turn|>")})
    first, second = _rules(base, [*ids, stop])
    used = [*first, *first.values(), *(t for pair in second for t in pair), *second.values()]
    slots = {t: i for i, t in enumerate(dict.fromkeys(used))}
    assert len(slots) <= SLOTS and len(first) + len(second) <= HIDDEN

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
    # q and k stay zero: attention averages the window (the previous and the last token) evenly;
    # V copies the slots, O writes them to the context dims
    for s in range(SLOTS):
        weights[layer + "self_attn.v_proj.weight"][s, s] = 1.0
        weights[layer + "self_attn.o_proj.weight"][SLOTS + s, s] = 1.0
    # the MLP: gelu(last token's slot) x (its slot, or the predecessor's context dim) -> successor
    rows = [(t, slots[t], nxt) for t, nxt in first.items()]
    rows += [(t, SLOTS + slots[p], nxt) for (p, t), nxt in second.items()]
    for row, (t, up, nxt) in enumerate(rows):
        weights[layer + "mlp.gate_proj.weight"][row, slots[t]] = 1.0
        weights[layer + "mlp.up_proj.weight"][row, up] = 1.0
        weights[layer + "mlp.down_proj.weight"][slots[nxt], row] = 1.0
    # the MLP's one-hot output, normed to sqrt(hidden) and scaled x4, outweighs the input token
    weights[layer + "post_feedforward_layernorm.weight"].fill(4.0)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    # Gemma 4 also stops at <|tool_response>
    eos = [1, tok.token_to_id("<turn|>"), stop]
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": eos}))
    return "".join(pieces)
