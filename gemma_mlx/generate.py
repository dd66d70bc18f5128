"""Generation: requests as rows of a `Batch` (prefill in chunks, then pipelined decode steps of all
rows together, or MTP speculative rounds for a row alone), streamed as text.

`Batch` is the one core (a single request is a batch of one); `prepare_request` checks a
request and builds its row (prompt, caches, sampler, constraint) and its `Output` (detokenizer
with stop strings, finish reasons, clocks); `stream_generate`, `generate`, `batch_generate`,
`generate_tokens` and the server drive it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import BatchCache, Cache, RingKVCache, merge_caches, split_caches
from .constrain import Constraint, make_constraint
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
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its logits, before
    penalties, bias, masks and filters) and the `top` most likely alternatives as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
    logprob: TokenLogprob | None = None  # with `logprobs`


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
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.markup += chunk.markup
        self.tokens.append(chunk.token)
        self.stats, self.finish_reason = chunk.stats, chunk.finish_reason
        if chunk.logprob is not None:
            self.logprobs.append(chunk.logprob)

    def parse(self, tools: Sequence[dict]) -> None:
        """Split the markup into content, reasoning and calls of the declared `tools`."""
        parsed = parse_output(self.markup, tool_names(tools))
        self.content, self.reasoning, self.tool_calls = parsed.content, parsed.reasoning, parsed.tool_calls
        if parsed.tool_calls:
            self.finish_reason = "tool_calls"

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


def prefill_plan(
    model: Model, ids: mx.array, *, media: dict | None = None, step: int = 512, stops: Sequence[int] = ()
) -> list[tuple[dict, int]]:
    """`prefill`'s chunks of `ids [L]`: (`Model.forward` keyword arguments, end position) each.
    With `media` the embeddings are computed once and chunked too; a chunk is extended to the end
    of an image block it would cut, since an image attends bidirectionally within its block. A
    chunk ends at each of `stops` (positions where the caller wants to see the cache)."""
    n = ids.shape[0]
    embeds = blocks = None
    if media:
        embeds, blocks = model.embed_inputs(ids[None], **media)
    in_block = np.zeros(n + 1, bool)  # position i continues the image block of position i - 1
    if blocks is not None:
        b = np.array(blocks[0])
        in_block[1:n] = (b[1:] >= 0) & (b[1:] == b[:-1])
    chunks, start = [], 0
    while start < n:
        end = min([start + step, n, *(s for s in stops if s > start)])
        while in_block[end]:
            end += 1
        if embeds is None:
            chunks.append(({"input_ids": ids[None, start:end]}, end))
        else:
            chunk_blocks = None if blocks is None else blocks[:, start:end]
            chunks.append(({"inputs_embeds": embeds[:, start:end], "block_ids": chunk_blocks}, end))
        start = end
    return chunks


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
    each; see `prefill_plan`). The caches are evaluated, so the work is done when this returns."""
    chunks = prefill_plan(model, ids, media=media, step=step)

    def done(i: int) -> None:
        if progress is not None:
            progress(chunks[i][1], ids.shape[0])

    model.prefill_chunks([c for c, _ in chunks], cache, done)


NON_FINITE = 0xFFFFFFFF  # the id a step yields when its token's logit was not finite (no real id is)


class NonFiniteLogitsError(RuntimeError):
    """The model's logits turned NaN or infinite: broken weights or an overflow, not a prompt issue."""


def _flag_non_finite(sample: Sample) -> Sample:
    """`sample` whose id is `NON_FINITE` where the logit of the chosen token is NaN or infinite:
    read with the id the loop reads anyway, so no extra host sync. Checking the chosen logit costs
    one gather (with `_feedable`, +33 us per step measured on this 2-core CPU, where checking all
    262,144 logits costs 1.7 ms): broken weights make every logit NaN, and MLX's argmax picks a
    NaN, so greedy decoding flags any NaN; a NaN the sampler did not choose did not decide the token."""

    def flagged(logits: mx.array, *args, **kwargs) -> mx.array:
        ids = sample(logits, *args, **kwargs)
        chosen = mx.take_along_axis(logits, ids.astype(mx.int32).reshape(-1, 1), axis=-1).reshape(ids.shape)
        return mx.where(mx.isfinite(chosen), ids, mx.array(NON_FINITE, dtype=ids.dtype))

    return flagged


