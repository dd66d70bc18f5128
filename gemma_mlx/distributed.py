"""Pipeline-parallel generation over MLX's own distributed engine (`mx.distributed`, `mlx.launch`).

The decoder layers are split into contiguous stages. Ranks 1 .. n-1 hold the first layers in
rank order; rank 0 holds the last stage together with everything that sits at the ends of the
network: the (tied) embedding, the image/audio embedders, the final norm, the LM head, and so the
MTP drafter's inputs (the K/V of the last sliding and last full layer). A forward goes

    rank 0 (embed) -> rank 1 -> ... -> rank n-1 -> rank 0 (last stage, logits, sampling)

so sampling, stop strings, chat, the drafter and the server run on rank 0 unchanged: its
`PipelineModel` is a `Model` whose early layers live on other ranks. Its cache list holds, for a
remote layer, a `RemoteKV` / `RemoteRing`: a data-less twin of the follower's cache that keeps the
same bookkeeping (offset, rollback room), so `trim`, `max_trim` and the speculative rollback work
on rank 0 as they do locally; the follower applies the trims with the next forward (each forward
header carries every layer's offset). `state` (the prompt cache's snapshots) becomes a snapshot
kept on the follower under an id, taken before its cache changes again and released when rank 0
drops the snapshot.

On the wire (`send`/`recv` between ring neighbours): a fixed-size int32 header per operation,
then, for a forward, the image block ids (when there are images) and the hidden state `[B, L,
dim]` in the model's dtype, rank to rank. Followers `follow` until rank 0 sends STOP (at `close`
or interpreter exit); a rank that dies closes its sockets, the ring backend then fails the
others' pending transfers, and they exit with a `PipelineError`; a peer that hangs is caught by a
watchdog (`timeout`).
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import re
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import Cache, KVBits, KVCache, RingKVCache
from .checkpoint import load_weights, resolve_dtype
from .config import ModelConfig, load_config
from .models.gemma import DecoderLayer, Model, float_dtype, last_of_type, run_layers
from .safetensors_file import CheckpointError, read_header, shard_files

Group = mx.distributed.Group

# operations; header = [op, a, b, c, d, e, then one offset per layer]
FORWARD, NEW_CACHES, DROP_CACHES, SNAPSHOT, RESTORE, DROP_SNAPSHOT, STOP = range(7)
HEAD = 6
DTYPES = [mx.float32, mx.bfloat16, mx.float16]
LAYER = re.compile(r"language_model\.layers\.(\d+)\.(.*)")


class PipelineError(RuntimeError):
    """The pipeline cannot go on: a rank exited or stopped answering, or the group is unusable."""


# ---------------------------------------------------------------- the stage split


def layer_bytes(path: Path, config: ModelConfig) -> tuple[list[int], int]:
    """Bytes of each decoder layer on disk, and of everything else (embeddings, norms): from the
    shard headers, without reading any weight."""
    sizes = {}
    for f in shard_files(path):
        sizes.update({k: v.nbytes for k, v in read_header(f).items()})
    per_layer, rest = [0] * config.text.num_hidden_layers, 0
    for name, size in Model.sanitize(sizes).items():
        m = LAYER.fullmatch(name)
        if m and int(m[1]) < len(per_layer):
            per_layer[int(m[1])] += size
        else:
            rest += size
    return per_layer, rest


def split_layers(
    config: ModelConfig,
    size: int,
    layers_per_rank: Sequence[int] | None = None,
    sizes: tuple[list[int], int] | None = None,
) -> list[range]:
    """The layers of each rank (index = rank): ranks 1 .. size-1 take the first layers in rank
    order, rank 0 the last ones. `layers_per_rank[r]` layers on rank r; else balanced by bytes
    (`sizes`: `layer_bytes`, rank 0 also holding the embeddings), else by count. Rank 0's stage
    always reaches back to the last sliding and last full layer (the drafter reads their K/V)."""
    n = config.text.num_hidden_layers
    first = min(last_of_type(config.text).values())  # rank 0 holds layers first .. n-1 at least
    if size < 2:
        raise ValueError(f"a pipeline needs at least 2 ranks, the group has {size}")
    if size - 1 > first:
        raise ValueError(
            f"{size} ranks for {n} layers: ranks 1 .. {size - 1} need a layer before layer {first}"
        )
    if layers_per_rank is not None:
        counts = list(layers_per_rank)
        if len(counts) != size or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != n:
            raise ValueError(
                f"layers_per_rank={counts}: expected {size} counts >= 1 (one per rank, rank 0 "
                f"holding the last layers) adding up to the {n} layers"
            )
        if counts[0] < n - first:
            raise ValueError(
                f"layers_per_rank={counts}: rank 0 holds the last {counts[0]} layers; it needs at least "
                f"{n - first} (from layer {first}, the last of its type: the MTP drafter reads its K/V)"
            )
    else:
        per_layer, rest = sizes if sizes is not None else ([1] * n, 0)
        target = (sum(per_layer) + rest) / size
        i = first  # rank 0's first layer: moved down while rank 0 stays under its share
        held = rest + sum(per_layer[i:])
        while i > size - 1 and held + per_layer[i - 1] / 2 <= target:
            i -= 1
            held += per_layer[i]
        counts = [n - i] + [0] * (size - 1)
        edges = np.cumsum(per_layer[:i])  # layers 0 .. i-1 over ranks 1 .. size-1, by bytes
        start = 0
        for r in range(1, size):
            end = i if r == size - 1 else int(np.searchsorted(edges, edges[-1] * r / (size - 1))) + 1
            end = min(max(end, start + 1), i - (size - 1 - r))
            counts[r], start = end - start, end
    stages, start = [range(0)] * size, 0
    for r in [*range(1, size), 0]:
        stages[r] = range(start, start + counts[r])
        start += counts[r]
    return stages


def stage_names(indices: range, prefix: str) -> Callable[[str], str | None]:
    """On-disk (sanitized) name -> this stage's name for it: layer `g` becomes `prefix{g - start}`,
    other layers are dropped (None)."""

    def rename(name: str) -> str | None:
        m = LAYER.fullmatch(name)
        if m is None:
            return name
        g = int(m[1])
        return f"{prefix}{g - indices.start}.{m[2]}" if g in indices else None

    return rename


class Stage(nn.Module):
    """A follower's part of the model: its decoder layers, nothing else; `follow` serves rank 0."""

    def __init__(self, config: ModelConfig, indices: range, link: Link):
        super().__init__()
        self.config, self.indices, self._link = config, indices, link
        self.layers = [DecoderLayer(config.text, config.text.layers[i]) for i in indices]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        rename = stage_names(self.indices, "layers.")
        out = {}
        for k, v in Model.sanitize(weights).items():
            name = rename(k)
            if name is not None and name.startswith("layers."):
                out[name] = v
        return out

    def follow(self) -> None:
        follow(self, self._link)

    def make_cache(self, slack: int, kv_bits: KVBits, quantize_rings: bool) -> list[Cache]:
        w = self.config.text.sliding_window
        specs = [self.config.text.layers[i] for i in self.indices]
        return [
            RingKVCache(w, slack, kv_bits if quantize_rings else None) if s.sliding else KVCache(kv_bits)
            for s in specs
        ]


