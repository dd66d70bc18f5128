"""Video input for the encoder-free 12B: decoding (PyAV, the `video` extra), frame sampling and
per-frame preprocessing as transformers' `Gemma4UnifiedVideoProcessor` does it.

A video is a sequence of timestamped frames. Frames are sampled uniformly by index
(`default_sample_indices_fn`: `arange(n) * total // n`), `num_frames` of them (32 by default) or
`fps` per second of the clip; each frame goes through the image path (aspect-preserving bicubic
resize to a per-frame budget, 70 soft tokens by default, [0, 1] pixels, 48x48 HWC patches padded to
the budget); the prompt holds `mm:ss <|image><|video|>xN<image|>` per frame, joined by spaces, with
the time of frame index i at i / fps (24 fps where the clip gives no rate: pre-sampled frames).

Long clips are not decoded whole: frames are reached by seeking to the nearest keyframe before
each sampled time. The display rotation of phone clips is applied to the frames.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import media
from .media import PATCH, VIDEO_TOKEN, MediaError, source_name

DEFAULT_FRAMES = 32  # the reference video processor's `num_frames`
DEFAULT_SOFT_TOKENS = 70  # its `max_soft_tokens` per frame
DEFAULT_FPS = 24.0  # what the reference assumes when a clip has no frame rate
# Above this many frames in a clip, sampled frames are reached by seeking (a keyframe before each,
# then decoding up to it) rather than by decoding every frame from the start.
SEEK_ABOVE_FRAMES = 300
EXTRA = "pip install 'gemma-mlx[video]'"

VideoSource = str | Path | bytes | np.ndarray | Sequence[media.ImageSource]


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise MediaError(f"video input needs PyAV, which is not installed: {EXTRA}") from None
    return av


def sample_indices(
    total: int, clip_fps: float | None, num_frames: int | None = DEFAULT_FRAMES, fps: float | None = None
) -> np.ndarray:
    """Frame indices to keep out of `total`: the reference's `default_sample_indices_fn`. `fps`
    (frames per second of the clip; then `num_frames`, if given, caps the count) or `num_frames`
    uniformly over the clip, `arange(n) * total // n`. One deliberate difference: a clip shorter
    than the count asked for gives all its frames (the reference raises)."""
    if total < 1:
        raise MediaError("the video has no frames")
    if fps is not None:
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise MediaError(f"video fps={fps!r}: expected a number > 0")
        if clip_fps is None:
            raise MediaError("sampling by fps needs the clip's frame rate (give the frames' fps)")
        n = max(1, int(total / clip_fps * fps))
        n = n if num_frames is None else min(n, num_frames)
    elif num_frames is None:
        n = total
    else:
        n = num_frames
    if not isinstance(n, int) or n < 1:
        raise MediaError(f"num_frames={n!r}: expected an integer >= 1")
    n = min(n, total)
    return np.arange(n, dtype=np.int64) * total // n


@dataclass
class VideoInput:
    """One video, preprocessed: the reference's `pixel_values_videos` / `video_position_ids` rows
    of its frames, the soft tokens per frame and which frames of the clip were taken."""

    pixel_values: np.ndarray  # [frames, max_soft_tokens, 6912] float32 in [0, 1]
    position_ids: np.ndarray  # [frames, max_soft_tokens, 2] int32, (-1, -1) for padding
    num_soft_tokens: int  # per frame
    frame_indices: list[int]
    fps: float  # the clip's frame rate (DEFAULT_FPS when it gives none)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame: index / fps, as the reference's `VideoMetadata.timestamps`."""
        return [i / self.fps for i in self.frame_indices]

    @property
    def num_tokens(self) -> int:
        """Soft tokens plus begin/end markers of all frames (the timestamp text comes on top)."""
        return self.num_frames * (self.num_soft_tokens + 2)