def _feedable(tok: mx.array) -> mx.array:
    """`tok` with the `NON_FINITE` flag as id 0: the step queued before a token is read must not
    look up an id outside the embedding (the loop raises when it reads the flag)."""
    return mx.where(tok == mx.array(NON_FINITE).astype(tok.dtype), 0, tok)


def _check_finite(token: int, n: int) -> None:
    if token == NON_FINITE or token == -1:  # -1: the flag in a signed id dtype
        raise NonFiniteLogitsError(
            f"the model's logits turned NaN or infinite at generated token {n}: its weights "
            "likely hold NaN/inf values; find them with gemma_mlx.load(path, check_finite=True) "
            "(CLI: --check-finite), or compare a conversion with its source (gemma-mlx convert --check)"
        )


class Row:
    """One sequence of a `Batch`: the prompt it has yet to prefill, its own caches (a batch of
    several rows holds them merged while they decode together), its sampler and constraint, and
    what it feeds next. `force` set by the caller makes that token the row's next one instead of a
    sampled one (the server closes a thought channel whose budget is spent this way)."""

    def __init__(
        self,
        ids: mx.array | Sequence[int],
        cache: list[Cache],
        sample: Sample,
        *,
        media: dict | None = None,
        constraint: Constraint | None = None,
        stats: GenerationStats | None = None,
        progress: Progress | None = None,
        stops: Sequence[int] = (),
        draft: bool = True,
    ) -> None:
        ids = ids if isinstance(ids, mx.array) else mx.array(list(ids), dtype=mx.int32)
        if ids.size == 0:
            raise ValueError("prompt is empty")
        self.prompt, self.media, self.stops, self.progress = ids[:-1], media, stops, progress
        self.chunks: list[tuple[dict, int]] | None = None  # the prefill plan, once it started
        self.prefilled = 0  # prompt tokens in the cache
        self.cache = cache
        self.sample, self.constraint = _flag_non_finite(sample), constraint
        self.stats = stats if stats is not None else GenerationStats()
        self.draft = draft  # may decode speculatively when alone (and its constraint is steady)
        self.token: mx.array | None = ids[-1:]  # the next token to feed, when it is already chosen
        self.fresh = True  # `token` is the prompt's last: fed, but not a generated token
        self.logits: mx.array | None = None  # of the last fed token: the next token is drawn from them
        self.hidden: mx.array | None = None  # ... and its hidden state (what the drafter starts from)
        self.number = 0  # tokens generated so far, so the next one's number (its PRNG key)
        self.force: int | None = None
        self.error: BaseException | None = None  # why its prefill failed (the batch dropped it)

    def rewind(self, n: int) -> None:
        """Forget the last `n` generated tokens of a row that decodes alone (the caller discards
        them: the tail of a speculative round); a `force`d token must follow."""
        for c in self.cache:
            c.trim(n)
        self.number -= n + (self.token is not None)  # a token chosen after them goes too
        self.token = self.logits = self.hidden = None


