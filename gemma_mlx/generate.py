"""Generation: one prefill, then a pipelined decode loop or MTP speculative rounds, streamed as text.

`generate_tokens` is the core (prompt ids in, token ids out); `stream_generate` wires it to the
processor, the sampler, the detokenizer with stop strings, and the clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx
import numpy as np

from .cache import Cache, RingKVCache
from .draft_control import DraftControl
from .models.drafter import Drafter
from .models.gemma import Model
from .processor import Inputs, Processor
from .sample import SamplingParams
from .text import PLAIN_LT, StreamingDetokenizer, Tokenizer
from .tools import ToolCall, parse_output, tool_names

Prompt = str | Sequence[int] | Sequence[dict] | Inputs
Progress = Callable[[int, int], None]
Sample = Callable[..., mx.array]  # (logits [B, V], start: int | None = None) -> ids [B], see token_sampler


@dataclass
class GenerationStats:
    """What one generation cost: used by the API, chat, bench, the CLI and the server."""

    prompt_tokens: int = 0  # tokens prefilled for this request
    cached_prompt_tokens: int = 0  # tokens of context already in the cache, reused
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    drafted: int = 0  # speculative decoding: draft tokens proposed and accepted
    accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance}


@dataclass
class GenerationChunk:
    """One streamed step: the token, the text it completed (may be empty), the stats so far and, on
    the last chunk, why generation ended."""

    token: int
    text: str
    stats: GenerationStats
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    # `text` as the output parser reads it: only special tokens the model sampled spell markup,
    # a "<" that plain tokens wrote is `tools.PLAIN_LT` (see gemma_mlx.tools)
    markup: str = ""


@dataclass
class GenerationResult:
    """`text` as generated (markup included); with `tools`, the answer parsed: `content` (no
    markup), `reasoning` (the thought channel) and `tool_calls`, `finish_reason` "tool_calls"."""

    text: str = ""
    markup: str = ""  # `text` as the output parser reads it (see `GenerationChunk.markup`)
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.stats.prompt_tps

    @property
    def generation_tps(self) -> float:
        return self.stats.generation_tps

    @property
    def peak_memory_gb(self) -> float:
        return self.stats.peak_memory_gb


def check_kv_quantization(kv_bits: int | None, kv_group_size: int) -> None:
    """Raise ValueError for KV-cache quantization settings no model takes (before loading one)."""
    if kv_bits is not None and (kv_bits not in (4, 8) or kv_group_size not in (32, 64, 128)):
        raise ValueError(
            f"kv_bits={kv_bits}, kv_group_size={kv_group_size}: expected 8 or 4 bits, groups of 32/64/128"
        )


def make_cache(
    model: Model,
    slack: int = 128,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantize_rings: bool = True,
) -> list[Cache]:
    """Per-layer KV caches for `model`; `slack` is the rollback room of the sliding-window rings.
    `kv_bits` 8 or 4 stores keys and values quantized in groups of `kv_group_size` along the head
    dimension (on every layer, or only the global ones without `quantize_rings`)."""
    if kv_bits is None:
        return model.make_cache(slack)
    check_kv_quantization(kv_bits, kv_group_size)
    for spec in model.config.text.layers:
        if spec.head_dim % kv_group_size:
            raise ValueError(
                f"kv_group_size={kv_group_size} does not divide the head dimension {spec.head_dim}"
            )
    return model.make_cache(slack, (kv_bits, kv_group_size), quantize_rings)


def prefill(
    model: Model,
    ids: mx.array,
    cache: list[Cache],
    *,
    media: dict | None = None,
    step: int = 512,
    progress: Progress | None = None,
) -> None:
    """Feed `ids [L]` into `cache` in chunks of about `step` tokens (`progress(done, total)` after
    each). With `media` (pixel_values, input_features, ...) the embeddings are computed once and
    chunked too; a chunk is extended to the end of an image block it would cut, since an image
    attends bidirectionally within its block. The caches are evaluated, so the work is done when
    this returns."""
    n = ids.shape[0]
    embeds = blocks = None
    if media:
        embeds, blocks = model.embed_inputs(ids[None], **media)
    in_block = np.zeros(n + 1, bool)  # position i continues the image block of position i - 1
    if blocks is not None:
        b = np.array(blocks[0])
        in_block[1:n] = (b[1:] >= 0) & (b[1:] == b[:-1])
    chunks, ends, start = [], [], 0
    while start < n:
        end = min(start + step, n)
        while in_block[end]:
            end += 1
        if embeds is None:
            chunks.append({"input_ids": ids[None, start:end]})
        else:
            chunk_blocks = None if blocks is None else blocks[:, start:end]
            chunks.append({"inputs_embeds": embeds[:, start:end], "block_ids": chunk_blocks})
        ends.append(end)
        start = end

    def done(i: int) -> None:
        if progress is not None:
            progress(ends[i], n)

    model.prefill_chunks(chunks, cache, done)


NON_FINITE = 0xFFFFFFFF  # the id a step yields when its token's logit was not finite (no real id is)


class NonFiniteLogitsError(RuntimeError):
    """The model's logits turned NaN or infinite: broken weights or an overflow, not a prompt issue."""


