"""Image and audio preprocessing for the encoder-free 12B (Pillow, numpy, soundfile, soxr; no torch).

Images (transformers' `Gemma4UnifiedImageProcessor`): RGB, aspect-preserving bicubic resize to a
soft-token budget, pixels in [0, 1] (no normalisation), cut into 48x48 HWC patches in raster order
with (x=column, y=row) patch positions, padded to the budget.
Audio (`Gemma4UnifiedAudioFeatureExtractor`): mono 16 kHz float waveform cut into 640-sample
(40 ms) frames, one soft token per frame, at most 750 frames (30 s) per audio block.
Prompts (`Gemma4UnifiedProcessor.replace_image_token` / `replace_audio_token`): each placeholder
becomes begin marker + one placeholder per soft token + end marker.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
import stat
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

PATCH = 48  # 16-px patches merged 3x3 (patch_size 16 x pooling_kernel_size 3)
BUDGETS = (70, 140, 280, 560, 1120)  # the reference's `_SUPPORTED_SOFT_TOKENS`
# Per-image cap, checked from the header before decoding (also when a caller has switched Pillow's
# own check off). Every image is resized to at most 1,120 soft tokens (2.6 MP), so a larger original
# only costs memory: decoding, RGB conversion and the resize peak near 12 bytes per pixel. 50 MP
# takes 48-MP phone photos (8064x6048) at ~0.6 GB; Pillow's bomb threshold (179 MP), the cap
# before, let one 493 KB PNG cost 2 GB.
MAX_PIXELS = 50_000_000
SAMPLE_RATE = 16_000
# Audio sampling rates outside this range are no real recording (telephone audio is 8 kHz, studio
# gear tops out at 768 kHz); a WAV header that says 1 Hz turns 3 KB into 1,600 s of audio.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
# Per-clip cap on decoded audio, checked from the header before decoding or resampling: one hour
# is 90,000 soft tokens (a third of the 12B's context) and ~0.7 GB of float samples at 48 kHz.
MAX_AUDIO_SECONDS = 3600.0
FRAME = 640  # samples per audio soft token (40 ms)
MAX_CLIP_SECONDS = 30.0  # `audio_seq_length` 750 frames: the documented per-block cap
IMAGE_TOKEN, BOI, EOI = "<|image|>", "<|image>", "<image|>"
AUDIO_TOKEN, BOA, EOA = "<|audio|>", "<|audio>", "<audio|>"

ImageSource = str | Path | bytes | Image.Image | np.ndarray
AudioSource = str | Path | bytes | np.ndarray


class MediaError(ValueError):
    """An image or audio input that cannot be used; the message names it."""


def source_name(src: Any) -> str:
    if isinstance(src, str | Path):
        return str(src)
    if isinstance(src, Image.Image) and getattr(src, "filename", ""):
        return str(src.filename)
    return f"<{type(src).__name__}>"


# --- images --------------------------------------------------------------------------------


def _array_to_image(a: np.ndarray, name: str) -> Image.Image:
    """HWC (or CHW, or HW) uint8 / bool / float in [0, 1] -> PIL. Channels are inferred like the
    reference's `infer_channel_dimension_format` (last axis first)."""
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.size == 0:
        raise MediaError(f"{name}: the image array is empty (shape {a.shape})")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))):
        raise MediaError(f"{name}: expected an HWC image array with 1, 3 or 4 channels, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise MediaError(f"{name}: the image array contains NaN or infinite values")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:  # 0..255 floats would silently turn white
            raise MediaError(f"{name}: float image arrays must be in [0, 1], got [{a.min():g}, {a.max():g}]")
        a = np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise MediaError(f"{name}: unsupported image array type {a.dtype} (use uint8, or float in [0, 1])")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return Image.fromarray(np.ascontiguousarray(a))


def _open(src: str | Path | bytes, name: str) -> Image.Image:
    try:
        if not isinstance(src, bytes) and stat.S_ISFIFO(os.stat(src).st_mode):
            raise MediaError(f"{name}: is a FIFO, expected a file")  # reading it would block
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
    except OSError as e:
        raise MediaError(f"{name}: cannot read the file ({e.strerror or e})") from None
    if not data:
        raise MediaError(f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():  # our own cap below is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise MediaError(f"{name}: not a readable image ({e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference's `image_transforms.convert_to_rgb`: anything with an alpha band or a
    transparency key is composited onto white, everything else goes through `convert("RGB")`.
    One deliberate difference: 16/32-bit integer and float images are scaled to 8 bits instead of
    being clipped at 255 by Pillow (which turns almost every real 16-bit image white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = float(a.max(initial=0))
        if image.mode.startswith("I;16"):
            scale = 65535.0
        else:  # 32-bit containers: guess the range from the data ([0, 1] floats, 8 or 16 bits)
            scale = 1.0 if image.mode == "F" and top <= 1 else 255.0 if top <= 255 else max(65535.0, top)
        return Image.fromarray(np.rint(np.clip(a / scale, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if ("A" in image.getbands() and image.mode != "LAB") or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(src: ImageSource) -> Image.Image:
    """An RGB image from a path, encoded bytes, a PIL image or an array (HWC uint8, or float in
    [0, 1]). Reads anything Pillow opens (JPEG, PNG, WebP, GIF and TIFF give their first frame,
    BMP, ...); applies the EXIF orientation (as transformers' `load_image`); converts every mode to
    RGB (`_to_rgb`). Raises `MediaError` naming the input for unreadable, truncated or empty files
    and for images over `MAX_PIXELS` (checked before decoding)."""
    name = source_name(src)
    if isinstance(src, np.ndarray):
        image = _array_to_image(src, name)
    elif isinstance(src, Image.Image):
        image = src
    elif isinstance(src, str | Path | bytes):
        image = _open(src, name)
    else:
        raise MediaError(f"{name}: expected a path, bytes, a PIL image or an array")
    if image.width * image.height > MAX_PIXELS:
        raise MediaError(
            f"{name}: {image.width}x{image.height} pixels is more than the {MAX_PIXELS:,} allowed "
            "(decompression bomb protection)"
        )
    try:
        image.load()  # decode now, so that truncated or corrupt data fails here, named
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise MediaError(f"{name}: not a readable image ({e})") from None
    try:
        image = ImageOps.exif_transpose(image) or image
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        pass  # a broken EXIF block: keep the pixels as stored
    try:
        return _to_rgb(image)
    except ValueError as e:  # a mode Pillow cannot convert
        raise MediaError(f"{name}: cannot convert {image.mode} to RGB ({e})") from None


def image_size(src: ImageSource) -> tuple[int, int]:
    """(width, height) of an image input from its header alone (nothing is decoded): what
    `MediaBudget` charges. Refuses what `load_image` refuses before decoding, named."""
    name = source_name(src)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
            a = a.transpose(1, 2, 0)
        if a.ndim not in (2, 3) or a.size == 0:
            raise MediaError(
                f"{name}: expected an HWC image array with 1, 3 or 4 channels, got shape {src.shape}"
            )
        return a.shape[1], a.shape[0]
    if isinstance(src, Image.Image):
        return src.size
    if not isinstance(src, str | Path | bytes):
        raise MediaError(f"{name}: expected a path, bytes, a PIL image or an array")
    with _open(src, name) as image:
        return image.size


def _check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in BUDGETS:  # as the reference's `_preprocess`
        raise MediaError(f"max_soft_tokens={max_soft_tokens}: expected one of {BUDGETS}")


def target_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """The resized (height, width), multiples of 48 within the budget: the reference's
    `get_aspect_ratio_preserving_size(h, w, 16, max_soft_tokens * 9, 3)`, line for line, including
    the zero-side branch (a side that floors to 0 becomes 48 and the other `floor(ratio) * 48`,
    capped at `max_soft_tokens * 48`) and the overshoot error. Upscales as well as downscales."""
    _check_budget(max_soft_tokens)
    target_px = max_soft_tokens * 9 * 16**2
    factor = math.sqrt(target_px / (height * width))
    h = math.floor(factor * height / PATCH) * PATCH
    w = math.floor(factor * width / PATCH) * PATCH
    if h == 0 and w == 0:
        raise MediaError(f"a {height}x{width} image cannot be resized to whole 48-px patches")
    longest = max_soft_tokens * PATCH
    if h == 0:
        h, w = PATCH, min(math.floor(width / height) * PATCH, longest)
    elif w == 0:
        h, w = min(math.floor(height / width) * PATCH, longest), PATCH
    if h * w > target_px:
        raise MediaError(f"resizing {height}x{width} to {h}x{w} exceeds {max_soft_tokens} soft tokens")
    return h, w


@dataclass
class ImageInput:
    pixel_values: np.ndarray  # [max_soft_tokens, 6912] float32 in [0, 1]; zero rows for padding
    position_ids: np.ndarray  # [max_soft_tokens, 2] int32 (x=column, y=row); (-1, -1) for padding
    num_soft_tokens: int


def resize_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic, antialiased resize that tracks torchvision's `resize(..., BICUBIC, antialias=True)`
    on uint8: both passes separately, horizontal first. torch always runs that order; a single
    Pillow `resize` may run the vertical pass first (seen when upscaling width while downscaling
    height), and with the 8-bit intermediate that costs up to 22/255 on noisy images instead of
    2/255 (see tests/test_media.py for the measured figures)."""
    if image.width != width:
        image = image.resize((width, image.height), Image.Resampling.BICUBIC)
    if image.height != height:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def preprocess_image(image: ImageSource, max_soft_tokens: int = 280) -> ImageInput:
    """Load, resize into the budget, scale to [0, 1] and cut into 48x48 HWC patches in raster order
    (the reference's 16-px patches regrouped 3x3 by `patches_merge` are exactly these), padded to
    `max_soft_tokens` rows with zeros at position (-1, -1)."""
    _check_budget(max_soft_tokens)  # before any decoding
    img = load_image(image)
    h, w = target_size(img.height, img.width, max_soft_tokens)
    pixels = np.asarray(resize_image(img, h, w), dtype=np.uint8)
    rows, cols = h // PATCH, w // PATCH
    n = rows * cols
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    pv = np.zeros((max_soft_tokens, patches.shape[1]), np.float32)
    pv[:n] = patches.astype(np.float32) * np.float32(1 / 255)  # as the reference's rescale, bit for bit
    pos = np.full((max_soft_tokens, 2), -1, np.int32)
    pos[:n, 1], pos[:n, 0] = np.divmod(np.arange(n), cols)
    return ImageInput(pv, pos, n)


def batch_images(images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`pixel_values [n, max_soft_tokens, 6912]`, `image_position_ids [n, max_soft_tokens, 2]` and
    the soft-token counts (the reference's `pixel_values`, `image_position_ids`,
    `num_soft_tokens_per_image`). All images must share one budget."""
    if not images or len({i.pixel_values.shape for i in images}) != 1:
        raise MediaError("batch_images needs one or more images preprocessed with the same max_soft_tokens")
    return (
        np.stack([i.pixel_values for i in images]),
        np.stack([i.position_ids for i in images]),
        [i.num_soft_tokens for i in images],
    )


# --- audio ---------------------------------------------------------------------------------


def _pcm_to_float(a: np.ndarray, name: str) -> np.ndarray:
    """Samples as float32 in [-1, 1): integers scaled as libsndfile does (int16 / 32768, unsigned
    8-bit centred on 128), floats kept as they are."""
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iu":
        half = float(2 ** (8 * a.dtype.itemsize - 1))
        return ((a.astype(np.float64) - (half if a.dtype.kind == "u" else 0)) / half).astype(np.float32)
    raise MediaError(f"{name}: unsupported sample type {a.dtype}")


def _wav_shortfall(head: bytes, size: int) -> tuple[int, int] | None:
    """(bytes of samples a RIFF/WAVE header announces, bytes the file holds) when the file is
    shorter than its header says, else None. libsndfile decodes what is there without a word,
    so a cut download would otherwise pass as a shorter recording. Streamed WAVs (data size 0
    or 0xFFFFFFFF: written before the length was known) cannot be judged."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            if length in (0, 0xFFFFFFFF) or pos + 8 + length <= size:
                return None
            return length, max(size - pos - 8, 0)
        pos += 8 + length + (length & 1)  # chunks are padded to even sizes
    return None


def _wav_rate(head: bytes) -> int | None:
    """The sampling rate a RIFF/WAVE `fmt ` chunk declares (None for other formats): read here
    because libsndfile refuses a rate of 0 with an internal error and accepts 1 Hz silently."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 16 <= len(head):
        chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            return struct.unpack("<I", head[pos + 12 : pos + 16])[0]
        pos += 8 + length + (length & 1)
    return None


def _check_rate(rate: Any, name: str) -> None:
    if not (isinstance(rate, numbers.Real) and math.isfinite(rate) and rate > 0):
        raise MediaError(f"{name}: invalid sampling rate {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(
            f"{name}: invalid sampling rate {rate:,} Hz "
            f"(expected {MIN_SAMPLE_RATE:,} to {MAX_SAMPLE_RATE:,} Hz)"
        )


def _check_duration(samples: int, rate: float, name: str, max_seconds: float) -> None:
    if samples / rate > max_seconds:
        raise MediaError(
            f"{name}: {samples / rate:,.1f} s of audio ({samples:,} samples at {rate:,} Hz) is more than "
            f"the {max_seconds:,.1f} s allowed"
        )


def _sf_message(e: Exception) -> str:
    # libsndfile's own words, without soundfile's "Error opening <_io.BytesIO object at 0x...>: "
    return getattr(e, "error_string", None) or str(e)


def _audio_head(src: str | Path | bytes, name: str) -> tuple[int, bytes]:
    """(file size, its first 64 KiB), refusing missing, irregular, empty and truncated files."""
    if not isinstance(src, bytes) and not Path(src).is_file():
        raise MediaError(f"{name}: cannot read the file (missing, or not a regular file)")
    size = len(src) if isinstance(src, bytes) else Path(src).stat().st_size
    if not size:
        raise MediaError(f"{name}: the file is empty")
    try:
        with io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as e:
        raise MediaError(f"{name}: cannot read the file ({e.strerror or e})") from None
    if (short := _wav_shortfall(head, size)) is not None:
        raise MediaError(
            f"{name}: truncated WAV file: its header announces {short[0]:,} bytes of samples, "
            f"the file holds {short[1]:,} (an incomplete download or copy?)"
        )
    if (rate := _wav_rate(head)) is not None:
        _check_rate(rate, name)
    return size, head


def audio_info(src: AudioSource, sampling_rate: float | None = None) -> tuple[int, float]:
    """(samples, sampling rate) of an audio input from its header alone, before any decoding or
    resampling: what `MediaBudget` charges. The same checks as `load_audio` up to decoding."""
    name = source_name(src)
    if isinstance(src, np.ndarray):
        if sampling_rate is None:
            raise MediaError(f"{name}: give the sampling rate of an audio array")
        _check_rate(sampling_rate, name)
        return (max(src.shape) if src.ndim == 2 else src.size), sampling_rate
    if not isinstance(src, str | Path | bytes):
        raise MediaError(f"{name}: expected a path, bytes or an array of samples")
    _audio_head(src, name)
    try:
        info = sf.info(io.BytesIO(src) if isinstance(src, bytes) else str(src))
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as e:
        raise MediaError(f"{name}: not a readable audio file ({_sf_message(e)})") from None
    _check_rate(info.samplerate, name)
    return max(int(info.frames), 0), info.samplerate


def load_audio(
    src: AudioSource, sampling_rate: float | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """A mono float32 waveform at 16 kHz.

    `src` is a file path or encoded bytes (anything libsndfile reads: WAV, FLAC, OGG Vorbis/Opus,
    MP3, AIFF, ...; its own rate is used and `sampling_rate` is ignored), or an array of samples
    at `sampling_rate` Hz (required: a wrong guess would silently change the pitch and length),
    shaped [samples] or [samples, channels] (or [channels, samples]: the shorter axis is taken as
    channels). Integer arrays are PCM. Channels are averaged; other rates are resampled with soxr
    ("HQ"). Raises `MediaError` naming the input for unreadable/corrupt files, unsupported sample
    types, empty audio and NaN/Inf samples. Silence is valid (the reference accepts it, and the
    model's per-frame RMSNorm maps an all-zero frame to zeros).

    Bounds, checked from the header before decoding or resampling: a rate from
    `MIN_SAMPLE_RATE` to `MAX_SAMPLE_RATE`, and at most `max_seconds` (default
    `MAX_AUDIO_SECONDS`) of audio."""
    name = source_name(src)
    max_seconds = MAX_AUDIO_SECONDS if max_seconds is None else max_seconds
    if isinstance(src, np.ndarray):
        if sampling_rate is None:
            raise MediaError(f"{name}: give the sampling rate of an audio array")
        _check_rate(sampling_rate, name)
        data, rate = _pcm_to_float(src, name), sampling_rate
        if data.size == 0:
            raise MediaError(f"{name}: the audio is empty")
        if data.ndim == 2:
            data = data.mean(axis=0 if data.shape[0] < data.shape[1] else 1)
    elif isinstance(src, str | Path | bytes):
        samples, rate = audio_info(src)
        _check_duration(samples, rate, name, max_seconds)
        try:
            data, rate = sf.read(
                io.BytesIO(src) if isinstance(src, bytes) else str(src), dtype="float32", always_2d=True
            )
        except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as e:
            raise MediaError(f"{name}: not a readable audio file ({_sf_message(e)})") from None
        data = data.mean(axis=1, dtype=np.float32)
    else:
        raise MediaError(f"{name}: expected a path, bytes or an array of samples")
    if data.ndim != 1:
        raise MediaError(f"{name}: expected [samples] or [samples, channels], got shape {src.shape}")
    if data.size == 0:
        raise MediaError(f"{name}: the audio is empty")
    _check_duration(data.size, rate, name, max_seconds)
    if not np.isfinite(data).all():
        raise MediaError(f"{name}: the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        data = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(data, dtype=np.float32)


@dataclass
class AudioInput:
    features: np.ndarray  # [num_frames, 640] float32
    num_frames: int


def preprocess_audio(waveform: np.ndarray) -> AudioInput:
    """Zero-pad a 16 kHz waveform to a multiple of 640 samples and cut it into frames: the
    reference's `_extract_waveform_features`, bit for bit (a partly padded last frame counts)."""
    w = np.asarray(waveform)
    if w.ndim != 1 or w.size == 0:
        raise MediaError(f"expected a non-empty mono waveform, got shape {w.shape}")
    n = -(-w.size // FRAME)
    padded = np.zeros(n * FRAME, np.float32)
    padded[: w.size] = w
    return AudioInput(padded.reshape(n, FRAME), n)


def split_audio(waveform: np.ndarray, max_seconds: float = MAX_CLIP_SECONDS) -> list[np.ndarray]:
    """Consecutive clips of at most `max_seconds` (whole 40 ms frames; 30 s = 750 frames).

    Why: the reference processor documents `audio_seq_length=750` as the per-segment cap and the
    model card 30 s per clip, but its extractor does not enforce it, and how the model treats a
    longer block is unverified. Rather than truncating or refusing, long audio
    becomes several consecutive audio blocks (`expand_media_tokens` takes a list of frame counts
    for one placeholder). Cuts fall on frame boundaries, so the clips' frames concatenate to
    exactly the frames of the whole waveform."""
    per_clip = int(max_seconds * SAMPLE_RATE) // FRAME * FRAME
    if per_clip <= 0:
        raise MediaError(f"max_seconds={max_seconds}: must hold at least one 40 ms frame")
    if len(waveform) == 0:
        raise MediaError("the audio is empty")
    return [waveform[i : i + per_clip] for i in range(0, len(waveform), per_clip)]


def audio_token_count(samples: int, max_seconds: float = MAX_CLIP_SECONDS) -> int:
    """Prompt tokens a 16 kHz waveform of `samples` becomes: one per 40 ms frame, plus the begin
    and end markers of each 30 s block (`split_audio`, `expand_media_tokens`)."""
    frames = -(-samples // FRAME)
    per_clip = int(max_seconds * SAMPLE_RATE) // FRAME
    return frames + 2 * -(-frames // per_clip)


def batch_audio(clips: Sequence[AudioInput]) -> tuple[np.ndarray, np.ndarray]:
    """`input_features [m, F, 640]` zero-padded to the longest clip and `input_features_mask [m, F]`
    (True = a real frame), as the reference extractor pads a batch ("longest")."""
    if not clips:
        raise MediaError("batch_audio needs one or more clips")
    frames = max(c.num_frames for c in clips)
    feats = np.zeros((len(clips), frames, FRAME), np.float32)
    mask = np.zeros((len(clips), frames), bool)
    for i, c in enumerate(clips):
        feats[i, : c.num_frames], mask[i, : c.num_frames] = c.features, True
    return feats, mask


# --- per-request budget --------------------------------------------------------------------


def _nbytes(src: Any) -> int:
    if isinstance(src, bytes):
        return len(src)
    if isinstance(src, np.ndarray):
        return src.nbytes
    if isinstance(src, str | Path):
        try:
            return Path(src).stat().st_size
        except OSError:
            return 0  # load_image/load_audio name the missing file
    return 0  # a PIL image: charged by its pixels


@dataclass
class MediaBudget:
    """What one request (or one prompt) may make the process decode, in total, charged from each
    input's header before anything is decoded: a server creates one per request and calls
    `add_image` / `add_audio` for every part, then decodes; `Processor.prepare(media_budget=...)`
    does it for its own media. Over budget is a `MediaError` naming the input and the totals.

    Defaults: 128 MiB of encoded media; 200 M decoded pixels (four images at the `MAX_PIXELS`
    cap; decoding takes ~12 bytes per pixel of CPU memory while an image is converted); one hour
    of audio (`MAX_AUDIO_SECONDS`)."""

    max_bytes: int = 128 << 20
    max_pixels: int = 200_000_000
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    used_bytes: int = 0
    used_pixels: int = 0
    used_audio_seconds: float = 0.0

    def _charge_bytes(self, src: Any, name: str) -> None:
        size = _nbytes(src)
        total = self.used_bytes + size
        if total > self.max_bytes:
            raise MediaError(
                f"{name}: {size:,} bytes of media brings the request to {total:,}, "
                f"more than the {self.max_bytes:,} allowed"
            )
        self.used_bytes += size

    def add_image(self, src: ImageSource) -> tuple[int, int]:
        """Charge one image; returns its (width, height)."""
        name = source_name(src)
        width, height = image_size(src)
        if width * height > MAX_PIXELS:
            raise MediaError(
                f"{name}: {width}x{height} pixels is more than the {MAX_PIXELS:,} allowed "
                "(decompression bomb protection)"
            )
        total = self.used_pixels + width * height
        if total > self.max_pixels:
            raise MediaError(
                f"{name}: {width}x{height} pixels brings the request to {total:,} "
                f"pixels, more than the {self.max_pixels:,} allowed: send fewer or smaller images"
            )
        self._charge_bytes(src, name)
        self.used_pixels += width * height
        return width, height

    def add_audio(self, src: AudioSource, sampling_rate: float | None = None) -> float:
        """Charge one audio input; returns its duration in seconds."""
        name = source_name(src)
        samples, rate = audio_info(src, sampling_rate)
        seconds = samples / rate
        _check_duration(samples, rate, name, MAX_AUDIO_SECONDS)
        total = self.used_audio_seconds + seconds
        if total > self.max_audio_seconds:
            raise MediaError(
                f"{name}: {seconds:,.1f} s of audio brings the request to {total:,.1f} s, "
                f"more than the {self.max_audio_seconds:,.1f} s allowed"
            )
        self._charge_bytes(src, name)
        self.used_audio_seconds += seconds
        return seconds


# --- prompt --------------------------------------------------------------------------------

# a placeholder right after the literal-text mark (gemma_mlx.text.LITERAL_OPEN) is message text, not media
_PLACEHOLDER = re.compile(f"(?<!\ue000)(?:{re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)})")


def expand_media_tokens(
    text: str, image_counts: Sequence[int], audio_counts: Sequence[int | Sequence[int]]
) -> str:
    """Replace, in one left-to-right pass (the reference's `get_text_with_replacements`), the i-th
    `<|image|>` with `<|image>` + `<|image|>` x image_counts[i] + `<image|>` (`replace_image_token`)
    and the j-th `<|audio|>` with `<|audio>` + `<|audio|>` x audio_counts[j] + `<audio|>`
    (`replace_audio_token`). An audio entry that is a list of frame counts (a long clip cut by
    `split_audio`) becomes that many consecutive audio blocks. Placeholder and media counts must
    match (`MediaError`, a ValueError, as the reference's `validate_inputs`)."""
    found = [m.group() for m in _PLACEHOLDER.finditer(text)]
    for token, counts, kind in (
        (IMAGE_TOKEN, image_counts, "images"),
        (AUDIO_TOKEN, audio_counts, "audio clips"),
    ):
        if found.count(token) != len(counts):
            raise MediaError(
                f"the prompt has {found.count(token)} {token} placeholders for {len(counts)} {kind}"
            )
    images = iter(BOI + IMAGE_TOKEN * n + EOI for n in image_counts)
    audio = iter(
        "".join(BOA + AUDIO_TOKEN * n + EOA for n in (c if isinstance(c, Sequence) else [c]))
        for c in audio_counts
    )
    return _PLACEHOLDER.sub(lambda m: next(images if m.group() == IMAGE_TOKEN else audio), text)


def synthetic_image(seed: int = 0, height: int = 192, width: int | None = None) -> np.ndarray:
    """A deterministic RGB test image (HWC uint8): colour gradients, stripes and a little noise,
    varied by `seed` (calibration prompts, media benchmarks)."""
    width = width or height
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    f = rng.uniform(2, 12, 3)
    channels = [
        0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * x + seed * 0.1)),
        y * (1 - x),
        0.5 + 0.5 * np.cos(2 * np.pi * f[2] * (x + y) / 2),
    ]
    a = np.stack(channels, -1) * 0.85 + 0.15 * rng.random((height, width, 3))
    return np.clip(a * 255, 0, 255).astype(np.uint8)


def synthetic_audio(seed: int = 0, seconds: float = 2.0) -> np.ndarray:
    """A deterministic mono clip at `SAMPLE_RATE`, float32: a chirp, a steady tone and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0, f1 = rng.uniform(100, 400), rng.uniform(800, 3000)
    chirp = np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t)
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 1000) * t)
    return (0.5 * (chirp + tone) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
