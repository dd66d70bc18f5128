"""KV caches: a growing cache for global layers and a sliding-window ring with rollback slack.

Both caches hand back, with the keys and values, the absolute position of every returned key
(`key_positions`), so the model builds exact masks (window, causality, image blocks) without
caring where in a ring a key lives. Key order does not matter to attention once masked.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import mlx.core as mx

Positions = mx.array  # int32 [K]; -1 marks an empty slot
Mask = mx.array | str | None  # what `mx.fast.scaled_dot_product_attention` takes


class QuantizedKV(NamedTuple):
    """Keys or values `[B, H, K, D]` stored quantized along D (`mx.quantize`); attention reads them
    with `mx.quantized_matmul`, never as a float copy."""

    packed: mx.array  # uint32 [B, H, K, D * bits / 32]
    scales: mx.array  # [B, H, K, D / group_size]
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:3], self.scales.shape[3] * self.group_size)


KV = mx.array | QuantizedKV
SharedView = tuple[KV, KV, mx.array | None]  # keys, values, mask
KVBits = tuple[int, int] | None  # (bits, group_size) of a quantized cache, None = float


def _encode(x: mx.array, quant: KVBits) -> KV:
    if quant is None:
        return x
    bits, group_size = quant
    return QuantizedKV(*mx.quantize(x, group_size=group_size, bits=bits), group_size, bits)


def _empty(like: KV, slots: int) -> KV:
    """Zeroed storage for `slots` tokens with the layout of `like`."""
    if isinstance(like, QuantizedKV):
        arrays = (mx.zeros((*a.shape[:2], slots, a.shape[3]), a.dtype) for a in like[:3])
        return QuantizedKV(*arrays, like.group_size, like.bits)
    return mx.zeros((*like.shape[:2], slots, like.shape[3]), like.dtype)


def _slots(x: KV, start: int | None, end: int | None) -> KV:
    if isinstance(x, QuantizedKV):
        return x._replace(**{f: getattr(x, f)[..., start:end, :] for f in ("packed", "scales", "biases")})
    return x[..., start:end, :]


def _store(x: KV, start: int, value: KV) -> None:
    """Write `value` into the slots from `start` of `x`, in place."""
    n = value.shape[2]
    if isinstance(x, QuantizedKV):
        for dst, src in zip(x[:3], value[:3], strict=True):
            dst[..., start : start + n, :] = src
    else:
        x[..., start : start + n, :] = value


def _concat(a: KV, b: KV) -> KV:
    if isinstance(a, QuantizedKV):
        return a._replace(
            **{
                f: mx.concatenate([getattr(a, f), getattr(b, f)], axis=2)
                for f in ("packed", "scales", "biases")
            }
        )
    return mx.concatenate([a, b], axis=2)


def _handle(x: KV) -> KV:
    """A new handle on the same data: in-place slot writes through one handle leave the other as
    it was, so a saved `state` stays a snapshot."""
    if isinstance(x, QuantizedKV):
        return x._replace(**{f: mx.array(getattr(x, f)) for f in ("packed", "scales", "biases")})
    return mx.array(x)


def _nbytes(x: KV | None) -> int:
    if x is None:
        return 0
    return sum(a.nbytes for a in x[:3]) if isinstance(x, QuantizedKV) else x.nbytes


class Cache(Protocol):
    """What a layer's KV cache offers the model, the generation loops and the drafter."""

    offset: int  # tokens fed so far

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]: ...
    def key_positions(self, n: int) -> Positions: ...
    def shared_view(self, position: int) -> SharedView: ...
    def trim(self, n: int) -> int: ...
    @property
    def max_trim(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def state(self) -> tuple | None: ...


class KVCache:
    """Growing cache for full-attention layers, preallocated in `step`-token blocks; `quant`
    (bits, group_size) stores keys and values quantized."""

    step = 256

    def __init__(self, quant: KVBits = None) -> None:
        self.quant = quant
        self.keys: KV | None = None
        self.values: KV | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]:
        """Append `[B, H, L, D]` keys/values; return all cached ones up to the new offset."""
        prev, n = self.offset, keys.shape[2]
        keys, values = _encode(keys, self.quant), _encode(values, self.quant)
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k, new_v = _empty(keys, grow), _empty(values, grow)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = _concat(_slots(self.keys, 0, prev), new_k)
                self.values = _concat(_slots(self.values, 0, prev), new_v)
        self.offset += n
        _store(self.keys, prev, keys)
        _store(self.values, prev, values)
        return _slots(self.keys, 0, self.offset), _slots(self.values, 0, self.offset)

    def key_positions(self, n: int) -> Positions:
        """Positions of the keys the next `update_and_fetch` of `n` tokens will return."""
        return mx.arange(self.offset + n, dtype=mx.int32)

    def shared_view(self, position: int) -> SharedView:
        """Every cached key and value, as a query from another model (the MTP drafter) at
        `position` reads them: a full-attention layer hides nothing."""
        return _slots(self.keys, 0, self.offset), _slots(self.values, 0, self.offset), None

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (O(1)); returns how many were removed."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def max_trim(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    @property
    def state(self) -> tuple[KV, KV, int] | None:
        if self.keys is None:
            return None
        return _slots(self.keys, 0, self.offset), _slots(self.values, 0, self.offset), self.offset

    @state.setter
    def state(self, s: tuple[KV, KV, int] | None) -> None:
        if s is None:
            self.keys = self.values = None
            self.offset = 0
        else:
            self.keys, self.values, self.offset = _handle(s[0]), _handle(s[1]), int(s[2])