def _flag_non_finite(sample: Sample) -> Sample:
    """`sample` whose id is `NON_FINITE` where the logit of the chosen token is NaN or infinite:
    read with the id the loop reads anyway, so no extra host sync. Checking the chosen logit costs
    one gather (with `_feedable`, +33 us per step measured on this 2-core CPU, where checking all
    262,144 logits costs 1.7 ms): broken weights make every logit NaN, and MLX's argmax picks a
    NaN, so greedy decoding flags any NaN; a NaN the sampler did not choose did not decide the token."""

    def flagged(logits: mx.array, *args) -> mx.array:
        ids = sample(logits, *args)
        chosen = mx.take_along_axis(logits, ids.astype(mx.int32).reshape(-1, 1), axis=-1).reshape(ids.shape)
        return mx.where(mx.isfinite(chosen), ids, mx.array(NON_FINITE, dtype=ids.dtype))

    return flagged


def _feedable(tok: mx.array) -> mx.array:
    """`tok` with the `NON_FINITE` flag as id 0: the step queued before a token is read must not
    look up an id outside the embedding (the loop raises when it reads the flag)."""
    return mx.where(tok == mx.array(NON_FINITE).astype(tok.dtype), 0, tok)


def _checked(tokens: Iterator[int]) -> Iterator[int]:
    for n, tok in enumerate(tokens, 1):
        if tok == NON_FINITE or tok == -1:  # -1: the flag in a signed id dtype
            raise NonFiniteLogitsError(
                f"the model's logits turned NaN or infinite at generated token {n}: its weights "
                "likely hold NaN/inf values; find them with gemma_mlx.load(path, check_finite=True) "
                "(CLI: --check-finite), or compare a conversion with its source (gemma-mlx convert --check)"
            )
        yield tok


