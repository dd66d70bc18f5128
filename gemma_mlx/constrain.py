"""Constrained decoding: JSON-schema answers and grammar-checked tool calls, as token masks.

The engine is llguidance (see README "Structured outputs" for why, measured against xgrammar in
benchmarks/constrain_engines.py). One `Constraint` per request: the generation loop asks it for a
packed bitmask (int32 words, bit i = token i allowed) before sampling each token and tells it
the token sampled; the mask is applied in MLX (`apply_mask`), so the logits never come back to
the host. The host computes the mask for step t+1 while the device runs step t+1's forward pass.

Phases of one answer: an optional thought (`<|channel>...<channel|>`, free text: no mask but
`<|tool_call>`), then the answer, where a response format's grammar holds from the first token,
or, with tools, free text in which each `<|tool_call>` opens a call that the grammar of
`call:NAME{arguments}<tool_call|>` then holds until it closes (tool_choice "required" or a named
tool: the answer must start with a call; "none" or no tools: `<|tool_call>` is never allowed).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .text import Tokenizer

EXTRA = "structured"
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ConstraintUnavailable(ImportError):
    """The `structured` extra (llguidance) is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintUnavailable(
            f"structured outputs and constrained tool calls need llguidance: pip install 'gemma-mlx[{EXTRA}]'"
        ) from None
    return llguidance


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Every token's bytes as decoding writes them (▁ is a space, <0xNN> byte-fallback pieces are
    that byte) and the ids of the special tokens (control markup, which no plain text spells)."""
    backend = tokenizer._backend
    tokens: list[bytes] = []
    special: list[int] = []
    if tokenizer._sp:
        for i in range(backend.get_piece_size()):
            piece = backend.id_to_piece(i)
            if backend.is_control(i) or backend.is_unknown(i):
                special.append(i)
                tokens.append(piece.encode())
            elif backend.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        return tokens, special
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    for i in range(backend.get_vocab_size()):
        piece = backend.id_to_token(i)
        if piece is None:
            tokens.append(b"")
            continue
        if i in added:
            if added[i].special:
                special.append(i)
            tokens.append(piece.encode())
        elif m := _BYTE.fullmatch(piece):
            tokens.append(bytes([int(m.group(1), 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class Vocabulary:
    """llguidance's view of one tokenizer, padded to the model's `size` (ids past the tokenizer
    are never allowed). Built once per (tokenizer, size): about a second for 262,144 tokens."""

    def __init__(self, tokenizer: Tokenizer, size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        tokens, special = token_bytes(tokenizer)
        self.tokenizer, self.size, self.eos_ids = tokenizer, max(size, len(tokens)), list(eos_ids)
        self.special_ids = set(special)

        class Wrapper:
            eos_token_id, bos_token_id = self.eos_ids[0], tokenizer.bos_token_id
            special_token_ids = special

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, text: str | bytes) -> list[int]:  # plain text: specials stay text
                text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                return tokenizer.encode(tokenizer.escape(text))

        self.lltokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(Wrapper()), n_vocab=self.size, eos_token=self.eos_ids
        )
        self.words = (self.size + 31) // 32

    def id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vocabulary(processor: Any, size: int | None = None) -> Vocabulary:
    """The (cached) `Vocabulary` of a processor's tokenizer for a model of `size` tokens."""
    tokenizer = processor.tokenizer
    size = size or tokenizer.vocab_size
    with _lock:
        per = _vocabularies.setdefault(tokenizer, {})
        if size not in per:
            per[size] = Vocabulary(tokenizer, size, processor.eos_token_ids)
        return per[size]