class RingKVCache:
    """Sliding-window cache: a ring of `window + slack` slots.

    Slot `s` holds the most recent position `p` with `p % capacity == s`. The extra `slack`
    slots keep the keys that left the window, so `trim(n)` for `n <= slack` restores exactly
    the state before the last `n` tokens even after the ring has wrapped (speculative decoding
    rolls back rejected drafts this way). mlx-lm's rotating cache overwrites the oldest slot and
    cannot do this safely.

    A one-token update writes into the ring and attends over it; a multi-token update attends
    over the ring's old contents plus the new chunk (whose early tokens may need keys the chunk
    itself overwrites), then stores the chunk's tail.
    """

    def __init__(self, window: int, slack: int = 128, quant: KVBits = None) -> None:
        self.window, self.slack, self.quant = window, slack, quant
        self.capacity = window + slack
        self.keys: KV | None = None
        self.values: KV | None = None
        self.offset = 0
        self.written = 0  # furthest offset ever written: trimmed slots stay overwritten until passed

    def _slot_positions(self, last: int) -> Positions:
        """Position held by each slot when the newest stored position is `last`."""
        s = mx.arange(self.capacity, dtype=mx.int32)
        return last - mx.remainder(last - s, self.capacity)

    def _write(self, keys: KV, values: KV, start: int) -> None:
        n, cap = keys.shape[2], self.capacity
        if n > cap:  # only the newest `cap` tokens can be kept
            keys, values, start, n = (
                _slots(keys, -cap, None),
                _slots(values, -cap, None),
                start + n - cap,
                cap,
            )
        s = start % cap
        first = min(n, cap - s)
        for store, new in ((self.keys, keys), (self.values, values)):
            _store(store, s, _slots(new, 0, first))
            if first < n:  # wrap around
                _store(store, 0, _slots(new, first, None))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]:
        prev, n = self.offset, keys.shape[2]
        keys, values = _encode(keys, self.quant), _encode(values, self.quant)
        if self.keys is None:
            self.keys, self.values = _empty(keys, self.capacity), _empty(values, self.capacity)
        self.offset += n
        self.written = max(self.written, self.offset)
        if n == 1:
            self._write(keys, values, prev)
            stored = min(self.offset, self.capacity)
            return _slots(self.keys, 0, stored), _slots(self.values, 0, stored)
        stored = min(prev, self.capacity)
        if stored == 0:
            out_k, out_v = keys, values
        else:
            out_k = _concat(_slots(self.keys, 0, stored), keys)
            out_v = _concat(_slots(self.values, 0, stored), values)
        self._write(keys, values, prev)
        return out_k, out_v

    def key_positions(self, n: int) -> Positions:
        """Positions of the keys the next `update_and_fetch` of `n` tokens will return."""
        prev = self.offset
        if n == 1:
            return self._slot_positions(prev)[: min(prev + 1, self.capacity)]
        new = mx.arange(prev, prev + n, dtype=mx.int32)
        stored = min(prev, self.capacity)
        return new if stored == 0 else mx.concatenate([self._slot_positions(prev - 1)[:stored], new])

    def shared_view(self, position: int) -> SharedView:
        """The stored keys and values as a query from another model (the MTP drafter) at
        `position` sees them: HF's assistant mask keeps keys within `window` of the newest cached
        key (|distance| <= window). Masks come from slot positions, so a ring that wrapped or was
        rolled back is read correctly."""
        stored = min(self.offset, self.capacity)
        kpos = self._slot_positions(self.offset - 1)[:stored]
        mask = (kpos >= 0) & (kpos >= position - 1 - self.window)
        return _slots(self.keys, 0, stored), _slots(self.values, 0, stored), mask

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens; exact for `n <= max_trim`."""
        if n > self.max_trim:
            raise ValueError(f"RingKVCache.trim({n}) exceeds its rollback slack ({self.max_trim} tokens)")
        self.offset -= n
        return n

    @property
    def max_trim(self) -> int:
        # Writes up to `written` destroyed the keys `capacity` positions earlier; those keys stay
        # outside every future query's window while `written - offset <= slack + 1` (keep `slack`).
        return max(0, min(self.offset, self.slack - (self.written - self.offset)))

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    @property
    def state(self) -> tuple[KV, KV, int] | None:
        return None if self.keys is None else (_handle(self.keys), _handle(self.values), self.offset)

    @state.setter
    def state(self, s: tuple[mx.array, mx.array, int] | None) -> None:
        if s is None:
            self.keys = self.values = None
            self.offset = self.written = 0
        else:
            self.keys, self.values, self.offset = _handle(s[0]), _handle(s[1]), int(s[2])
            self.written = self.offset


def attention_mask(
    cache: Cache | None, n: int, window: int | None, block_ids: mx.array | None = None
) -> Mask:
    """Mask for `n` new tokens attending to what `cache.update_and_fetch` will return.

    Causal, limited to `window` keys back (sliding layers) and, where `block_ids` (`[B, n]`, -1 =
    none) is given, bidirectional within each block of new tokens (image soft tokens); then the
    mask is `[B, 1, n, K]`. Returns None or "causal" where the fast kernel's own masking is exact.
    """
    if isinstance(cache, (BatchKVCache, BatchRingCache)):
        return cache.mask(window)  # one new token per row, at each row's own position
    start = 0 if cache is None else cache.offset
    if block_ids is None:
        if n == 1 and (window is None or start < window):
            return None
        if window is None or (start == 0 and n <= window):
            return "causal"  # MLX aligns the causal mask to the end of the keys
    kpos = mx.arange(n, dtype=mx.int32) if cache is None else cache.key_positions(n)
    qpos = mx.arange(start, start + n, dtype=mx.int32)[:, None]
    keep = kpos[None] <= qpos
    if block_ids is not None:
        old = mx.full((block_ids.shape[0], kpos.shape[0] - n), -1, mx.int32)
        kblock = mx.concatenate([old, block_ids.astype(mx.int32)], axis=1)[:, None, None, :]
        qblock = block_ids[:, None, :, None]
        keep = keep | ((qblock == kblock) & (qblock >= 0))
    if window is not None:
        keep = keep & (kpos[None] > qpos - window)
    return keep & (kpos[None] >= 0)


# -- batches ------------------------------------------------------------------------------------
#
# Rows of a batch keep their own positions (per-row offsets), not a left-padded common one: a row
# joins with the cache it was prefilled into, whatever its length, and leaves without realigning
# the others. Each decode step writes every row's new key at its own slot (one scatter per array)
# and masks per row; RoPE takes the per-row offsets. Batch caches take one token per row per
# step; prefill, rollback and the drafter work on a row's own caches (`split` gives them back).


def _copy(x: KV) -> KV:
    """`x` in its own memory: a row split off a batch must not keep the whole batch alive."""
    if isinstance(x, QuantizedKV):
        return x._replace(**{f: getattr(x, f) + 0 for f in ("packed", "scales", "biases")})
    return x + 0  # a new array (a slice, even made contiguous, may share the batch's buffer)


def _pad_slots(x: KV, slots: int) -> KV:
    """`x` (`[1, H, K, ...]`) with zeroed slots appended up to `slots`."""
    if x.shape[2] == slots:
        return x
    return _concat(x, _empty(x, slots - x.shape[2]))


def _stack(rows: list[KV]) -> KV:
    if isinstance(rows[0], QuantizedKV):
        return rows[0]._replace(
            **{f: mx.concatenate([getattr(r, f) for r in rows]) for f in ("packed", "scales", "biases")}
        )
    return mx.concatenate(rows)


def _row(x: KV, i: int) -> KV:
    if isinstance(x, QuantizedKV):
        return x._replace(**{f: getattr(x, f)[i : i + 1] for f in ("packed", "scales", "biases")})
    return x[i : i + 1]


def _scatter(x: KV, slots: mx.array, value: KV) -> KV:
    """`x [B, H, S, ...]` with row b's slot `slots[b]` set to `value [B, H, 1, ...]`."""
    if isinstance(x, QuantizedKV):
        return x._replace(
            **{f: _scatter(getattr(x, f), slots, getattr(value, f)) for f in ("packed", "scales", "biases")}
        )
    index = mx.broadcast_to(slots.reshape(-1, 1, 1, 1), value.shape)
    return mx.put_along_axis(x, index, value, axis=2)


