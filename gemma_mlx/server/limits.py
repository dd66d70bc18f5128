"""Bounds on the work one request may cause, checked before any heavy step.

A request body is parsed once (deep nesting is a 400, not a RecursionError), every string in it is
checked for lone surrogates (no tokenizer, file system or JSON encoder takes them), and a prompt's
length is bounded from its character count before the tokenizer runs: no token is shorter than one
character, so text longer than `context * longest token` cannot fit, and longer text is counted in
bounded pieces that stop as soon as the context is exceeded. Preparation (template, media decoding,
tokenizing) runs on threads, a few at a time behind `PrepareGate`, which counts waiting requests
against the same `--max-queue` as the generation queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from ..processor import Processor
from .schema import APIError

MAX_DEPTH = 64  # nesting of the request body (tool schemas included); real requests use < 20
PIECE_CHARS = 1 << 16  # text counted per tokenizer call while bounding a long prompt
_SURROGATE = re.compile("[\ud800-\udfff]")
_GEMMA4 = "this needs a Gemma 4 model (the loaded model's chat template cannot do it)"


def parse_body(body: bytes) -> Any:
    """The JSON value of a request body; invalid JSON, nesting deeper than `MAX_DEPTH` and lone
    surrogates in any string are 400s naming where they are."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels", None, "invalid_json") from None
    check_value(value)
    return value


def check_value(value: Any) -> None:
    """Walk a parsed body without recursion: nesting depth and strings (keys included)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"{where or 'body'}: nests deeper than {MAX_DEPTH} levels", where or None)
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise APIError(
                    400, f"{where or 'body'}: a lone surrogate (\\ud800-\\udfff) is not text", where or None
                )
        elif isinstance(v, dict):
            for k, item in v.items():
                name = f"{where}.{k}" if where else str(k)
                if _SURROGATE.search(k):
                    raise APIError(400, f"{where or 'body'}: a key holds a lone surrogate", where or None)
                stack.append((item, name, depth + 1))
        elif isinstance(v, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))


def longest_token(processor: Processor) -> int:
    """The most characters one token of the vocabulary decodes to (at least 1)."""
    tok = processor.tokenizer
    longest = 1
    for i in range(tok.vocab_size):
        piece = tok.id_to_token(i)
        if piece is not None and len(piece) > longest:
            longest = len(piece)
    return longest


def text_chars(conv: Any) -> int:
    """Characters of a conversation's text (message text, thoughts, tool-call names and arguments,
    tool declarations), media data excluded: what becomes prompt tokens one way or another."""
    total = 0
    for m in conv.messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if p.get("type") == "text")
        elif content is not None:  # a structured tool result ({"error": ...})
            total += len(json.dumps(content))
        total += len(m.get("reasoning_content") or "")
        for c in m.get("tool_calls") or ():
            fn = c.get("function", {})
            total += len(fn.get("name", "")) + len(json.dumps(fn.get("arguments", {})))
    for t in conv.tools or []:
        total += len(json.dumps(t))
    return total


def too_long(tokens: str, context: int, param: str) -> APIError:
    return APIError(
        400,
        f"the prompt has {tokens} tokens; the model's context is {context} tokens",
        param,
        "context_length_exceeded",
    )


def check_chars(chars: int, longest: int, context: int, param: str) -> None:
    """A prompt of `chars` characters cannot fit when even the longest tokens would overflow."""
    if chars > context * longest:
        raise too_long(f"{chars:,} characters, so more than {context:,}", context, param)


def check_text(processor: Processor, text: str, context: int, param: str) -> None:
    """Refuse `text` whose tokens surely overflow `context`, counting long text in pieces of
    `PIECE_CHARS` (cut after a newline or space) so the tokenizer never holds more than a piece;
    the exact count of a text that passes is made by the caller's encode."""
    if len(text) <= context:  # at most a few tokens per character: the full encode is bounded
        return
    counted, pos, pieces = 0, 0, 0
    while pos < len(text):
        end = min(pos + PIECE_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", pos, end), text.rfind(" ", pos, end))
            end = cut + 1 if cut > pos else end
        counted += len(processor.tokenizer.encode(text[pos:end]))
        pos, pieces = end, pieces + 1
        # a cut changes the tokens only next to it: a few per cut at most
        if counted - 4 * pieces > context:
            raise too_long(f"more than {context:,}", context, param)


class PrepareGate:
    """At most `slots` requests prepare at once; at most `max_waiting` wait for a slot (beyond: 429),
    so preparation threads cannot be used to get round `--max-queue`."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots, self.max_waiting = slots, max_waiting
        self._sem: asyncio.Semaphore | None = None
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        if self._sem is None:  # made on the server's event loop
            self._sem = asyncio.Semaphore(self.slots)
        if self._sem.locked() and self.waiting >= self.max_waiting:
            raise APIError(
                429,
                f"the server is busy ({self.waiting} requests waiting to be prepared); retry later",
                None,
                "queue_full",
                "rate_limit_error",
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


def check_capabilities(model: Any, processor: Processor, conv: Any) -> None:
    """400s naming the field for what the loaded model cannot do (instead of a template that drops
    tools, or media with no place in the prompt): tools, tool turns, thinking, images, audio.
    `conv` is the shared `Conversation`, so every API gets the same checks under its own names."""
    tok = processor.tokenizer
    tools_ok = "tools" in processor.chat_template.source and tok.token_to_id("<|tool_call>") is not None
    where = conv.message_params or [conv.messages_param] * len(conv.messages)
    if not tools_ok:
        if conv.tools:
            raise APIError(400, f"{conv.tools_param}: {_GEMMA4}", conv.tools_param, "unsupported_value")
        if conv.tool_choice not in (None, "none", "auto"):
            param = conv.tool_choice_param
            raise APIError(400, f"{param}: {_GEMMA4}", param, "unsupported_value")
        for i, m in enumerate(conv.messages):
            if m["role"] == "tool" or m.get("tool_calls"):
                field = "role" if m["role"] == "tool" else "tool_calls"
                param = f"{where[i]}.{field}" if conv.message_params else where[i]
                what = "a tool result" if m["role"] == "tool" else "a tool call"
                raise APIError(400, f"{param}: {what}: {_GEMMA4}", param)
    if conv.thinking and not processor.supports_thinking:
        param = conv.thinking_param
        raise APIError(400, f"{param}: {_GEMMA4}", param, "unsupported_value")
    cfg = model.config
    kinds = {"image": getattr(cfg, "vision", None), "audio": getattr(cfg, "audio", None)}
    for m in conv.messages:
        for p in m["content"] if isinstance(m.get("content"), list) else []:
            if p["type"] in kinds and kinds[p["type"]] is None:
                what = "images" if p["type"] == "image" else "audio"
                param = p.get("part") or conv.messages_param
                raise APIError(
                    400,
                    f"{param}: the loaded model takes no {what} (a Gemma 4 model does)",
                    param,
                    "unsupported_value",
                )
