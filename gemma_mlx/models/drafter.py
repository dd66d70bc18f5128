"""The MTP "assistant" drafter of Gemma 4 12B: query-only decoder layers that read the target's K/V.

One draft step (HF `Gemma4UnifiedAssistantForCausalLM`): `pre_projection([target embedding of the
last token * sqrt(hidden), target hidden])` -> the target's own decoder layer in query-only mode,
attending to the cached keys/values of the target's last sliding / last full layer -> norm -> tied
head (greedy draft) and `post_projection` (the next step's hidden state).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import Cache, SharedView
from ..config import DrafterConfig
from .gemma import Model, TextModel


class Drafter(nn.Module):
    """Parameter names follow the assistant checkpoint (`model.layers...`, `pre_projection`)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.model = TextModel(text, query_only=True)  # its embedding serves only as the tied head
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)

    @staticmethod
    def saved_name(name: str) -> str:
        """Names are written as the assistant checkpoint has them (ours)."""
        return name

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """On-disk names are ours already; the tied `lm_head.weight` is dropped."""
        return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}

    def __call__(
        self, embedding: mx.array, hidden: mx.array, kv: dict[str, SharedView], position: int
    ) -> tuple[mx.array, mx.array]:
        """`embedding`, `hidden` `[B, 1, backbone]` (target's scaled embedding of the last token and
        its final-norm hidden state) -> (logits `[B, 1, vocab]`, next hidden `[B, 1, backbone]`)."""
        x = self.pre_projection(mx.concatenate([embedding, hidden], axis=-1))
        x, _ = self.model(x, shared=kv, position=position)
        return self.model.embed_tokens.as_linear(x), self.post_projection(x)

    @staticmethod
    def shared_kv(target: Model, cache: list[Cache], position: int) -> dict[str, SharedView]:
        """The K/V of the target's last layer of each type as a query at `position` sees them."""
        return {t: cache[i].shared_view(position) for t, i in target.language_model.last_of_type.items()}

    def draft(self, target: Model, cache: list[Cache], token: int, hidden: mx.array, n: int) -> mx.array:
        """Propose `n` greedy tokens `[1, n]` after `token`, whose target hidden state is
        `hidden [1, 1, backbone]` and which sits at position `cache[0].offset` (not yet fed).
        The drafts stay lazy: the target's verify pass evaluates them."""
        position = cache[0].offset
        kv = self.shared_kv(target, cache, position)
        tok, h, drafts = mx.array([[token]]), hidden, []
        for _ in range(n):
            logits, h = self(target.language_model.embed(tok), h, kv, position)
            tok = mx.argmax(logits[:, -1], axis=-1).reshape(1, 1)
            drafts.append(tok)
        return mx.concatenate(drafts, axis=1)
