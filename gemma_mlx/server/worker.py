"""The generation worker: one thread owns the model and runs the requests as rows of a `Batch`.

MLX must not be driven from several threads at once. Up to `max_concurrency` requests decode
together (each step reads the weights once for all of them); a new one is prefilled a chunk per
step in between, resuming from its prefix-cache snapshot. The others wait in a bounded queue
(beyond it the server answers 429). Events go back to each request's asyncio queue; a request
whose client went away is cancelled and leaves the batch before the next step, leaving the
prefix cache consistent: snapshots are only taken of caches that hold exactly a known token
sequence.
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
from ..generate import (
    Batch,
    GenerationResult,
    NonFiniteLogitsError,
    Request,
    Row,
    make_cache,
    prepare_request,
)
from ..processor import Inputs
from ..prompt_cache import PromptCache, PromptKey
from .metrics import Metrics


class QueueFull(Exception):
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


def serving_concurrency(model: Any, kv_bits: int | None, kv_group_size: int, asked: int | None = None) -> int:
    """`max_concurrency`: `asked`, or by default `footprint.default_concurrency` of the memory
    available now (the model loaded); 1 for a pipeline over several ranks (its caches live on the
    other ranks and are not batched)."""
    from ..distributed import PipelineModel
    from ..footprint import default_concurrency, memory_bytes
    from ..models.gemma import float_dtype

    if isinstance(model, PipelineModel):
        if asked not in (None, 1):
            raise ValueError(f"max_concurrency={asked}: a pipeline over ranks decodes one request at a time")
        return 1
    if asked is not None:
        return asked
    dtype = float_dtype(model.language_model.embed_tokens) or mx.bfloat16
    _, available = memory_bytes()
    return default_concurrency(
        model.config.text, available, kv_bits=kv_bits, kv_group_size=kv_group_size, dtype_bytes=dtype.size
    )


@dataclass
class _Slot:
    """A job in the batch: its request (row and output), what it generated, its thought budget."""

    job: Job
    request: Request
    result: GenerationResult
    budget: int | None  # thinking budget left to enforce (None: none)
    thought: int | None = None  # tokens written in the open thought channel
    last: float = 0.0  # when its previous token came (its submission, before the first)


class Worker:
    """Runs jobs on one thread, up to `max_concurrency` at once in one `Batch`, with a prefix
    cache of `cache_bytes`; at most `max_queue` wait."""

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
        max_concurrency: int = 1,
        prefill_step_size: int = 512,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency}: must be >= 1")
        self.model, self.processor = model, processor
        self.batch = Batch(
            model, drafter=drafter, draft_block_size=draft_block_size, prefill_step_size=prefill_step_size
        )
        self.kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.prompt_cache = PromptCache(cache_bytes)
        self.metrics = Metrics()  # the figures of /metrics and /health
        self.max_queue, self.max_concurrency = max_queue, max_concurrency
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted and not yet started
        self._thread: threading.Thread | None = None
        self._active: dict[Row, _Slot] = {}
        self._closing = threading.Event()
        self.last: GenerationResult | None = None  # of the last job that ended (finished or cancelled)
        tok = getattr(processor, "tokenizer", None)
        ids = [tok.token_to_id(t) if tok is not None else None for t in ("<|channel>", "<channel|>")]
        self._channel = tuple(ids) if None not in ids else None  # Gemma 4's thought channel markup

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemma-mlx-generation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._closing.set()
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    @property
    def draft_control(self) -> DraftControl | None:
        """The draft controller of every request: what it measured carries over between them."""
        return self.batch.control

    @draft_control.setter
    def draft_control(self, control: DraftControl) -> None:
        self.batch.control = control

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def idle(self) -> bool:
        return self._jobs.unfinished_tasks == 0

    def close(self) -> None:
        """Shutting down: cancel the running jobs and every queued one (each ends with finish
        reason "cancelled" before the next step), and refuse new ones. Safe from a signal handler."""
        self._closing.set()
        for slot in list(self._active.values()):
            slot.job.cancel()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue or self._closing.is_set():
                raise QueueFull
            self._waiting += 1
            self.metrics.set_waiting(self._waiting)
        self._jobs.put(job)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._admit():
            for slot in [s for s in self._active.values() if s.job.cancelled.is_set()]:
                slot.result.finish_reason = "cancelled"
                self._end(slot)
            if not self._active:
                continue
            try:
                results = self.batch.step()
            except Exception as e:  # the step itself failed: every row in it fails, the worker goes on
                for slot in list(self._active.values()):
                    self._end(slot, e)
                continue
            if self.batch.rows:
                self.metrics.batch_step(len(self.batch.rows))
            for row, tokens in results:
                slot = self._active.get(row)
                if slot is None:
                    continue
                if row.error is not None:
                    self._end(slot, row.error)
                else:
                    self._take(slot, tokens)
        for slot in list(self._active.values()):  # stopped: what still runs is cancelled
            slot.result.finish_reason = "cancelled"
            self._end(slot)

    def _admit(self) -> bool:
        """Start queued jobs while there is room (waiting for one when nothing runs); False: stop."""
        while len(self._active) < self.max_concurrency:
            try:
                job = self._jobs.get(block=not self._active)
            except queue.Empty:
                break
            if job is None:
                return False
            with self._lock:
                self._waiting -= 1
                self.metrics.set_waiting(self._waiting)
            self._start(job)
        self.metrics.set_running(len(self._active))
        return True

    def _start(self, job: Job) -> None:
        if self._closing.is_set():
            job.cancel()
        if job.cancelled.is_set():  # its client left, or the server is shutting down
            self.last = GenerationResult(finish_reason="cancelled")
            self.metrics.request_finished(0, "cancelled")
            job.emit(Event(done=True, result=self.last))
            self._jobs.task_done()
            return
        try:
            request = self._prepare(job)
        except Exception as e:  # reported to the client as a 500; the worker keeps serving
            self.metrics.request_finished(0, "error")
            job.emit(Event(error=e))
            self._jobs.task_done()
            return
        stats = request.row.stats
        self.metrics.request_started(stats.prompt_tokens, stats.cached_prompt_tokens)
        budget = job.thinking_budget if self._channel is not None else None
        slot = _Slot(job, request, GenerationResult(stats=stats), budget, last=job.submitted)
        request.output.start()
        self.batch.add(request.row)
        self._active[request.row] = slot

    def _prepare(self, job: Job) -> Request:
        """The job's request, resuming from the longest cached prefix of its prompt; its prefill
        stops (and the cache is snapshot) before the first new media block too, so a request with
        the same text and another image (or an edit after it) resumes there."""
        ids, key = job.inputs.ids, job.key
        cache = make_cache(self.model, **self.kv)
        reused = self.prompt_cache.fetch(key, cache, len(ids) - 1)
        end = len(ids) - 1  # the last prompt token starts decoding
        stops = [s for s, _, _, _ in key.blocks if reused < s < end][:1] + [end]

        def snapshot(done: int, total: int) -> None:
            held = reused + done
            if held in stops and all(c.offset == held for c in cache):
                self.prompt_cache.store(key.tokens[:held], cache, key.partition)

        request = prepare_request(
            self.model,
            self.processor,
            key.rest_of(job.inputs, reused),
            cache=cache,
            context_ids=ids[:reused],
            prefill_progress=snapshot,
            prefill_stops=[s - reused for s in stops],
            **job.sampling,
        )
        if request is None:
            raise ValueError("max_tokens leaves nothing to generate")
        return request

    def _take(self, slot: _Slot, tokens: list[int]) -> None:
        """Hand a row's new tokens to its client; end it when it is done."""
        job, row = slot.job, slot.request.row
        for i, token in enumerate(tokens):
            try:
                chunk = slot.request.output.add(token)
            except NonFiniteLogitsError as e:
                self._end(slot, e)
                return
            now = time.perf_counter()
            (self.metrics.token if slot.result.tokens else self.metrics.first_token)(now - slot.last)
            slot.last = now
            slot.result.add(chunk)
            job.emit(Event(text=chunk.text, markup=chunk.markup))
            if chunk.finish_reason:
                self._end(slot)
                return
            if slot.budget is not None and self._thought_over(slot, token):
                # the thinking budget is spent: close the channel and let the model answer
                if i < len(tokens) - 1:  # a speculative round went past it
                    row.rewind(len(tokens) - 1 - i)
                row.force, slot.budget = self._channel[1], None
                return

    def _thought_over(self, slot: _Slot, token: int) -> bool:
        if token == self._channel[0]:
            slot.thought = 0
        elif token == self._channel[1]:
            slot.thought = None
        elif slot.thought is not None:
            slot.thought += 1
        return slot.thought is not None and slot.thought >= slot.budget

    def _end(self, slot: _Slot, error: BaseException | None = None) -> None:
        """Take a job out of the batch (its row's slot is free at once) and tell its client."""
        row, result = slot.request.row, slot.result
        decoded = row in self.batch.rows
        self.batch.remove(row)
        del self._active[row]
        self.metrics.set_running(len(self._active))
        if error is not None:
            self.metrics.request_finished(0, "error")
            slot.job.emit(Event(error=error))
        else:
            if decoded:
                self._store_answer(slot.job.key, result.tokens, row.cache)
            self.last = result
            self.metrics.request_finished(result.stats.generation_tokens, result.finish_reason or "stop")
            slot.job.emit(Event(done=True, result=result))
        self._jobs.task_done()

    def _store_answer(self, key: PromptKey, answer: list[int], cache: list) -> None:
        """Snapshot the cache after an answer, for a next request that continues it."""
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            return
        held = np.concatenate([key.tokens, np.asarray(answer, np.int64)])
        extra = offsets.pop() - len(held)  # speculative decoding may hold drafts past a stop
        if extra > 0:
            if extra > min(c.max_trim for c in cache):
                return
            for c in cache:
                c.trim(extra)
            extra = 0
        self.prompt_cache.store(held[: len(held) + extra], cache, key.partition)