# ---------------------------------------------------------------- talking to peers


class Watchdog:
    """Ends the process with a message when a guarded wait for a peer lasts longer than `timeout`
    seconds: a peer that hangs (or a machine that vanished without closing its sockets) would
    otherwise block a recv forever. None: no limit."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self._deadline: float | None = None
        self._what = ""
        self._cond = threading.Condition()
        if timeout is not None:
            threading.Thread(target=self._watch, name="gemma-mlx-watchdog", daemon=True).start()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                sys.stderr.write(f"gemma-mlx distributed: {self._what} (no answer in {self.timeout:g} s)\n")
                sys.stderr.flush()
                os._exit(3)  # a blocked MLX transfer cannot be interrupted from Python

    @contextmanager
    def guard(self, what: str):
        if self.timeout is None:
            yield
            return
        with self._cond:
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None


@contextmanager
def uninterrupted():
    """Hold a Ctrl-C back until the block ends: an exchange cut between its header and its data
    would leave the followers expecting data that never comes (the chat REPL stops an answer with
    Ctrl-C and goes on). Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class Link:
    """Sends and receives of one rank in the ring, with errors that say which peer was lost."""

    def __init__(self, group: Group, header_size: int, timeout: float | None):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.header_size = header_size
        self.watchdog = Watchdog(timeout)
        self.bytes_sent = 0
        # profiling: when a list, ("recv", end) and ("send", start, end) of every hidden state
        # `[B, L, dim]`, a send starting once its layers are evaluated (a follower's compute is
        # recv end .. send start)
        self.events: list[tuple] | None = None

    def _run(self, arrays: list[mx.array], what: str, guard: bool) -> None:
        try:
            if guard:
                with self.watchdog.guard(f"rank {self.rank}: {what}"):
                    mx.eval(arrays)
            else:
                mx.eval(arrays)
        except RuntimeError as e:
            raise PipelineError(
                f"rank {self.rank}: {what} failed ({e}): a rank exited or crashed, see its output"
            ) from None

    def send(self, x: mx.array, dst: int) -> None:
        self.bytes_sent += x.nbytes
        timed = self.events is not None and x.ndim == 3
        if timed:
            mx.eval(x)
            start = time.time()
        self._run([mx.distributed.send(x, dst, group=self.group)], f"sending to rank {dst}", True)
        if timed:
            self.events.append(("send", start, time.time()))

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int, guard: bool = True) -> mx.array:
        x = mx.distributed.recv(shape, dtype, src, group=self.group)
        self._run([x], f"waiting for rank {src}", guard)
        if self.events is not None and len(shape) == 3:
            self.events.append(("recv", time.time()))
        return x

    def send_header(self, values: Sequence[int], dst: int) -> None:
        h = np.zeros(self.header_size, np.int32)
        h[: len(values)] = values
        self.send(mx.array(h), dst)

    def recv_header(self, src: int) -> np.ndarray:
        # waiting for the next command is no fault (an idle server): no watchdog here
        return np.array(self.recv((self.header_size,), mx.int32, src, guard=False))