def _like(rows: list, attr: str) -> KV | None:
    return next((getattr(r, attr) for r in rows if getattr(r, attr) is not None), None)


class BatchKVCache:
    """The growing caches of several rows (one layer), each row at its own offset."""

    step = KVCache.step

    def __init__(self, rows: list[KVCache]) -> None:
        self.quant = rows[0].quant
        self.offsets = [c.offset for c in rows]
        self.keys = self.values = None
        if _like(rows, "keys") is not None:
            size = -(-(max(self.offsets) + 1) // self.step) * self.step

            def held(attr: str) -> KV:
                like = _like(rows, attr)
                return _stack(
                    [
                        _pad_slots(_empty(like, 0) if x is None else _slots(x, 0, c.offset), size)
                        for c in rows
                        for x in [getattr(c, attr)]
                    ]
                )

            self.keys, self.values = held("keys"), held("values")

    @property
    def offset(self) -> mx.array:
        """Every row's position of its next token (what RoPE takes)."""
        return mx.array(self.offsets, dtype=mx.int32)

    def mask(self, window: int | None) -> mx.array:
        """`[B, 1, 1, K]`: each row's query sees its own keys up to its position (K: the longest
        row's keys, which is all `update_and_fetch` returns)."""
        kpos = mx.arange(max(self.offsets) + 1, dtype=mx.int32)[None]
        return (kpos <= self.offset[:, None])[:, None, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]:
        keys, values = _encode(keys, self.quant), _encode(values, self.quant)
        slots, held = self.offset, max(self.offsets) + 1
        if self.keys is None:
            size = -(-held // self.step) * self.step
            self.keys, self.values = _empty(keys, size), _empty(values, size)
        elif held > self.keys.shape[2]:
            self.keys = _concat(self.keys, _empty(self.keys, self.step))
            self.values = _concat(self.values, _empty(self.values, self.step))
        self.keys, self.values = _scatter(self.keys, slots, keys), _scatter(self.values, slots, values)
        self.offsets = [o + 1 for o in self.offsets]
        return _slots(self.keys, 0, held), _slots(self.values, 0, held)

    def split(self) -> list[KVCache]:
        """Each row's own cache, in its own memory."""
        out = []
        for i, offset in enumerate(self.offsets):
            c = KVCache(self.quant)
            if self.keys is not None and offset:
                c.keys = _copy(_slots(_row(self.keys, i), 0, offset))
                c.values = _copy(_slots(_row(self.values, i), 0, offset))
            c.offset = offset
            out.append(c)
        return out

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


class BatchRingCache:
    """The sliding-window rings of several rows (one layer): every row's ring has the same
    capacity, and row b writes position p at slot `p % capacity` of its own ring."""

    def __init__(self, rows: list[RingKVCache]) -> None:
        first = rows[0]
        self.window, self.slack, self.quant, self.capacity = (
            first.window,
            first.slack,
            first.quant,
            first.capacity,
        )
        self.offsets = [c.offset for c in rows]
        self.written = [c.written for c in rows]
        like_k, like_v = _like(rows, "keys"), _like(rows, "values")
        self.keys = self.values = None
        if like_k is not None:
            cap = self.capacity
            self.keys = _stack([c.keys if c.keys is not None else _empty(like_k, cap) for c in rows])
            self.values = _stack([c.values if c.values is not None else _empty(like_v, cap) for c in rows])

    @property
    def offset(self) -> mx.array:
        return mx.array(self.offsets, dtype=mx.int32)

    def mask(self, window: int | None) -> mx.array:
        """`[B, 1, 1, K]`: each row's query sees the slots holding its last `window` positions
        (as `RingKVCache.key_positions` computes them, per row) among the K slots held."""
        q = self.offset[:, None]
        s = mx.arange(self._held(), dtype=mx.int32)[None]
        kpos = q - mx.remainder(q - s, self.capacity)
        keep = kpos >= 0
        if window is not None:
            keep = keep & (kpos > q - window)
        return keep[:, None, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]:
        keys, values = _encode(keys, self.quant), _encode(values, self.quant)
        if self.keys is None:
            self.keys, self.values = _empty(keys, self.capacity), _empty(values, self.capacity)
        slots, held = mx.array([o % self.capacity for o in self.offsets], dtype=mx.int32), self._held()
        self.keys, self.values = _scatter(self.keys, slots, keys), _scatter(self.values, slots, values)
        self.offsets = [o + 1 for o in self.offsets]
        self.written = [max(w, o) for w, o in zip(self.written, self.offsets, strict=True)]
        return _slots(self.keys, 0, held), _slots(self.values, 0, held)

    def _held(self) -> int:
        """Slots holding a key once this step's are written (the first ones, until a ring wraps)."""
        return min(max(self.offsets) + 1, self.capacity)

    def split(self) -> list[RingKVCache]:
        out = []
        for i, (offset, written) in enumerate(zip(self.offsets, self.written, strict=True)):
            c = RingKVCache(self.window, self.slack, self.quant)
            if self.keys is not None and written:
                c.keys, c.values = _copy(_row(self.keys, i)), _copy(_row(self.values, i))
            c.offset, c.written = offset, written
            out.append(c)
        return out

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


BatchCache = BatchKVCache | BatchRingCache


def merge_caches(rows: list[list[Cache]]) -> list[BatchCache]:
    """Per layer, one batch cache holding the rows' caches (each row's list from `make_cache`)."""
    layers = []
    for caches in zip(*rows, strict=True):
        kind = BatchRingCache if isinstance(caches[0], RingKVCache) else BatchKVCache
        layers.append(kind(list(caches)))
    return layers


def split_caches(layers: list[BatchCache]) -> list[list[Cache]]:
    """The rows' own caches back from `merge_caches`'s (layer-major in, row-major out)."""
    return [list(row) for row in zip(*(layer.split() for layer in layers), strict=True)]
