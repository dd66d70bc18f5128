"""The generation worker: one thread owns the model and runs queued requests one at a time.

MLX must not be driven from several threads at once, and one request at a time keeps outputs
from interleaving. Requests wait in a bounded queue (beyond it the server answers 429). Events
go back to each request's asyncio queue; a request whose client went away is cancelled and
stops at the next token (or prefill chunk), leaving the prefix cache consistent: snapshots are
only taken of caches that hold exactly a known token sequence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..draft_control import DraftControl
from ..generate import GenerationResult, make_cache, prefill, stream_generate
from ..processor import Inputs
from ..prompt_cache import PromptCache, PromptKey
from .metrics import Metrics


class QueueFull(Exception):
    pass


class _Cancelled(Exception):
    pass


@dataclass
class Event:
    text: str = ""
    markup: str = ""  # the text as the output parser reads it (GenerationChunk.markup)
    done: bool = False
    result: GenerationResult | None = None  # with the last event: tokens, stats, finish reason
    error: BaseException | None = None


@dataclass
class Job:
    inputs: Inputs
    key: PromptKey
    sampling: dict  # stream_generate's keyword arguments (max_tokens, temperature, stop, ...)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    thinking_budget: int | None = None  # tokens the thought channel may take before it is closed
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)  # the start of its time to first token

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[Event]:
        """The job's events up to and including the last one (done or error)."""
        while True:
            event = await self.events.get()
            yield event
            if event.done or event.error is not None:
                return