def init_group(timeout: float | None = 120.0) -> Group:
    """`mx.distributed.init(strict=True)` (the group `mlx.launch` set up), with a limit: the ring
    backend waits forever for a peer that never starts or cannot be reached, holding the GIL, so
    a forked watcher ends this process after `timeout` seconds with a message naming the
    hostfile. RuntimeError (from MLX) without a group."""
    if timeout is None:
        return mx.distributed.init(strict=True)
    what = (
        f"rank {os.environ.get('MLX_RANK', '?')}: the group could not be formed (hostfile "
        f"{os.environ.get('MLX_HOSTFILE') or 'none'}): is the command running on every host, and "
        f"can the hosts reach each other's addresses? (no answer in {timeout:g} s)"
    )
    done, alive = os.pipe()
    watcher = os.fork()
    if watcher == 0:  # wait for the parent to close its end; only os calls here
        os.close(alive)
        if not select.select([done], [], [], timeout)[0]:
            os.write(2, f"gemma-mlx distributed: {what}\n".encode())
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)
    os.close(done)
    try:
        return mx.distributed.init(strict=True)
    finally:
        os.close(alive)
        os.waitpid(watcher, 0)


def fingerprint(path: Path, extra: str) -> mx.array:
    """16 bytes (as int32 [4]) that differ when config.json, a shard header, the sampled data (the
    first and last 64 KiB of each shard) or `extra` differ: cheap, whatever the checkpoint's size."""
    h = hashlib.blake2b(digest_size=16)
    h.update((path / "config.json").read_bytes())
    for f in shard_files(path):
        with open(f, "rb") as fh:  # the header, and the first and last 64 KiB of the data
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + fh.read(n) + fh.read(1 << 16))
            fh.seek(max(fh.tell(), f.stat().st_size - (1 << 16)))
            h.update(fh.read())
    h.update(extra.encode())
    return mx.array(np.frombuffer(h.digest(), np.int32))


def check_agreement(group: Group, path: Path, extra: str) -> None:
    """All ranks must load the same checkpoint with the same settings: their fingerprints are
    gathered and compared; a mismatch is a CheckpointError on every rank."""
    mine = fingerprint(path, extra)
    try:
        everyone = mx.distributed.all_gather(mine[None], group=group)
        mx.eval(everyone)
    except RuntimeError as e:
        raise PipelineError(
            f"rank {group.rank()}: the ranks could not compare checkpoints ({e}): another rank "
            "failed before it got there, see its output"
        ) from None
    prints = np.array(everyone).reshape(group.size(), -1)
    differ = [r for r in range(group.size()) if not np.array_equal(prints[r], prints[0])]
    if differ:
        raise CheckpointError(
            f"rank {group.rank()}: ranks {differ} do not load the checkpoint rank 0 loads "
            f"(config.json, safetensors headers, dtype or layer split differ; this rank has {path})"
        )


# ---------------------------------------------------------------- rank 0