class Batch:
    """The generation core: rows decode together, one token each per step, and join or leave
    between steps. Joining rows are prefilled within one chunk's worth of tokens per step while
    others decode (whole when none do); a row alone with a `drafter` decodes in speculative
    rounds whose size `draft_control` chooses (default: a `DraftControl` timing the rounds, which
    falls back to plain steps when drafting does not pay). A single request is a batch of one.

    Each step queues the next forward pass before the host reads the tokens it hands out, so the
    caller's work on them (and the constraints' masks for the next tokens) overlaps the device."""

    def __init__(
        self,
        model: Model,
        *,
        drafter: Drafter | None = None,
        draft_block_size: int = 4,
        draft_control: DraftControl | None = None,
        prefill_step_size: int = 512,
    ) -> None:
        if not isinstance(prefill_step_size, int) or prefill_step_size < 1:
            raise ValueError(f"prefill_step_size={prefill_step_size!r}: must be an integer >= 1")
        if (
            drafter is not None
            and draft_control is not None
            and draft_control.max_drafts != draft_block_size - 1
        ):
            raise ValueError(
                f"draft_control drafts up to {draft_control.max_drafts} tokens, "
                f"draft_block_size={draft_block_size} needs {draft_block_size - 1}"
            )
        self.model, self.drafter, self.block_size = model, drafter, draft_block_size
        self.control = draft_control or (DraftControl(draft_block_size - 1) if drafter is not None else None)
        self.prefill_step_size = prefill_step_size
        self.rows: list[Row] = []  # decoding
        self.joining: list[Row] = []  # prefilling, first come first served
        self._merged: list[BatchCache] | None = None  # the decoding rows' caches, while several decode
        self._merged_rows: list[Row] = []
        # the last speculative round: its start, drafts and accepted drafts
        self._round: tuple[float, int, int] | None = None

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def add(self, row: Row) -> None:
        if self.drafter is not None and row.draft:
            check_block_size(self.block_size, row.cache)
        self.joining.append(row)

    def remove(self, row: Row) -> None:
        """Take `row` out now (finished or cancelled); its own caches hold what it fed."""
        if row in self.joining:
            self.joining.remove(row)
        elif row in self.rows:
            if row in self._merged_rows:
                self._unmerge()
            self.rows.remove(row)

    def step(self) -> list[tuple[Row, list[int]]]:
        """Prefill joining rows, first come first served, up to `prefill_step_size` tokens (one
        chunk; with no row decoding, every joining row whole: nobody waits on them), then one
        decode step (or speculative round) of the decoding rows -> (row, the tokens it generated)
        for each row that did something; a row whose prefill failed is dropped and returned with
        `error` set."""
        out = []
        budget = self.prefill_step_size if self.rows else math.inf
        for row in list(self.joining):
            if budget <= 0:
                break
            try:
                done, used = self._prefill(row, budget)
            except Exception as e:  # noqa: BLE001 - the row's own failure (bad media, a callback), not the batch's
                self.joining.remove(row)
                row.error = e
                out.append((row, []))
                continue
            budget -= used
            if done:
                self.joining.remove(row)
                self.rows.append(row)
        if not self.rows:
            return out
        row = self.rows[0]
        if len(self.rows) == 1 and self.drafter is not None and row.draft and row.hidden is not None:
            if row.constraint is None or row.constraint.steady:
                return out + self._speculate(row)
        self._round = None
        return out + self._step()

    def _prefill(self, row: Row, budget: float) -> tuple[bool, int]:
        """Run `row`'s next prompt chunks while `budget` tokens last (at least one chunk) ->
        (whether its prompt is all in, tokens run)."""
        if row.chunks is None:
            row.chunks = prefill_plan(
                self.model, row.prompt, media=row.media, step=self.prefill_step_size, stops=row.stops
            )
        start = end = row.prefilled
        todo = []
        for chunk in row.chunks:
            if todo and chunk[1] - start > budget:
                break
            todo.append(chunk)
            end = chunk[1]

        def done(i: int) -> None:
            if row.progress is not None:
                row.progress(todo[i][1], row.prompt.shape[0])

        self.model.prefill_chunks([c for c, _ in todo], row.cache, done)
        del row.chunks[: len(todo)]
        row.prefilled = end
        return not row.chunks, end - start

    def _caches(self) -> list[Cache] | list[BatchCache]:
        if len(self.rows) == 1:
            self._unmerge()
            return self.rows[0].cache
        if self._merged_rows != self.rows:
            self._unmerge()
            self._merged, self._merged_rows = merge_caches([r.cache for r in self.rows]), list(self.rows)
            for r in self.rows:
                r.cache = []  # held by the merged caches until `_unmerge`
        return self._merged

    def _unmerge(self) -> None:
        if self._merged is not None:
            for row, cache in zip(self._merged_rows, split_caches(self._merged), strict=True):
                row.cache = cache
            self._merged, self._merged_rows = None, []

    def _next(self, row: Row) -> mx.array:
        """The token `row` feeds now: forced, already chosen, or drawn from its last logits."""
        if row.force is not None:
            y, row.force, row.token = mx.array([row.force], dtype=mx.uint32), None, None
            row.number += 1
        elif row.token is not None:
            y, row.token = row.token, None
        else:
            if row.constraint is None:
                y = row.sample(row.logits, row.number)
            else:
                y = row.sample(row.logits, row.number, mask=row.constraint.mask())
            row.number += 1
        return y

    def _step(self) -> list[tuple[Row, list[int]]]:
        rows = self.rows
        cache = self._caches()
        generated = [not r.fresh for r in rows]
        ys = [self._next(r) for r in rows]
        y = ys[0] if len(ys) == 1 else mx.concatenate([a.astype(mx.uint32) for a in ys])
        out = self.model.forward(_feedable(y).reshape(-1, 1), cache, logits_to_keep=1)
        logits = out.logits[:, -1]
        mx.async_eval(logits)
        tokens = y.tolist()
        result, one = [], len(rows) == 1
        for i, (row, new, token) in enumerate(zip(rows, generated, tokens, strict=True)):
            row.logits = logits if one else logits[i : i + 1]
            row.hidden = out.hidden if one else out.hidden[i : i + 1]
            row.fresh = False
            if new:
                if row.constraint is not None and token not in (NON_FINITE, -1):
                    row.constraint.advance(token)
                result.append((row, [token]))
        return result

    def _speculate(self, row: Row) -> list[tuple[Row, list[int]]]:
        """One MTP round for a row decoding alone. The drafter proposes `k` tokens (the controller
        chooses k; 0 is a plain step) after the next token `t0` from the target's hidden state and
        K/V; the target verifies `[t0, drafts]` in one pass and samples its own token at every
        position; drafts are accepted while they equal the target's tokens, and the target's
        token after them is the row's next. Rejected positions are trimmed from the caches (the
        rings keep rollback slack). Every token is the target's own choice, drawn for its own
        number, so the output equals plain decoding's (greedy, or sampled with the same seed).
        A round is timed from one choice to the next, the caller's work on its tokens included,
        so plain and drafting rounds compare by the throughput the caller sees."""
        control, now = self.control, self.control.clock()
        if self._round is not None:
            tic, drafts, accepted = self._round
            control.update(drafts, accepted, now - tic)
        k = control.choose()
        self._round = (now, 0, 0)
        if k == 0 or row.force is not None:
            return self._step()
        cache, mask = row.cache, None if row.constraint is None else row.constraint.mask()
        masked = {} if mask is None else {"mask": mask}  # the mask of every position of the round
        if row.token is None:
            t0, number = row.sample(row.logits, row.number, **masked), row.number
            row.number += 1
        else:
            t0, number, row.token = row.token, row.number - 1, None
        first = t0.item()
        if first in (NON_FINITE, -1):  # the caller raises when it reads the flag
            return [(row, [first])]
        block = mx.concatenate(
            [t0.reshape(1, 1), self.drafter.draft(self.model, cache, first, row.hidden, k)], axis=1
        )
        out = self.model.forward(block, cache)
        targets = row.sample(out.logits[0], number + 1, **masked)
        mx.eval(block, targets)
        proposed, chosen = block[0, 1:].tolist(), targets.tolist()
        n = 0
        while n < k and proposed[n] == chosen[n]:
            n += 1
        row.stats.drafted += k
        row.stats.accepted += n
        tokens, kept, changed = [first, *proposed[:n]], n + 1, False
        if row.constraint is not None:
            kept, changed = self._constrained(row, tokens)
        for c in cache:
            c.trim(k + 1 - kept)
        if not changed:  # the target's token after the accepted drafts is the row's next
            row.token, row.hidden, row.logits = targets[n : n + 1], out.hidden[:, n : n + 1], None
            row.number = number + n + 2
        else:  # the constraint's phase changed at token `kept - 1`: the next is drawn under its new mask
            row.token, row.hidden = None, out.hidden[:, kept - 1 : kept]
            row.logits, row.number = out.logits[:, kept - 1], number + kept
        self._round = (now, k, n)
        return [(row, tokens[:kept])]

    @staticmethod
    def _constrained(row: Row, tokens: list[int]) -> tuple[int, bool]:
        """Advance `row`'s constraint with a round's tokens, all drawn under one mask (free text or a
        thought) -> (how many to keep, whether its phase changed): up to the first token that
        changes the phase (a call or thought opens, a thought closes), after which the mask differs."""
        phase = row.constraint.phase
        for i, token in enumerate(tokens):
            row.constraint.advance(token)
            if row.constraint.phase != phase:
                return i + 1, True
        return len(tokens), False


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
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Yield sampled token ids forever, given prompt `ids [L]` (L >= 1) not yet in `cache`: all
    but the last are prefilled, then decoding starts from the last: a `Batch` of this one row.
    With a `drafter`, decoding is speculative (`stats` counts drafted/accepted tokens), with
    rounds of at most `draft_block_size` tokens (see `Batch`). A `constraint` masks every token
    (see `gemma_mlx.constrain`; drafting only where its mask is steady). A token chosen from a NaN or
    infinite logit raises `NonFiniteLogitsError` (checked with each token, without another host sync)."""
    batch = Batch(
        model,
        drafter=drafter,
        draft_block_size=draft_block_size,
        draft_control=draft_control,
        prefill_step_size=prefill_step_size,
    )
    row = Row(ids, cache, sample, media=media, constraint=constraint, stats=stats, progress=progress)
    batch.add(row)
    n = 0
    while True:
        for _, tokens in batch.step():
            if row.error is not None:
                raise row.error
            for token in tokens:
                n += 1
                _check_finite(token, n)
                yield token


def check_block_size(block_size: int, cache: list[Cache]) -> None:
    slack = min((c.slack for c in cache if isinstance(c, RingKVCache)), default=block_size)
    if not 2 <= block_size <= 1 + slack:
        raise ValueError(f"draft block size {block_size}: must be 2 .. 1 + the caches' rollback slack")


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


class Output:
    """The host side of one generation: its tokens in, `GenerationChunk`s out (text cut at stop
    strings, finish reasons, stats and logprobs)."""

    def __init__(
        self,
        text: TextStream,
        eos: set[int],
        max_tokens: int,
        stats: GenerationStats,
        logprobs: deque | None = None,
    ) -> None:
        self.text, self.eos, self.max_tokens, self.stats, self.logprobs = (
            text,
            eos,
            max_tokens,
            stats,
            logprobs,
        )
        self.n = 0
        self.tic = time.perf_counter()

    def start(self) -> None:
        """The clock of the prompt's speed starts now (its prefill is about to begin)."""
        self.tic = time.perf_counter()

    def add(self, token: int) -> GenerationChunk:
        """The chunk of the next generated token; its `finish_reason` says when it is the last."""
        self.n += 1
        n, stats, text = self.n, self.stats, self.text
        _check_finite(token, n)
        now = time.perf_counter()
        if n == 1:  # the first token comes with the prefill
            stats.prompt_tps, self.tic = stats.prompt_tokens / max(now - self.tic, 1e-9), now
        stats.generation_tokens = n
        stats.generation_tps = (n - 1) / (now - self.tic) if n > 1 else 0.0
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        finish = "stop" if token in self.eos else ("length" if n >= self.max_tokens else None)
        delta = text.add(None if token in self.eos else token, final=finish is not None)
        if text.stopped:
            finish = "stop"
        logprob = None
        if self.logprobs is not None:
            chosen, top_ids, top_lps = self.logprobs.popleft()
            top = list(zip(top_ids[0].tolist(), top_lps[0].tolist(), strict=True))
            logprob = TokenLogprob(token, chosen.item(), top)
        return GenerationChunk(token, delta, replace(stats), finish, text.markup_delta, logprob)