def timestamp_text(seconds: float) -> str:
    """`mm:ss`, as the reference's `replace_video_token` writes it."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def expand_video(video: VideoInput) -> str:
    """The prompt text of one video (`replace_video_token`)."""
    frame = media.BOI + VIDEO_TOKEN * video.num_soft_tokens + media.EOI
    return " ".join(f"{timestamp_text(t)} {frame}" for t in video.timestamps)


# --- sources ---------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """An opened video before decoding: its frame count, rate and stored frame size, `frames(indices)`
    (an iterator of the chosen frames as displayed, HWC uint8 RGB, in order; it closes the file when
    done) and `close()` (for a clip that is not decoded after all)."""

    name: str
    total: int
    fps: float | None
    height: int
    width: int
    frames: Callable[[Sequence[int]], Iterator[np.ndarray]]
    close: Callable[[], None] = lambda: None


def _frame_list(src: Any, fps: float | None, name: str) -> VideoClip:
    """Pre-sampled frames: a [T, H, W, C] (or [T, C, H, W]) array or a list of images."""
    if isinstance(src, np.ndarray):
        if src.ndim != 4:
            raise MediaError(
                f"{name}: a video array must be [frames, height, width, channels], got {src.shape}"
            )
        items: Sequence[Any] = list(src)
    else:
        items = list(src)
    if not items:
        raise MediaError(f"{name}: the video has no frames")
    first = media.load_image(items[0])

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        for i in indices:
            img = first if i == 0 else media.load_image(items[i])
            if img.size != first.size:
                raise MediaError(
                    f"{name}: frame {i} is {img.width}x{img.height}, frame 0 {first.width}x{first.height}: "
                    "the frames of a video must share one size"
                )
            yield np.asarray(img)

    return VideoClip(name, len(items), fps, first.height, first.width, frames)


def _container(src: str | Path | bytes, name: str, seek_above: int) -> VideoClip:
    av = _av()
    if not isinstance(src, bytes):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{name}: cannot read the file (missing, or not a regular file)")
        if path.stat().st_size == 0:
            raise MediaError(f"{name}: the file is empty")
    elif not src:
        raise MediaError(f"{name}: the data is empty")
    try:
        container = av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src), "r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"{name}: not a readable video ({e})") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise MediaError(f"{name}: no video stream (the file has {', '.join(kinds)} streams)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise MediaError(f"{name}: the video stream has no frame size")
        if width * height > media.MAX_PIXELS:
            raise MediaError(
                f"{name}: {width}x{height} frames are larger than {media.MAX_PIXELS:,} pixels; refused"
            )
        fps = float(stream.average_rate) if stream.average_rate else None
        total = stream.frames or _count_packets(container, stream)
    except av.FFmpegError as e:
        container.close()
        raise MediaError(f"{name}: not a readable video ({e})") from None
    except BaseException:
        container.close()
        raise
    stream.thread_type = "AUTO"

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        seek = total > seek_above and fps is not None and stream.time_base is not None
        if seek:
            source = _seek_frames(container, stream, indices, fps)
        else:
            source = _scan_frames(container, stream, indices)
        try:
            for frame in source:
                yield _rotated(frame.to_ndarray(format="rgb24"), frame.rotation)
        except av.FFmpegError as e:
            raise MediaError(f"{name}: the video data is corrupt ({e})") from None
        except MediaError as e:
            raise MediaError(f"{name}: {e}") from None
        finally:
            container.close()

    return VideoClip(name, total, fps, height, width, frames, container.close)


def _count_packets(container: Any, stream: Any) -> int:
    """Frames of a stream whose container does not store the count (Matroska, WebM): its packets,
    read without decoding."""
    n = 0
    for packet in container.demux(stream):
        n += packet.size > 0
    container.seek(0)
    return n


def _scan_frames(container: Any, stream: Any, indices: Sequence[int]) -> Iterator[Any]:
    """The frames at `indices` (sorted) decoding from the start: the i-th decoded frame is frame i."""
    wanted, last = set(int(i) for i in indices), int(indices[-1])
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            yield frame
        if i >= last:
            return


def _worth_seeking(stream: Any, target: float, position: float) -> bool:
    """Whether seeking to `target` skips decoding: the keyframe before it (from the container's
    index) lies ahead of the last decoded frame. Without an index: targets over 10 s ahead."""
    if target < position:
        return True
    entries = stream.index_entries
    if not len(entries):
        return target - position > 10.0 / float(stream.time_base)
    k = entries.search_timestamp(int(target), backward=True)
    return k >= 0 and entries[k].timestamp > position


def _seek_frames(container: Any, stream: Any, indices: Sequence[int], fps: float) -> Iterator[Any]:
    """The frames at `indices` of a long clip: frame i is the first at or after time i / fps from
    the stream's start (the same frame as by counting on a constant-rate clip). Where a keyframe
    lies between the last decoded frame and the next target, seek to the keyframe before the
    target instead of decoding up to it."""
    tb = float(stream.time_base)
    start = stream.start_time or 0
    decoder: Iterator[Any] | None = None
    position = -math.inf  # pts of the last decoded frame
    half = 0.5 / fps / tb
    for i in indices:
        target = start + i / fps / tb
        if decoder is None or _worth_seeking(stream, target, position):
            container.seek(int(target), stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
        for frame in decoder:
            if frame.pts is None:
                raise MediaError("frames without timestamps cannot be sought")
            position = frame.pts
            if frame.pts >= target - half:
                yield frame
                break
        else:
            return


def _rotated(a: np.ndarray, degrees: float) -> np.ndarray:
    """Frame pixels as displayed: `degrees` is the counter-clockwise display rotation."""
    k = round((degrees or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(a, k)) if k else a


def open_video(src: VideoSource, fps: float | None = None, seek_above: int = SEEK_ABOVE_FRAMES) -> VideoClip:
    """A video file (path or bytes, anything FFmpeg reads) or pre-sampled frames (a list of images
    or a 4-D array) with their `fps` (ignored for files, which carry their own)."""
    name = source_name(src)
    if isinstance(src, str | Path | bytes):
        return _container(src, name, seek_above)
    if isinstance(src, np.ndarray) or (isinstance(src, Sequence) and not isinstance(src, str)):
        if fps is not None and not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise MediaError(f"{name}: fps={fps!r}: expected a number > 0")
        return _frame_list(src, fps, name)
    raise MediaError(f"{name}: expected a video file (path or bytes) or a list of frames")


def frame_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> int:
    """Soft tokens of one frame of this size."""
    h, w = media.target_size(height, width, max_soft_tokens)
    return (h // PATCH) * (w // PATCH)


def video_token_count(
    src: VideoSource,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    num_frames: int | None = DEFAULT_FRAMES,
    fps: float | None = None,
    frames_fps: float | None = None,
) -> int:
    """Prompt tokens a video will take, from its header alone (nothing is decoded): per sampled
    frame its soft tokens, the two markers and about 7 tokens of timestamp text (`mm:ss` with
    digits as single tokens, and the spaces around it)."""
    media._check_budget(max_soft_tokens)
    clip = open_video(src, frames_fps)
    try:
        n = len(sample_indices(clip.total, clip.fps, num_frames, fps))
        return n * (frame_tokens(clip.height, clip.width, max_soft_tokens) + 2 + 7)
    finally:
        clip.close()


def preprocess_video(
    src: VideoSource,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    num_frames: int | None = DEFAULT_FRAMES,
    fps: float | None = None,
    *,
    frames_fps: float | None = None,
    token_budget: int | None = None,
    seek_above: int = SEEK_ABOVE_FRAMES,
) -> VideoInput:
    """Decode, sample and preprocess one video (see the module doc). `num_frames` frames, or `fps`
    per second of the clip (at most `num_frames`); `frames_fps` is the rate of pre-sampled frames.

    `token_budget`: the tokens the context has left; a video that needs more is refused
    (`MediaError` with the counts) from its header, before any frame is decoded."""
    media._check_budget(max_soft_tokens)
    clip = open_video(src, frames_fps, seek_above)
    try:
        try:
            indices = sample_indices(clip.total, clip.fps, num_frames, fps)
        except MediaError as e:
            raise MediaError(f"{clip.name}: {e}") from None
        per_frame = frame_tokens(clip.height, clip.width, max_soft_tokens)
        needed = len(indices) * (per_frame + 2)
        if token_budget is not None and needed > token_budget:
            raise MediaError(
                f"{clip.name}: {len(indices)} frames of {per_frame} soft tokens need {needed:,} tokens, "
                f"but the context has room for {token_budget:,}: sample fewer frames or use a smaller "
                "per-frame budget"
            )
    except BaseException:
        clip.close()
        raise
    n = len(indices)
    pv = np.zeros((n, max_soft_tokens, PATCH * PATCH * 3), np.float32)
    pos = np.full((n, max_soft_tokens, 2), -1, np.int32)
    got = 0
    for frame in clip.frames(indices):
        img = media.preprocess_image(Image.fromarray(frame), max_soft_tokens)
        if img.num_soft_tokens != per_frame:  # a rotated frame, or frames that change size
            if got:
                raise MediaError(f"{clip.name}: frame {indices[got]} changes the frame size")
            per_frame = img.num_soft_tokens
        pv[got], pos[got] = img.pixel_values, img.position_ids
        got += 1
    if got < n:
        raise MediaError(
            f"{clip.name}: the clip ended after {got} of the {n} sampled frames (frame {indices[got]} "
            f"of {clip.total} announced): truncated or corrupt"
        )
    return VideoInput(pv, pos, per_frame, indices.tolist(), clip.fps or DEFAULT_FPS)


def batch_videos(videos: Sequence[VideoInput]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`pixel_values_videos [frames of all videos, max_soft_tokens, 6912]`, `video_position_ids`
    and `num_frames_per_video`, as the reference concatenates them along the frame axis."""
    if not videos or len({v.pixel_values.shape[1:] for v in videos}) != 1:
        raise MediaError("batch_videos needs one or more videos preprocessed with the same max_soft_tokens")
    return (
        np.concatenate([v.pixel_values for v in videos]),
        np.concatenate([v.position_ids for v in videos]),
        [v.num_frames for v in videos],
    )


def synthetic_video(frames: int = 8, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A deterministic clip `[frames, height, width, 3]` uint8: a gradient background with a
    square and a disc that move from frame to frame (tests, benchmarks, the README example)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7 + y / 11)], -1) * 0.6
    out = np.empty((frames, height, width, 3), np.uint8)
    c1, c2 = rng.uniform(0.3, 1, 3), rng.uniform(0.3, 1, 3)
    for t in range(frames):
        a = base.copy()
        s = max(2, min(height, width) // 5)
        top, left = (t * 3) % max(1, height - s), (t * 5) % max(1, width - s)
        a[top : top + s, left : left + s] = c1
        cy, cx = height / 2 + height / 4 * math.sin(t / 3), width / 2 + width / 4 * math.cos(t / 3)
        a[(y - cy) ** 2 + (x - cx) ** 2 < (s / 1.5) ** 2] = c2
        out[t] = np.clip(a * 255 + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    return out