class _Remote:
    """Rank 0's twin of a follower's cache: the same offset bookkeeping without the data."""

    pipeline: PipelineModel
    set_id: int
    layer: int
    bytes_per_token: int
    offset: int
    peak: int  # furthest offset since made or restored (for `nbytes`)

    def update_and_fetch(self, keys, values):
        raise RuntimeError(f"layer {self.layer} runs on another rank")

    def key_positions(self, n):
        raise RuntimeError(f"layer {self.layer} runs on another rank")

    def shared_view(self, position):
        raise RuntimeError(f"layer {self.layer} runs on another rank: the drafter reads only rank 0's")

    def advance(self, n: int) -> None:
        self.offset += n
        self.peak = max(self.peak, self.offset)
        if isinstance(self, RingKVCache):
            self.written = max(self.written, self.offset)

    @property
    def nbytes(self) -> int:
        """An estimate from the geometry (the follower's cache is not asked)."""
        if not self.peak:
            return 0
        slots = (
            self.capacity if isinstance(self, RingKVCache) else -(-self.peak // KVCache.step) * KVCache.step
        )
        return slots * self.bytes_per_token

    @property
    def state(self):
        return self.pipeline.snapshot(self)

    @state.setter
    def state(self, s) -> None:
        self.pipeline.restore(self, s)


class RemoteKV(_Remote, KVCache):
    pass


class RemoteRing(_Remote, RingKVCache):
    pass


class RemoteState:
    """A snapshot of a follower's layer cache (of cache set `set_id`), kept there under `snap_id`
    while this object lives; taken when rank 0 next talks to the followers."""

    def __init__(self, set_id: int, layer: int, snap_id: int, offset: int):
        self.set_id, self.layer, self.snap_id, self.offset = set_id, layer, snap_id, offset


class PipelineModel(Model):
    """Rank 0's model: the embeddings, media embedders, the last stage, the norm and the head
    here; the earlier layers on ranks 1 .. n-1, driven through `Link`."""

    def __init__(self, config: ModelConfig, stages: list[range], link: Link):
        super().__init__(config)
        self.stages, self.link, self.indices = stages, link, stages[0]
        self.language_model.layers = [self.language_model.layers[i] for i in self.indices]
        self._ids = itertools.count(1)
        self._pending: list[weakref.ref] = []  # snapshots taken on rank 0, not yet made remotely
        self._dropped: list[tuple[int, int]] = []  # (op, id) to tell the followers
        self.closed = False
        self.dtype = mx.float32

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        rename = stage_names(self.indices, "language_model.layers.")
        return {n: v for k, v in Model.sanitize(weights).items() if (n := rename(k)) is not None}

    @property
    def remote_layers(self) -> range:
        return range(0, self.indices.start)

    # -- messages ---------------------------------------------------------------------------

    def _command(self, *values: int, offsets: Sequence[int] = ()) -> None:
        if self.closed:
            raise PipelineError("the pipeline was closed")
        self._flush()
        self.link.send_header([*values, *[0] * (HEAD - len(values)), *offsets], self.link.next)

    def _flush(self) -> None:
        """Tell the followers about snapshots taken and released since the last command, before
        their caches change again."""
        pending, self._pending = self._pending, []
        for ref in pending:
            s = ref()
            if s is not None:
                self._send(SNAPSHOT, s.set_id, s.layer, s.snap_id, s.offset)
        dropped, self._dropped = self._dropped, []
        for op, i in dropped:
            self._send(op, i)

    def _send(self, *values: int) -> None:
        self.link.send_header([*values, *[0] * (HEAD - len(values))], self.link.next)

    # -- caches -----------------------------------------------------------------------------

    def make_cache(
        self, slack: int = 128, kv_bits: KVBits = None, quantize_rings: bool = True
    ) -> list[Cache]:
        caches = super().make_cache(slack, kv_bits, quantize_rings)
        set_id = next(self._ids)
        bits, group = kv_bits or (0, 0)
        self._command(NEW_CACHES, set_id, slack, bits, group, int(quantize_rings))
        token = object.__new__(_SetToken)
        weakref.finalize(token, self._dropped.append, (DROP_CACHES, set_id))
        itemsize = self.dtype.size
        for i in self.remote_layers:
            spec, local = self.config.text.layers[i], caches[i]
            # the twin takes over the local cache's bookkeeping (window, slack, offset, written)
            remote = object.__new__(RemoteRing if spec.sliding else RemoteKV)
            remote.__dict__.update(local.__dict__, peak=0)
            d = spec.head_dim
            per_row = (
                d * itemsize
                if local.quant is None
                else d * local.quant[0] // 8 + 2 * d // local.quant[1] * itemsize
            )
            remote.pipeline, remote.set_id, remote.layer = self, set_id, i
            remote.bytes_per_token, remote.token = 2 * spec.num_kv_heads * per_row, token
            caches[i] = remote
        return caches

    def snapshot(self, c: _Remote) -> RemoteState:
        s = RemoteState(c.set_id, c.layer, next(self._ids), c.offset)
        self._pending.append(weakref.ref(s))
        weakref.finalize(s, self._dropped.append, (DROP_SNAPSHOT, s.snap_id))
        return s

    def restore(self, c: _Remote, s: RemoteState | None) -> None:
        if s is not None and not isinstance(s, RemoteState):
            raise TypeError(f"layer {c.layer} is on another rank: its state must come from a remote cache")
        if s is not None and s.layer != c.layer:
            raise ValueError(f"a snapshot of layer {s.layer} cannot be restored into layer {c.layer}")
        self._command(RESTORE, c.set_id, c.layer, -1 if s is None else s.snap_id)
        c.offset = 0 if s is None else s.offset
        c.peak = c.offset
        if isinstance(c, RingKVCache):
            c.written = c.offset

    # -- forward ----------------------------------------------------------------------------

    def run_decoder(
        self, h: mx.array, cache: list[Cache] | None, block_ids: mx.array | None
    ) -> tuple[mx.array, dict[str, tuple[mx.array, mx.array]]]:
        """As `Model.run_decoder`; the early layers run on the other ranks. `cache` must come
        from this model's `make_cache` (the followers keep the matching caches)."""
        if cache is None:
            cache = self.make_cache()
        remote = [cache[i] for i in self.remote_layers]
        if not all(isinstance(c, _Remote) and c.pipeline is self for c in remote):
            raise ValueError("the cache was not made by this pipeline's make_cache")
        offsets = [c.offset for c in remote]
        with uninterrupted():
            h = self._exchange(h, block_ids, remote, offsets)
        layers, local = self.language_model.layers, cache[self.indices.start :]
        h, shared = run_layers(layers, self.indices, self.config.text, h, local, block_ids)
        return self.language_model.norm(h), shared

    def _exchange(
        self, h: mx.array, block_ids: mx.array | None, remote: list, offsets: list[int]
    ) -> mx.array:
        """Send `h [B, L, dim]` through the followers' layers and receive it back."""
        self._send_forward(h, block_ids, remote, offsets)
        return self.link.recv(h.shape, h.dtype, self.link.prev)

    def _send_forward(
        self, h: mx.array, block_ids: mx.array | None, remote: list, offsets: list[int]
    ) -> None:
        B, L, _ = h.shape
        self._command(
            FORWARD,
            remote[0].set_id,
            B,
            L,
            int(block_ids is not None),
            DTYPES.index(h.dtype),
            offsets=offsets,
        )
        if block_ids is not None:
            self.link.send(block_ids.astype(mx.int32), self.link.next)
        self.link.send(h, self.link.next)
        for c in remote:
            c.advance(L)

    def prefill_chunks(self, chunks: list[dict], cache: list[Cache], done: Callable[[int], None]) -> None:
        """`Model.prefill_chunks` with the stages overlapped: chunk i+1 goes to rank 1 as soon as
        chunk i's hidden state is back, before this rank runs its own layers on chunk i, so the
        followers work on the next chunk meanwhile. Ctrl-C waits for the end of the prefill (a
        chunk is always in flight until then)."""
        remote = [cache[i] for i in self.remote_layers]
        if not all(isinstance(c, _Remote) and c.pipeline is self for c in remote):
            raise ValueError("the cache was not made by this pipeline's make_cache")
        layers, local = self.language_model.layers, cache[self.indices.start :]

        def send(chunk: dict) -> tuple[mx.array, mx.array | None]:
            h = chunk.get("inputs_embeds")
            if h is None:
                h = self.language_model.embed(chunk["input_ids"])
            blocks = chunk.get("block_ids")
            self._send_forward(h, blocks, remote, [c.offset for c in remote])
            return h, blocks

        if not chunks:
            return
        with uninterrupted():
            h, blocks = send(chunks[0])
            for i in range(len(chunks)):
                back = self.link.recv(h.shape, h.dtype, self.link.prev)
                following = send(chunks[i + 1]) if i + 1 < len(chunks) else None
                try:
                    run_layers(layers, self.indices, self.config.text, back, local, blocks)
                    mx.eval([c.state for c in local])
                    done(i)
                except BaseException:  # keep the ring in step: take the answer to the chunk in flight
                    if following is not None:
                        self.link.recv(following[0].shape, following[0].dtype, self.link.prev)
                    raise
                if following is not None:
                    h, blocks = following

    def close(self) -> None:
        """Let the followers finish (their `load` returns). Also run at interpreter exit."""
        if not self.closed:
            try:
                self._send(STOP)
            except PipelineError:
                pass
            self.closed = True


class _SetToken:
    """Kept by every remote cache of one set: when the last goes, the followers drop the set."""


# ---------------------------------------------------------------- followers


def follow(stage: Stage, link: Link) -> None:
    """`Stage.follow`: serve rank 0's commands until STOP: forward chunks through this stage with its caches,
    apply rank 0's trims (the offsets in each forward header), keep and restore snapshots."""
    sets: dict[int, list[Cache]] = {}
    snapshots: dict[int, tuple] = {}
    first = stage.indices.start
    last_rank = link.next == 0
    while True:
        header = link.recv_header(link.prev)
        if not last_rank:
            link.send_header(header.tolist(), link.next)
        op, a, b, c, d, e = (int(x) for x in header[:HEAD])
        if op == STOP:
            return
        if op == NEW_CACHES:
            sets[a] = stage.make_cache(b, (c, d) if c else None, bool(e))
        elif op == DROP_CACHES:
            sets.pop(a, None)
        elif op == SNAPSHOT:  # a = set, b = layer, c = snapshot id, d = the layer's offset
            cache = sets[a][b - first]
            cache.trim(cache.offset - d)  # rank 0's trims since the last forward
            snapshots[c] = cache.state
            mx.eval(snapshots[c])
        elif op == DROP_SNAPSHOT:
            snapshots.pop(a, None)
        elif op == RESTORE:  # a = set, b = layer, c = snapshot id or -1
            cache = sets[a][b - first]
            cache.state = None if c < 0 else snapshots[c]
        elif op == FORWARD:  # a = set, b, c = B, L, d = has block ids, e = dtype
            caches = sets[a]
            for cache, offset in zip(caches, header[HEAD + first : HEAD + stage.indices.stop], strict=True):
                cache.trim(cache.offset - int(offset))
            blocks = link.recv((b, c), mx.int32, link.prev) if d else None
            if d and not last_rank:
                link.send(blocks, link.next)
            h = link.recv((b, c, stage.config.text.hidden_size), DTYPES[e], link.prev)
            h, _ = run_layers(stage.layers, stage.indices, stage.config.text, h, caches, blocks)
            link.send(h.astype(DTYPES[e]), link.next)
            mx.eval([(x.keys, x.values) for x in caches])
        else:
            raise PipelineError(f"rank {link.rank}: unknown command {op} from rank {link.prev}")


# ---------------------------------------------------------------- loading


def load_stage(
    path: str | Path,
    group: Group,
    dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
    check_finite: bool = False,
    layers_per_rank: Sequence[int] | None = None,
    timeout: float | None = 600.0,
) -> PipelineModel | Stage:
    """Load this rank's stage of the checkpoint at `path` (every rank reads the same directory,
    only its own tensors, after the ranks checked they agree on it): rank 0's `PipelineModel`, or
    a follower's `Stage` (call `follow`). `timeout`: seconds a rank waits for a peer in the middle
    of an operation before it gives up (None: forever)."""
    path = Path(path)
    rank, size = group.rank(), group.size()
    config = load_config(path)
    stages = split_layers(config, size, layers_per_rank, layer_bytes(path, config))
    check_agreement(group, path, f"dtype={dtype} stages={[(s.start, s.stop) for s in stages]}")
    link = Link(group, HEAD + config.text.num_hidden_layers, timeout)
    cast = resolve_dtype(dtype, config.quantization)
    module = PipelineModel(config, stages, link) if rank == 0 else Stage(config, stages[rank], link)
    load_weights(module, path, config.quantization, cast, check_finite)
    if not lazy:
        mx.eval(module.parameters())
    module.eval()
    if rank == 0:
        module.dtype = float_dtype(module.language_model.embed_tokens) or mx.float32
        atexit.register(module.close)
    return module


def load_pipeline(path: str | Path, group: Group, *args, **kwargs) -> PipelineModel | None:
    """`load_stage`, then on a follower serve rank 0 until it closes (-> None)."""
    module = load_stage(path, group, *args, **kwargs)
    if isinstance(module, Stage):
        module.follow()
        return None
    return module
