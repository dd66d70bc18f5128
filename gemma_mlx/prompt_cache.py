"""A prefix cache across requests: each prompt resumes from the longest stored token prefix.

Sliding-window layers keep a ring that can only be rolled back by its slack, so a cache that ran
past a divergence point cannot be reused from there. Instead, snapshots of every layer's cache
state are taken at chosen points (the end of each prompt, the end of each answer) and stored
under the token sequence they hold; a new prompt restores the snapshot sharing its longest
prefix and rolls it back by at most the rollback room it had when taken. A cache's `state` is a
snapshot that shares the arrays' memory until the cache writes again, not a copy.

Media soft tokens all share one placeholder id, so the key replaces each image's, video frame's or
audio block's placeholders by a hash of its preprocessed tensors: the same text with another image
is another prefix. A reused prefix never ends inside a media block (a block is encoded whole).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .processor import Inputs


def _runs(ids: np.ndarray, token: int | None) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of `token` in `ids`."""
    if token is None:
        return []
    hit = np.concatenate([[False], ids == token, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _digest(*arrays: np.ndarray | None) -> int:
    h = hashlib.blake2b(digest_size=7)
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return -1 - int.from_bytes(h.digest(), "little")  # negative: never a real token id


@dataclass
class PromptKey:
    """The cache key of a prompt: token ids with media placeholders replaced by content hashes,
    and the media blocks as (start, end, kind, index into the prompt's media tensors)."""

    tokens: np.ndarray
    blocks: list[tuple[int, int, str, int]]
    # whose prompts these are: a prompt resumes only from entries of its own partition, so the
    # reused length (cached_tokens) tells nothing about other partitions' prompts
    partition: str = ""

    @classmethod
    def of(
        cls,
        inputs: Inputs,
        image_token: int | None,
        audio_token: int | None,
        video_token: int | None = None,
    ) -> PromptKey:
        """The key of `inputs`; a video's frames are blocks of `video_token`, one per frame."""
        ids = np.asarray(inputs.ids, dtype=np.int64)
        key, blocks = ids.copy(), []
        for kind, token, tensors in (
            ("image", image_token, (inputs.pixel_values, inputs.image_position_ids)),
            ("audio", audio_token, (inputs.input_features, inputs.input_features_mask)),
            ("video", video_token, (inputs.pixel_values_videos, inputs.video_position_ids)),
        ):
            if tensors[0] is None:
                continue
            runs = _runs(ids, token)
            if len(runs) != len(tensors[0]):
                raise ValueError(f"{len(runs)} {kind} blocks in the prompt for {len(tensors[0])} tensors")
            for i, (s, e) in enumerate(runs):
                key[s:e] = _digest(*(t[i] if t is not None else None for t in tensors))
                blocks.append((s, e, kind, i))
        return cls(key, sorted(blocks))

    def cut(self, n: int) -> int:
        """The largest prefix length <= n that does not end inside a media block."""
        for s, e, _, _ in self.blocks:
            if s < n < e:
                return s
        return n

    def rest_of(self, inputs: Inputs, n: int) -> Inputs:
        """`inputs` from position `n` on: its tokens and the media of the blocks there."""
        first = {"image": None, "audio": None, "video": None}
        for s, _, kind, i in self.blocks:
            if s >= n and first[kind] is None:
                first[kind] = i
        rest = Inputs(list(inputs.ids[n:]))
        if first["image"] is not None:
            rest.pixel_values = inputs.pixel_values[first["image"] :]
            rest.image_position_ids = inputs.image_position_ids[first["image"] :]
        if first["audio"] is not None:
            rest.input_features = inputs.input_features[first["audio"] :]
            if inputs.input_features_mask is not None:
                rest.input_features_mask = inputs.input_features_mask[first["audio"] :]
        if first["video"] is not None:
            rest.pixel_values_videos = inputs.pixel_values_videos[first["video"] :]
            rest.video_position_ids = inputs.video_position_ids[first["video"] :]
        return rest


@dataclass
class _Entry:
    tokens: np.ndarray  # the key tokens the snapshot holds
    states: list
    max_trim: int  # how far the snapshot can be rolled back exactly
    nbytes: int
    partition: str = ""


class PromptCache:
    """Snapshots of KV caches keyed by the token prefix they hold, LRU-bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def fetch(self, key: PromptKey, cache: list, limit: int) -> int:
        """Load into `cache` (empty, from `make_cache`) the longest stored prefix of `key`, at most
        `limit` tokens and never ending inside a media block; returns its length (0: nothing)."""
        best, best_n = None, 0
        for name, e in self._entries.items():
            if e.partition != key.partition:
                continue
            n = min(len(e.tokens), len(key.tokens), limit)
            diff = np.flatnonzero(e.tokens[:n] != key.tokens[:n])
            n = key.cut(int(diff[0]) if diff.size else n)
            if n > best_n and len(e.tokens) - n <= e.max_trim:
                best, best_n = name, n
        if best is None:
            return 0
        self._entries.move_to_end(best)
        e = self._entries[best]
        for c, s in zip(cache, e.states, strict=True):
            c.state = s
            c.trim(len(e.tokens) - best_n)
        return best_n

    def store(self, tokens: np.ndarray, cache: list, partition: str = "") -> None:
        """Snapshot `cache`, which holds exactly the key tokens `tokens` (of `partition`'s prompts)."""
        if not len(tokens) or self.max_bytes <= 0:
            return
        name = hashlib.blake2b(tokens.tobytes() + partition.encode(), digest_size=16).digest()
        if name in self._entries:
            self._entries.move_to_end(name)
            return
        states = [c.state for c in cache]
        mx.eval(states)  # a snapshot holds data, not the lazy computation that led to it
        size = sum(c.nbytes for c in cache)
        if size > self.max_bytes:
            return
        # a snapshot equal to a stored one extended is cheap, but keep the set small: drop stored
        # snapshots this one extends and could replace (it can be rolled back to them)
        trim = min(c.max_trim for c in cache)
        for k in [
            k
            for k, e in self._entries.items()
            if e.partition == partition and _extends(tokens, trim, e.tokens)
        ]:
            del self._entries[k]
        self._entries[name] = _Entry(tokens.copy(), states, trim, size, partition)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def _extends(tokens: np.ndarray, trim: int, shorter: np.ndarray) -> bool:
    """Whether a snapshot of `tokens` rolled back by up to `trim` covers the prefix `shorter`."""
    n = len(shorter)
    return n <= len(tokens) and len(tokens) - n <= trim and bool(np.array_equal(tokens[:n], shorter))