class Worker:
    """Runs jobs on one thread, with a prefix cache of `cache_bytes`; at most `max_queue` wait."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        drafter: Any = None,
        draft_block_size: int = 4,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        cache_bytes: int = 4 << 30,
        max_queue: int = 32,
        prefill_step_size: int = 512,
    ) -> None:
        self.model, self.processor, self.drafter = model, processor, drafter
        self.draft_block_size, self.prefill_step_size = draft_block_size, prefill_step_size
        # one draft controller for all requests: what it measured carries over between them
        self.draft_control = DraftControl(draft_block_size - 1) if drafter is not None else None
        self.kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.prompt_cache = PromptCache(cache_bytes)
        self.metrics = Metrics()  # the figures of /metrics and /health; `# metrics` marks each report
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted and not yet started
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._closing = threading.Event()
        self.last: GenerationResult | None = None  # of the last job run (finished or cancelled)
        tok = getattr(processor, "tokenizer", None)
        ids = [tok.token_to_id(t) if tok is not None else None for t in ("<|channel>", "<channel|>")]
        self._channel = tuple(ids) if None not in ids else None  # Gemma 4's thought channel markup

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemma-mlx-generation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def idle(self) -> bool:
        return self._jobs.unfinished_tasks == 0

    def close(self) -> None:
        """Shutting down: cancel the running job and every queued one (each ends with finish
        reason "cancelled" at its next token), and refuse new ones. Safe from a signal handler."""
        self._closing.set()
        job = self._current
        if job is not None:
            job.cancel()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue or self._closing.is_set():
                raise QueueFull
            self._waiting += 1
            self.metrics.set_waiting(self._waiting)  # metrics
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self.metrics.set_waiting(self._waiting)  # metrics
            try:
                self._serve(job)
            finally:
                self._current = None
                self.metrics.set_running(0)  # metrics
                self._jobs.task_done()

    def _serve(self, job: Job) -> None:
        self._current = job
        self.metrics.set_running(1)  # metrics
        if self._closing.is_set():
            job.cancel()
        if job.cancelled.is_set():  # its client left, or the server is shutting down
            self.metrics.request_finished(0, "cancelled")  # metrics
            job.emit(Event(done=True, result=GenerationResult(finish_reason="cancelled")))
            return
        try:
            self.last = result = self._run(job)
            self.metrics.request_finished(result.stats.generation_tokens, result.finish_reason)  # metrics
            job.emit(Event(done=True, result=self.last))
        except _Cancelled:
            self.last = GenerationResult(finish_reason="cancelled")
            self.metrics.request_finished(0, "cancelled")  # metrics
            job.emit(Event(done=True, result=self.last))
        except Exception as e:  # reported to the client as a 500; the worker keeps serving
            self.metrics.request_finished(0, "error")  # metrics
            job.emit(Event(error=e))

    def _run(self, job: Job) -> GenerationResult:
        model, ids = self.model, job.inputs.ids
        cache = make_cache(model, **self.kv)
        reused = self.prompt_cache.fetch(job.key, cache, len(ids) - 1)
        result = GenerationResult()
        stats = result.stats
        stats.prompt_tokens, stats.cached_prompt_tokens = len(ids) - reused, reused
        self.metrics.request_started(stats.prompt_tokens, stats.cached_prompt_tokens)  # metrics

        def check(done: int = 0, total: int = 0) -> None:
            if job.cancelled.is_set():
                raise _Cancelled

        tic = time.perf_counter()
        end = len(ids) - 1  # the last prompt token starts decoding
        # stop before the first new media block too: a request with the same text and another
        # image (or an edit after it) resumes there
        stops = [s for s, _, _, _ in job.key.blocks if reused < s < end][:1] + [end]
        done = reused
        for stop in stops:
            media = job.key.media_after(job.inputs, done) if stop == end else {}
            chunk = mx.array(ids[done:stop], dtype=mx.int32)
            prefill(model, chunk, cache, media=media or None, step=self.prefill_step_size, progress=check)
            done = stop
            if all(c.offset == stop for c in cache):
                self.prompt_cache.store(job.key.tokens[:stop], cache, job.key.partition)
        stats.prompt_tps = (len(ids) - reused) / max(time.perf_counter() - tic, 1e-9)

        tokens = result.tokens
        sampling, feed = dict(job.sampling), ids[-1:]
        budget = job.thinking_budget if self._channel is not None else None
        thought = None  # tokens written in the open thought channel
        last = job.submitted  # metrics: when the previous token came (the submission, for the first)
        try:
            while True:
                chunks = stream_generate(
                    model,
                    self.processor,
                    Inputs(feed),
                    cache=cache,
                    drafter=self.drafter,
                    draft_block_size=self.draft_block_size,
                    draft_control=self.draft_control,
                    **sampling,
                )
                over = False
                try:
                    for chunk in chunks:
                        now = time.perf_counter()  # metrics
                        (self.metrics.token if tokens else self.metrics.first_token)(now - last)  # metrics
                        last = now  # metrics
                        self.metrics.batch_step(1)  # metrics: one row per decode step here
                        tokens.append(chunk.token)
                        stats.generation_tokens = len(tokens)
                        stats.generation_tps = chunk.stats.generation_tps
                        stats.drafted, stats.accepted = chunk.stats.drafted, chunk.stats.accepted
                        result.finish_reason = chunk.finish_reason
                        if chunk.logprob is not None:
                            result.logprobs.append(chunk.logprob)
                        job.emit(Event(text=chunk.text, markup=chunk.markup))
                        if job.cancelled.is_set() and chunk.finish_reason is None:
                            result.finish_reason = "cancelled"
                            break
                        if budget is not None:
                            if chunk.token == self._channel[0]:
                                thought = 0
                            elif chunk.token == self._channel[1]:
                                thought = None
                            elif thought is not None:
                                thought += 1
                            over = thought is not None and thought >= budget and not chunk.finish_reason
                            if over:
                                break
                finally:
                    chunks.close()
                if not over:
                    break
                # the thinking budget is spent: close the channel and let the model answer
                feed, budget = self._close_thought(ids, tokens, cache), None
                closing = self.processor.tokenizer.decode([feed[-1]])  # a special token: markup as written
                job.emit(Event(text=closing, markup=closing))
                sampling["max_tokens"] = job.sampling["max_tokens"] - len(tokens)
                if sampling["max_tokens"] <= 0:
                    result.finish_reason = "length"
                    break
        finally:
            self._store_answer(job.key.tokens, tokens, cache, job.key.partition)
        return result

    def _close_thought(self, ids: list[int], tokens: list[int], cache: list) -> list[int]:
        """The thinking budget is spent: the tokens to feed next so that the channel closes (the
        last generated token when the cache does not hold it yet, then <channel|>)."""
        held = len(ids) + len(tokens) - 1  # the last generated token is fed with the next step
        offset = min(c.offset for c in cache)
        for c in cache:  # speculative decoding may hold drafts past the last token
            if c.offset > held + 1:
                c.trim(c.offset - held - 1)
        close = self._channel[1]
        tokens.append(close)
        return [close] if offset > held else [tokens[-2], close]

    def _store_answer(self, prompt: np.ndarray, answer: list[int], cache: list, partition: str) -> None:
        """Snapshot the cache after an answer, for a next request that continues it."""
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            return
        held = np.concatenate([prompt, np.asarray(answer, np.int64)])
        extra = offsets.pop() - len(held)  # speculative decoding may hold drafts past a stop
        if extra > 0:
            if extra > min(c.max_trim for c in cache):
                return
            for c in cache:
                c.trim(extra)
            extra = 0
        self.prompt_cache.store(held[: len(held) + extra], cache, partition)