def generate_tokens(
    model: Model,
    ids: mx.array,
    cache: list[Cache],
    sample: Sample,
    *,
    drafter: Drafter | None = None,
    draft_block_size: int = 4,
    draft_control: DraftControl | None = None,
    stats: GenerationStats | None = None,
    media: dict | None = None,
    prefill_step_size: int = 512,
    progress: Progress | None = None,
) -> Iterator[int]:
    """Yield sampled token ids forever, given prompt `ids [L]` (L >= 1) not yet in `cache`: all
    but the last are prefilled, then decoding starts from the last. With a `drafter`, decoding is
    speculative (`stats` counts drafted/accepted tokens), with rounds of at most `draft_block_size`
    tokens whose size `draft_control` chooses (default: a `DraftControl` timing the rounds, which
    falls back to plain steps when drafting does not pay). A token chosen from a NaN or infinite
    logit raises `NonFiniteLogitsError` (checked with each token, without another host sync)."""
    if drafter is not None:
        check_block_size(draft_block_size, cache)
        if draft_control is not None and draft_control.max_drafts != draft_block_size - 1:
            raise ValueError(
                f"draft_control drafts up to {draft_control.max_drafts} tokens, "
                f"draft_block_size={draft_block_size} needs {draft_block_size - 1}"
            )
    if ids.shape[0] > 1:
        prefill(model, ids[:-1], cache, media=media, step=prefill_step_size, progress=progress)
    last, sample = ids[-1:], _flag_non_finite(sample)
    if drafter is None:
        tokens = _decode(model, last, cache, sample)
    else:
        control = draft_control or DraftControl(draft_block_size - 1)
        tokens = _speculate(model, drafter, last, cache, sample, control, stats)
    try:
        yield from _checked(tokens)
    finally:
        tokens.close()


def _decode(model: Model, last: mx.array, cache: list[Cache], sample: Sample) -> Iterator[int]:
    """Plain decoding. The next step is queued with `mx.async_eval` before the current token is
    handed out, so the caller's host work overlaps the device computing the next token."""

    def step(tok: mx.array) -> mx.array:
        return sample(model(_feedable(tok).reshape(1, -1), cache, logits_to_keep=1)[:, -1])

    y = step(last)
    mx.async_eval(y)
    while True:
        nxt = step(y)
        mx.async_eval(nxt)
        yield y.item()
        y = nxt


def check_block_size(block_size: int, cache: list[Cache]) -> None:
    slack = min((c.slack for c in cache if isinstance(c, RingKVCache)), default=block_size)
    if not 2 <= block_size <= 1 + slack:
        raise ValueError(f"draft block size {block_size}: must be 2 .. 1 + the caches' rollback slack")


def _speculate(
    model: Model,
    drafter: Drafter,
    last: mx.array,
    cache: list[Cache],
    sample: Sample,
    control: DraftControl,
    stats: GenerationStats | None,
) -> Iterator[int]:
    """MTP speculative rounds. Each round the drafter proposes `k` tokens (`control` chooses k;
    0 is a plain step) after the last token `t0` from the target's hidden state and K/V; the target
    verifies `[t0, drafts]` in one pass and samples its own token at every position; drafts are
    accepted while they equal the target's tokens, then the target's token follows. Rejected
    positions are trimmed from the caches (the rings keep rollback slack). Every emitted token is
    the target's own choice, drawn for its own position (`number`), so the output equals plain
    decoding's (greedy, or sampled with the same seed)."""
    stats = stats if stats is not None else GenerationStats()
    out = model.forward(last[None], cache)
    t0, hidden, number = sample(out.logits[:, -1], 0), out.hidden[:, -1:], 0
    done: tuple[int, int] | None = None  # the previous round's (drafts, accepted)
    tic = control.clock()
    while True:
        # a round is timed from one choice to the next, the caller's work on its tokens included,
        # so plain rounds (whose next step runs while the caller works) and drafting rounds compare
        # by the throughput the caller sees
        now = control.clock()
        if done is not None:
            control.update(*done, now - tic)
        tic, k = now, control.choose()
        if k == 0:  # a plain step, queued before `t0` is handed out, as in `_decode`
            out = model.forward(_feedable(t0).reshape(1, 1), cache)
            nxt = sample(out.logits[0], number + 1)
            mx.async_eval(nxt, out.hidden)
            yield t0.item()
            t0, hidden, number, done = nxt, out.hidden, number + 1, (0, 0)
            continue
        first = t0.item()
        yield first
        block = mx.concatenate([t0.reshape(1, 1), drafter.draft(model, cache, first, hidden, k)], axis=1)
        out = model.forward(block, cache)
        targets = sample(out.logits[0], number + 1)
        mx.eval(block, targets)
        proposed, chosen = block[0, 1:].tolist(), targets.tolist()
        n = 0
        while n < k and proposed[n] == chosen[n]:
            n += 1
        number += n + 1
        stats.drafted += k
        stats.accepted += n
        yield from proposed[:n]
        for c in cache:
            c.trim(k - n)
        t0, hidden, done = targets[n : n + 1], out.hidden[:, n : n + 1], (k, n)


