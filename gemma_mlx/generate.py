"""Generation: chunked prefill, a pipelined decode loop, streaming text with stop handling."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache, RingKVCache
from .models.gemma import Model
from .processor import Inputs, Processor
from .sample import make_logits_processor, make_sampler
from .text import StreamingDetokenizer

Prompt = str | Sequence[int] | Sequence[dict] | Inputs
Progress = Callable[[int, int], None]


@dataclass
class GenerationChunk:
    """One streamed step: the token, the text it completed (may be empty), running stats."""

    token: int
    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length" on the last chunk
    drafted: int = 0  # speculative decoding: draft tokens proposed and accepted so far
    accepted: int = 0


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0


@dataclass
class GenerationResult:
    text: str
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None
    drafted: int = 0
    accepted: int = 0


def make_cache(model: Model, slack: int = 128) -> list[KVCache | RingKVCache]:
    """Per-layer KV caches for `model`; `slack` is the rollback room of the sliding-window rings."""
    return model.make_cache(slack)


def prefill(
    model: Model, ids: mx.array, cache: list, step: int = 512, progress: Progress | None = None
) -> None:
    """Run `ids [L]` through the model in chunks of `step` tokens, filling `cache`;
    `progress(done, total)` after each chunk."""
    for i in range(0, ids.shape[0], step):
        model(ids[None, i : i + step], cache, logits_to_keep=1)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(i + step, ids.shape[0]), ids.shape[0])


def generate_tokens(
    model: Model,
    ids: mx.array,
    cache: list,
    sampler,
    logits_processor=None,
    key: mx.array | None = None,
    prefill_step_size: int = 512,
    media: dict | None = None,
    progress: Progress | None = None,
) -> Iterator[int]:
    """Yield sampled token ids forever, given prompt `ids [L]` (L >= 1) not yet in `cache`.

    `media` (pixel_values, input_features, ...) go with a single prefill chunk, since an image
    block must not be split. The next step is queued with `mx.async_eval` before the current
    token is handed out, so the host work of the caller overlaps the device computing the next token.
    """
    if media:
        model(ids[None, :-1], cache, logits_to_keep=1, **media)
        mx.eval([c.state for c in cache])
    else:
        prefill(model, ids[:-1], cache, prefill_step_size, progress)
    key = mx.random.key(secrets.randbits(32)) if key is None else key

    def step(tok: mx.array) -> mx.array:
        nonlocal key
        logits = model(tok.reshape(1, -1), cache, logits_to_keep=1)[:, -1]
        if logits_processor is not None:
            logits = logits_processor(logits)
        key, sub = mx.random.split(key)
        return sampler(logits, sub)

    y = step(ids[-1:])
    mx.async_eval(y)
    while True:
        nxt = step(y)
        mx.async_eval(nxt)
        yield y.item()
        y = nxt


def speculative_tokens(
    model: Model,
    drafter,
    ids: mx.array,
    cache: list,
    sampler,
    logits_processor=None,
    key: mx.array | None = None,
    block_size: int = 4,
    prefill_step_size: int = 512,
    media: dict | None = None,
    progress: Progress | None = None,
    stats: DraftStats | None = None,
) -> Iterator[int]:
    """Yield tokens forever with MTP speculative decoding (rounds of the design doc §8.4).

    Each round the drafter proposes `block_size - 1` tokens from the last token `t0` and the
    target's final hidden state, reading the target's cached K/V; the target verifies
    `[t0, drafts]` in one forward pass and samples its own token at every position; the drafts
    are accepted while they equal the target's tokens, then the target's token follows. Rejected
    positions are trimmed from the caches (the rings keep rollback slack). Every emitted token is
    the target's own choice, so greedy output equals plain decoding.
    """
    from .models.drafter import shared_kv

    k = block_size - 1
    if k < 1 or k > min((c.slack for c in cache if isinstance(c, RingKVCache)), default=k):
        raise ValueError(f"draft block size {block_size}: must be 2 .. 1 + the caches' rollback slack")
    if media:
        model(ids[None, :-1], cache, logits_to_keep=1, **media)
    else:
        prefill(model, ids[:-1], cache, prefill_step_size, progress)
    key = mx.random.key(secrets.randbits(32)) if key is None else key
    stats = stats if stats is not None else DraftStats()
    types = model.config.text.layer_types

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        if logits_processor is not None:
            logits = logits_processor(logits)
        key, sub = mx.random.split(key)
        return sampler(logits, sub)

    out = model(ids[None, -1:], cache, return_hidden=True)
    t0, hidden = int(sample(out.logits[:, -1]).item()), out.hidden[:, -1:]
    while True:
        yield t0
        position = cache[0].offset  # t0's position: the caches hold everything before it
        kv = shared_kv(cache, types, position)
        tok, h, drafts = mx.array([[t0]]), hidden, []
        for _ in range(k):  # drafts stay lazy until the verify pass needs them
            logits, h = drafter(model.language_model.embed(tok), h, kv, position)
            tok = mx.argmax(logits[:, -1], axis=-1).reshape(1, 1)
            drafts.append(tok)
        block = mx.concatenate([mx.array([[t0]]), *drafts], axis=1)
        out = model(block, cache, return_hidden=True)
        targets = sample(out.logits[0])
        mx.eval(block, targets)
        proposed, chosen = block[0, 1:].tolist(), targets.tolist()
        n = 0
        while n < k and proposed[n] == chosen[n]:
            n += 1
        stats.drafted += k
        stats.accepted += n
        yield from proposed[:n]
        for c in cache:
            c.trim(k - n)
        t0, hidden = chosen[n], out.hidden[:, n : n + 1]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that may still grow into a stop string."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    cache: list | None = None,
    prefill_step_size: int = 512,
    images: Sequence = (),
    audio: Sequence = (),
    enable_thinking: bool = False,
    max_soft_tokens: int = 280,
    prefill_progress: Progress | None = None,
    drafter=None,
    draft_block_size: int = 4,
) -> Iterator[GenerationChunk]:
    """Stream a completion of `prompt` (text, token ids, or chat messages, whose parts may hold
    images and audio; a text prompt takes `images`/`audio` for its placeholders).

    Stops at `max_tokens`, on the processor's EOS ids, or when a `stop` string appears (the
    stop string itself is not emitted). A `cache` already holding earlier tokens is continued:
    only `prompt`'s tokens are prefilled. With a `drafter` (see `load_drafter`), decoding is
    speculative with blocks of `draft_block_size` tokens (greedy output is unchanged).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    if isinstance(prompt, Inputs):  # already prepared (e.g. by a chat session)
        inputs = prompt
    else:
        room = model.config.text.max_position_embeddings - (cache[0].offset if cache else 0)
        inputs = processor.prepare(
            prompt,
            images,
            audio,
            enable_thinking=enable_thinking,
            max_soft_tokens=max_soft_tokens,
            token_budget=room,
        )
    ids = inputs.ids
    if not ids:
        raise ValueError("prompt is empty")
    cache = make_cache(model) if cache is None else cache
    context = model.config.text.max_position_embeddings
    used = cache[0].offset if cache else 0
    if used + len(ids) >= context:
        raise ValueError(
            f"prompt has {len(ids)} tokens (+{used} already cached); the model's context is {context} tokens"
        )
    max_tokens = min(max_tokens, context - used - len(ids))
    vocab = model.config.text.vocab_size
    suppress = [i for i in processor.suppress_token_ids if i < vocab]
    if model.config.multimodal:  # never generate media markers or soft-token placeholders
        c = model.config
        marks = (c.eoi_token_id, c.eoa_token_id, c.image_token_id, c.audio_token_id, c.video_token_id)
        suppress += [i for i in marks if i < vocab]
    sampler = make_sampler(temperature, top_k, top_p, min_p)
    key = None if seed is None else mx.random.key(seed)
    eos = set(processor.eos_token_ids)
    detok = StreamingDetokenizer(processor.tokenizer)
    text, emitted = "", 0

    mx.reset_peak_memory()
    tic = time.perf_counter()
    processor_fn = make_logits_processor(sorted(set(suppress))) if suppress else None
    prompt_ids, media = mx.array(ids, dtype=mx.int32), inputs.model_kwargs()
    stats = DraftStats()
    if drafter is None:
        tokens = generate_tokens(
            model, prompt_ids, cache, sampler, processor_fn, key, prefill_step_size, media, prefill_progress
        )
    else:
        tokens = speculative_tokens(
            model,
            drafter,
            prompt_ids,
            cache,
            sampler,
            processor_fn,
            key,
            draft_block_size,
            prefill_step_size,
            media,
            prefill_progress,
            stats,
        )
    prompt_tps = gen_tps = 0.0
    n = 0
    for n, tok in enumerate(tokens, 1):
        now = time.perf_counter()
        if n == 1:
            prompt_tps, tic = len(ids) / (now - tic), now
        gen_tps = (n - 1) / (now - tic) if n > 1 else 0.0
        finish = "stop" if tok in eos else ("length" if n >= max_tokens else None)
        if tok not in eos:
            text += detok.add_token(tok)
        if finish:
            text += detok.finalize()
        cut = min((text.find(s) for s in stop if s in text), default=-1)  # the earliest stop string
        if cut >= 0:
            text, finish = text[:cut], "stop"
        safe = len(text) if finish else len(text) - _held_back(text, stop)
        delta, emitted = text[emitted:safe], max(emitted, safe)
        yield GenerationChunk(
            tok,
            delta,
            len(ids),
            n,
            prompt_tps,
            gen_tps,
            mx.get_peak_memory() / 1e9,
            finish,
            stats.drafted,
            stats.accepted,
        )
        if finish:
            break
    tokens.close()


def generate(model: Model, processor: Processor, prompt: Prompt, **kwargs) -> GenerationResult:
    """Generate a completion; takes the keyword arguments of `stream_generate`."""
    result = GenerationResult(text="")
    for chunk in stream_generate(model, processor, prompt, **kwargs):
        result.text += chunk.text
        result.tokens.append(chunk.token)
        result.prompt_tokens, result.prompt_tps = chunk.prompt_tokens, chunk.prompt_tps
        result.generation_tps, result.peak_memory_gb = chunk.generation_tps, chunk.peak_memory_gb
        result.finish_reason, result.drafted, result.accepted = (
            chunk.finish_reason,
            chunk.drafted,
            chunk.accepted,
        )
    return result