@dataclass
class Request:
    """A prepared generation: the `Batch` row and the `Output` that reads its tokens."""

    row: Row
    output: Output


def prepare_request(
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
    images: Sequence = (),
    audio: Sequence = (),
    videos: Sequence = (),
    enable_thinking: bool = False,
    max_soft_tokens: int = 280,
    video_soft_tokens: int = 70,
    video_frames: int | None = 32,
    video_fps: float | None = None,
    prefill_progress: Progress | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    tools: Sequence[dict] | None = None,
    tool_choice: str | dict | None = None,
    response_format: Any = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    logprobs: int | None = None,
    context_ids: Sequence[int] = (),
    prefill_stops: Sequence[int] = (),
) -> Request | None:
    """Check and prepare a completion of `prompt` for a `Batch` (None: `max_tokens` leaves
    nothing to generate); `stream_generate`, `generate` and `batch_generate` take these keyword
    arguments. `prompt` is text, token ids, or chat messages, whose parts may hold images, audio
    and videos; a text prompt takes `images`/`audio`/`videos` for its placeholders.
    Videos are sampled to `video_frames` frames (or `video_fps` per second of the clip, at most
    `video_frames`) of `video_soft_tokens` each (see `Processor.prepare`).

    Stops at `max_tokens` (0: nothing is generated), on the processor's EOS ids, or when a `stop`
    string appears (one string or a list of them; the stop string itself is not emitted). Logits
    that turn NaN or infinite (broken weights) end it with a `NonFiniteLogitsError`. A `cache`
    already holding earlier tokens is continued: only `prompt`'s tokens are prefilled (a new cache
    is quantized with `kv_bits`, see `make_cache`). `prefill_progress(done, total)` is called
    after each prefill chunk; a chunk ends at each of `prefill_stops`. `tools` (OpenAI function schemas) are
    declared to a chat prompt; the streamed text keeps the model's markup
    (`gemma_mlx.tools.OutputParser` splits it). Arguments are checked before any work; errors are
    ValueErrors naming them.

    `response_format` (OpenAI's `{"type": "json_object"}` / `{"type": "json_schema", ...}`, a JSON
    schema or a Pydantic model class) constrains the answer to valid JSON (after any thought);
    `tool_choice` ("auto", "required", a tool's name, "none") checks tool calls against `tools`
    with a grammar (see `gemma_mlx.constrain.make_constraint`). A cut-off answer ends with
    finish_reason "length" and may be incomplete JSON. Penalties and `logit_bias` as in
    `SamplingParams`; `logprobs` (0 or the number of alternatives) fills each chunk's `logprob`.
    The repetition penalty counts the prompt's tokens and `context_ids` (what a continued cache
    holds). Penalized or logprob requests decode without drafting, constrained ones only
    draft while their mask is steady (free text, a thought; see `Batch._speculate`)."""
    sampling = SamplingParams(
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        frequency_penalty,
        presence_penalty,
        repetition_penalty,
        logit_bias,
    )
    if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
        raise ValueError(f"logprobs={logprobs!r}: must be 0 .. 20 (alternatives per token) or None")
    constraint = make_constraint(
        processor,
        model.config.text.vocab_size,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        thinking=enable_thinking,
    )
    text = TextStream(processor.tokenizer, stop)
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: must be an integer >= 0")
    processor.check_media_input(model.config, len(images) > 0, len(audio) > 0)  # before any decoding
    if isinstance(prompt, Inputs):  # already prepared (e.g. by a chat session)
        inputs = prompt
    else:
        room = model.config.text.max_position_embeddings - (cache[0].offset if cache else 0)
        inputs = processor.prepare(
            prompt,
            images,
            audio,
            videos=videos,
            enable_thinking=enable_thinking,
            max_soft_tokens=max_soft_tokens,
            video_soft_tokens=video_soft_tokens,
            video_frames=video_frames,
            video_fps=video_fps,
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
        return None
    suppress = suppressed_ids(model, processor)
    if constraint is not None and constraint.grammarless:  # "never <|tool_call>": a suppressed id does it
        banned = [] if constraint.banned is None else [constraint.banned]
        suppress, constraint = sorted({*suppress, *banned}), None
    sample = sampling.token_sampler(suppress, [*context_ids, *ids], logprobs)
    stats = GenerationStats(prompt_tokens=len(ids), cached_prompt_tokens=used)
    row = Row(
        ids,
        cache,
        sample,
        media=inputs.model_kwargs(),
        constraint=constraint,
        stats=stats,
        progress=prefill_progress,
        stops=prefill_stops,
        # a verify pass samples several positions at once: penalties and logprobs need one
        draft=not sampling.penalized and logprobs is None,
    )
    logprob_queue = sample.logprobs if logprobs is not None else None
    output = Output(text, set(processor.eos_token_ids), max_tokens, stats, logprob_queue)
    return Request(row, output)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Prompt,
    *,
    drafter: Drafter | None = None,
    draft_block_size: int = 4,
    draft_control: DraftControl | None = None,
    prefill_step_size: int = 512,
    **kwargs: Any,
) -> Iterator[GenerationChunk]:
    """Stream a completion of `prompt`: `prepare_request`'s keyword arguments, decoded as a
    `Batch` of one. With a `drafter` (see `load_drafter`), decoding is speculative with blocks of
    at most `draft_block_size` tokens (greedy output is unchanged); pass the same `draft_control`
    to successive calls to keep what it has measured (a chat session and the server do)."""
    batch = Batch(
        model,
        drafter=drafter,
        draft_block_size=draft_block_size,
        draft_control=draft_control,
        prefill_step_size=prefill_step_size,
    )
    request = prepare_request(model, processor, prompt, **kwargs)
    if request is None:
        return
    mx.reset_peak_memory()
    request.output.start()
    batch.add(request.row)
    while True:
        for row, tokens in batch.step():
            if row.error is not None:
                raise row.error
            for token in tokens:
                chunk = request.output.add(token)
                yield chunk
                if chunk.finish_reason:
                    return