class TextStream:
    """Detokenized text cut at the earliest stop string: `add` returns the new text that is safe to
    show, holding back a suffix that may still grow into a stop string. `markup` follows `text`
    character for character, with every "<" that plain tokens wrote as `PLAIN_LT`, so that only
    the special tokens sampled spell markup there; `markup_delta` is the part `add` returned."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | str = ()):
        if isinstance(stop, str):  # one stop string, as OpenAI's `stop`, not its characters
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={list(stop)!r}: stop strings must be non-empty strings")
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.specials = {i: tokenizer.id_to_token(i) or "" for i in tokenizer.special_ids}
        self.stop = tuple(stop)
        self.longest = max(map(len, self.stop), default=0)
        self.text, self.shown, self.stopped = "", 0, False
        self.markup, self.markup_delta = "", ""

    def _marked(self, piece: str, token: int | None) -> str:
        """`piece` (what `token` completed) with plain "<"s replaced; a special token's own text,
        which the detokenizer returns last, is kept."""
        special = self.specials.get(token, "") if token is not None else ""
        if special and piece.endswith(special):
            return piece[: -len(special)].replace("<", PLAIN_LT) + special
        return piece.replace("<", PLAIN_LT)

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that may still grow into a stop string."""
        text = self.text
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
            default=0,
        )

    def add(self, token: int | None, final: bool = False) -> str:
        """Add a token (None: only finish) -> the text to show now. After a stop string nothing more
        is shown and `stopped` is set."""
        before = len(self.text)
        if token is not None:
            piece = self.detokenizer.add_token(token)
            self.text += piece
            self.markup += self._marked(piece, token)
        if final:
            piece = self.detokenizer.finalize()
            self.text += piece
            self.markup += self._marked(piece, None)
        if self.stop:
            # a stop string that appears now ends in the new text: search only where it can start
            start = max(0, before - self.longest + 1)
            cut = min((i for s in self.stop if (i := self.text.find(s, start)) >= 0), default=-1)
            if cut >= 0:
                self.text, self.markup, self.stopped, final = self.text[:cut], self.markup[:cut], True, True
        safe = len(self.text) if final else len(self.text) - self._held_back()
        delta, self.markup_delta = self.text[self.shown : safe], self.markup[self.shown : safe]
        self.shown = max(self.shown, safe)
        return delta


def suppressed_ids(model: Model, processor: Processor) -> list[int]:
    """Ids never to sample: the processor's, and on the unified model the media markers and
    soft-token placeholders."""
    c, vocab = model.config, model.config.text.vocab_size
    ids = list(processor.suppress_token_ids)
    if c.multimodal:
        ids += [c.eoi_token_id, c.eoa_token_id, c.image_token_id, c.audio_token_id, c.video_token_id]
    return sorted({i for i in ids if i < vocab})


