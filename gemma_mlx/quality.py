"""Measuring a model variant against a reference: perplexity, top-1 agreement, KL divergence.

Used to judge quantization (the converter's `--check`, the quality table in README).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import Cache
from .models.gemma import Model


def log_probs(
    model: Model, ids: Sequence[int], cache: list[Cache] | None = None, step: int = 256
) -> np.ndarray:
    """Next-token log-probabilities `[L, vocab]` (float64) for every position of `ids`. With a
    `cache` the text goes through it in chunks of `step` tokens, so attention reads the cache's
    stored (e.g. quantized) keys and values as decoding does. The head: `head_log_probs`.
    """
    ids = list(ids)
    chunks = [ids] if cache is None else [ids[i : i + step] for i in range(0, len(ids), step)]
    hidden = np.concatenate(
        [
            np.array(model.forward(mx.array([c]), cache, logits_to_keep=1).hidden[0].astype(mx.float32))
            for c in chunks
        ]
    )
    return head_log_probs(model, hidden)


def head_table(model: Model) -> np.ndarray:
    """The tied LM head `[vocab, dim]` as a float32 numpy array (dequantized if quantized)."""
    emb = model.language_model.embed_tokens
    if hasattr(emb, "scales"):
        table = mx.dequantize(
            emb.weight,
            emb.scales,
            emb.get("biases"),
            emb.group_size,
            emb.bits,
            mode=getattr(emb, "mode", "affine"),
        )
    else:
        table = emb.weight
    return np.array(table.astype(mx.float32))


def head_log_probs(model: Model, hidden: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities `[L, vocab]` (float64) from final-norm hidden states `[L, dim]`.

    The tied LM head is applied in numpy on the dequantized table (`table`, default
    `head_table(model)`): mathematically the same product, and far faster than MLX's CPU matmul
    for a 262k vocabulary.
    """
    table = head_table(model) if table is None else table
    logits = (hidden @ table.T).astype(np.float64)
    cap = model.config.text.final_logit_softcapping
    if cap is not None:
        logits = np.tanh(logits / cap) * cap
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@dataclass
class Quality:
    perplexity: float
    top1_agreement: float  # fraction of positions whose argmax equals the reference's
    mean_kl: float  # mean KL(reference || variant) in nats per token
    max_logprob_diff: float


def compare(reference: np.ndarray, variant: np.ndarray, ids: Sequence[int]) -> Quality:
    """Quality of `variant` log-probs against `reference` ones on the text `ids`."""
    targets = np.asarray(ids[1:])
    ref, var = reference[:-1], variant[:-1]
    nll = -var[np.arange(len(targets)), targets]
    kl = (np.exp(ref) * (ref - var)).sum(-1)
    return Quality(
        perplexity=float(np.exp(nll.mean())),
        top1_agreement=float((ref.argmax(-1) == var.argmax(-1)).mean()),
        mean_kl=float(kl.mean()),
        max_logprob_diff=float(np.abs(np.maximum(ref, -30) - np.maximum(var, -30)).max()),
    )