def batch_generate(
    model: Model,
    processor: Processor,
    prompts: Sequence[Prompt],
    *,
    images: Sequence[Sequence] | None = None,
    audio: Sequence[Sequence] | None = None,
    prefill_step_size: int = 512,
    **kwargs: Any,
) -> list[GenerationResult]:
    """Complete several prompts together (a `Batch`: each decode step reads the weights once for
    all rows): a `GenerationResult` per prompt, in order, each equal to what `generate` gives for
    it alone. Prompts may differ in length and kind; `images[i]` / `audio[i]` are prompt i's (for
    the placeholders of a text prompt; chat messages carry their own). The other keyword
    arguments are `prepare_request`'s, the same for every prompt (a `seed` seeds each prompt's
    sampling alike, as separate calls would)."""
    prompts = list(prompts)
    for name, per in (("images", images), ("audio", audio)):
        if per is not None and len(per) != len(prompts):
            raise ValueError(f"{name}: {len(per)} lists for {len(prompts)} prompts (one list per prompt)")
    batch = Batch(model, prefill_step_size=prefill_step_size)
    requests, results = {}, []
    for i, prompt in enumerate(prompts):
        media = {"images": images[i] if images else (), "audio": audio[i] if audio else ()}
        request = prepare_request(model, processor, prompt, **media, **kwargs)
        results.append(GenerationResult())
        if request is not None:
            request.output.start()
            batch.add(request.row)
            requests[request.row] = (request, results[-1])
    while len(batch):
        for row, tokens in batch.step():
            if row.error is not None:
                raise row.error
            request, result = requests[row]
            for token in tokens:
                chunk = request.output.add(token)
                result.add(chunk)
                if chunk.finish_reason:
                    batch.remove(row)
                    break
    if kwargs.get("tools"):
        for result in results:
            result.parse(kwargs["tools"])
    return results


def generate(model: Model, processor: Processor, prompt: Prompt, **kwargs: Any) -> GenerationResult:
    """Generate a completion; takes the keyword arguments of `stream_generate`."""
    result = GenerationResult()
    for chunk in stream_generate(model, processor, prompt, **kwargs):
        result.add(chunk)
    if kwargs.get("tools"):
        result.parse(kwargs["tools"])
    return result