def _check_ids(ids: Sequence[int], vocab: int) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary (0 .. {vocab - 1})")


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
    stop: Sequence[str] | str = (),
    cache: list[Cache] | None = None,
    prefill_step_size: int = 512,
    images: Sequence = (),
    audio: Sequence = (),
    enable_thinking: bool = False,
    max_soft_tokens: int = 280,
    prefill_progress: Progress | None = None,
    drafter: Drafter | None = None,
    draft_block_size: int = 4,
    draft_control: DraftControl | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    tools: Sequence[dict] | None = None,
) -> Iterator[GenerationChunk]:
    """Stream a completion of `prompt` (text, token ids, or chat messages, whose parts may hold
    images and audio; a text prompt takes `images`/`audio` for its placeholders).

    Stops at `max_tokens` (0: nothing is generated), on the processor's EOS ids, or when a `stop`
    string appears (one string or a list of them; the stop string itself is not emitted). Logits
    that turn NaN or infinite (broken weights) end it with a `NonFiniteLogitsError`. A `cache`
    already holding earlier tokens is continued: only `prompt`'s tokens are prefilled (a new cache
    is quantized with `kv_bits`, see `make_cache`). With a `drafter` (see `load_drafter`),
    decoding is speculative with blocks of at most `draft_block_size` tokens (greedy output is
    unchanged); pass the same `draft_control` to successive calls to keep what
    it has measured (a chat session and the server do). `tools` (OpenAI function schemas) are
    declared to a chat prompt; the streamed text keeps the model's markup
    (`gemma_mlx.tools.OutputParser` splits it). Arguments are checked before any work; errors are
    ValueErrors naming them.
    """
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    text = TextStream(processor.tokenizer, stop)
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: must be an integer >= 0")
    if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size={prefill_step_size!r}: must be an integer >= 1")
    processor.check_media_input(model.config, len(images) > 0, len(audio) > 0)  # before any decoding
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
            tools=tools,
            token_budget=room,
        )
    ids = inputs.ids
    if not ids:
        raise ValueError("prompt is empty")
    processor.check_media_input(
        model.config, inputs.pixel_values is not None, inputs.input_features is not None
    )
    _check_ids(ids, model.config.text.vocab_size)
    cache = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size) if cache is None else cache
    context = model.config.text.max_position_embeddings
    used = cache[0].offset
    if used + len(ids) >= context:
        raise ValueError(
            f"prompt has {len(ids)} tokens (+{used} already cached); the model's context is {context} tokens"
        )
    max_tokens = min(max_tokens, context - used - len(ids))
    if max_tokens == 0:
        return
    eos = set(processor.eos_token_ids)
    stats = GenerationStats(prompt_tokens=len(ids), cached_prompt_tokens=used)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    tokens = generate_tokens(
        model,
        mx.array(ids, dtype=mx.int32),
        cache,
        sampling.token_sampler(suppressed_ids(model, processor)),
        drafter=drafter,
        draft_block_size=draft_block_size,
        draft_control=draft_control,
        stats=stats,
        media=inputs.model_kwargs(),
        prefill_step_size=prefill_step_size,
        progress=prefill_progress,
    )
    try:
        for n, tok in enumerate(tokens, 1):
            now = time.perf_counter()
            if n == 1:  # the first token comes with the prefill
                stats.prompt_tps, tic = len(ids) / (now - tic), now
            stats.generation_tokens = n
            stats.generation_tps = (n - 1) / (now - tic) if n > 1 else 0.0
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            finish = "stop" if tok in eos else ("length" if n >= max_tokens else None)
            delta = text.add(None if tok in eos else tok, final=finish is not None)
            if text.stopped:
                finish = "stop"
            yield GenerationChunk(tok, delta, replace(stats), finish, text.markup_delta)
            if finish:
                break
    finally:
        tokens.close()


def generate(model: Model, processor: Processor, prompt: Prompt, **kwargs) -> GenerationResult:
    """Generate a completion; takes the keyword arguments of `stream_generate`."""
    result = GenerationResult()
    for chunk in stream_generate(model, processor, prompt, **kwargs):
        result.text += chunk.text
        result.markup += chunk.markup
        result.tokens.append(chunk.token)
        result.stats, result.finish_reason = chunk.stats, chunk.finish_reason
    if kwargs.get("tools"):
        parsed = parse_output(result.markup, tool_names(kwargs["tools"]))
        result.content, result.reasoning, result.tool_calls = (
            parsed.content,
            parsed.reasoning,
            parsed.tool_calls,
        )
        if parsed.tool_calls:
            result.finish_reason = "tool_calls"
    return result
