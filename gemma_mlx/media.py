"""Image and audio preprocessing for the encoder-free 12B (Pillow, numpy, soundfile, soxr).

Images: RGB in [0, 1], aspect-preserving resize to a soft-token budget, cut into 48x48 HWC
patches in raster order with (x, y) patch positions (transformers' `Gemma4UnifiedImageProcessor`).
Audio: mono 16 kHz float waveform cut into 640-sample frames (`Gemma4UnifiedAudioFeatureExtractor`).
No model code here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PATCH = 48  # 16-px patches merged 3x3
BUDGETS = (70, 140, 280, 560, 1120)
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
SAMPLE_RATE = 16_000
FRAME = 640  # samples per audio soft token (40 ms)
MAX_CLIP_FRAMES = 750  # the model's documented 30 s per audio block


class MediaError(ValueError):
    """An image or audio input that cannot be used; the message names it."""


def _name(src: Any) -> str:
    return str(src) if isinstance(src, str | Path) else f"<{type(src).__name__}>"


# --- images --------------------------------------------------------------------------------


def load_image(src: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """An RGB image from a path, encoded bytes, a PIL image or an HWC array (uint8, or float in
    [0, 1]). EXIF orientation is applied; transparency is composited onto white (as the
    reference's `convert_rgb`); GIFs give their first frame."""
    name = _name(src)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise MediaError(f"{name}: expected an HWC array with 1, 3 or 4 channels, got shape {a.shape}")
        if a.dtype != np.uint8:
            if not np.isfinite(a).all():
                raise MediaError(f"{name}: the array contains NaN or infinite values")
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        src = Image.fromarray(a if a.shape[-1] != 1 else a[..., 0])
    if not isinstance(src, Image.Image):
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
        except OSError as e:
            raise MediaError(f"{name}: cannot read the file ({e.strerror or e})") from None
        if not data:
            raise MediaError(f"{name}: the file is empty")
        try:
            src = Image.open(io.BytesIO(data))
            if src.width * src.height > MAX_PIXELS:
                raise MediaError(
                    f"{name}: {src.width}x{src.height} pixels is more than the {MAX_PIXELS:,} allowed"
                )
            src.load()
        except MediaError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(f"{name}: not a readable image ({e})") from None
    image = ImageOps.exif_transpose(src) or src
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: scale to 8 bits
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def target_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """The resized (height, width): the largest multiples of 48 within the token budget that keep
    the aspect ratio (transformers' `get_aspect_ratio_preserving_size`, zero-side branch included)."""
    if max_soft_tokens not in BUDGETS:
        raise MediaError(f"max_soft_tokens={max_soft_tokens}: expected one of {BUDGETS}")
    target_px = max_soft_tokens * 9 * 16 * 16
    factor = math.sqrt(target_px / (height * width))
    h, w = math.floor(factor * height / PATCH) * PATCH, math.floor(factor * width / PATCH) * PATCH
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
    pixel_values: np.ndarray  # [max_soft_tokens, 6912] float32 in [0, 1], zero rows for padding
    position_ids: np.ndarray  # [max_soft_tokens, 2] int32 (x=column, y=row), (-1, -1) for padding
    num_soft_tokens: int


def preprocess_image(image: Any, max_soft_tokens: int = 280) -> ImageInput:
    """Resize (bicubic, antialiased) into the budget and cut into 48x48 patches in raster order."""
    img = load_image(image)
    h, w = target_size(img.height, img.width, max_soft_tokens)
    pixels = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    rows, cols = h // PATCH, w // PATCH
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    n = rows * cols
    pv = np.zeros((max_soft_tokens, patches.shape[1]), np.float32)
    pv[:n] = patches
    pos = np.full((max_soft_tokens, 2), -1, np.int32)
    ys, xs = np.divmod(np.arange(n), cols)
    pos[:n, 0], pos[:n, 1] = xs, ys
    return ImageInput(pv, pos, n)


def batch_images(images: list[ImageInput]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`pixel_values [n, P, 6912]`, `image_position_ids [n, P, 2]` and the soft-token counts."""
    return (
        np.stack([i.pixel_values for i in images]),
        np.stack([i.position_ids for i in images]),
        [i.num_soft_tokens for i in images],
    )


# --- audio ---------------------------------------------------------------------------------


def load_audio(src: str | Path | bytes | np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
    """A mono float32 waveform at 16 kHz from a file (anything libsndfile reads: WAV, FLAC, OGG,
    ...), encoded bytes, or an array (`sampling_rate` required; [samples] or [samples, channels]).
    Channels are averaged; other rates are resampled with soxr (high quality)."""
    import soundfile as sf

    name = _name(src)
    if isinstance(src, np.ndarray):
        if sampling_rate is None:
            raise MediaError(f"{name}: give the sampling rate of an audio array")
        data, rate = np.asarray(src), sampling_rate
        if not np.issubdtype(data.dtype, np.number):
            raise MediaError(f"{name}: unsupported sample type {data.dtype}")
        if np.issubdtype(data.dtype, np.integer):  # PCM integers to [-1, 1]
            data = data / float(np.iinfo(data.dtype).max)
    else:
        try:
            data, rate = sf.read(
                io.BytesIO(src) if isinstance(src, bytes) else str(src), dtype="float32", always_2d=True
            )
        except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
            raise MediaError(f"{name}: not a readable audio file ({e})") from None
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.ndim != 1:
        raise MediaError(f"{name}: expected [samples] or [samples, channels], got shape {data.shape}")
    if data.size == 0:
        raise MediaError(f"{name}: the audio is empty")
    if not np.isfinite(data).all():
        raise MediaError(f"{name}: the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        import soxr

        data = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return data


@dataclass
class AudioInput:
    features: np.ndarray  # [num_frames, 640] float32
    num_frames: int


def preprocess_audio(waveform: np.ndarray) -> AudioInput:
    """Zero-pad to a multiple of 640 samples and cut into frames (a partly padded last frame is a
    real frame, as in the reference)."""
    n = math.ceil(len(waveform) / FRAME)
    padded = np.zeros(n * FRAME, np.float32)
    padded[: len(waveform)] = waveform
    return AudioInput(padded.reshape(n, FRAME), n)


def split_audio(waveform: np.ndarray, max_frames: int = MAX_CLIP_FRAMES) -> list[np.ndarray]:
    """Cut a long waveform into consecutive clips of at most 30 s. The model was trained on
    blocks of up to 750 soft tokens; longer audio becomes several consecutive audio blocks."""
    step = max_frames * FRAME
    return [waveform[i : i + step] for i in range(0, len(waveform), step)]


def batch_audio(clips: list[AudioInput]) -> tuple[np.ndarray, np.ndarray]:
    """`input_features [m, F, 640]` zero-padded to the longest clip, `input_features_mask [m, F]`."""
    frames = max(c.num_frames for c in clips)
    feats = np.zeros((len(clips), frames, FRAME), np.float32)
    mask = np.zeros((len(clips), frames), bool)
    for i, c in enumerate(clips):
        feats[i, : c.num_frames], mask[i, : c.num_frames] = c.features, True
    return feats, mask


# --- prompt --------------------------------------------------------------------------------


def expand_media_tokens(text: str, image_counts: list[int], audio_counts: list[int | list[int]]) -> str:
    """Replace each `<|image|>` with `<|image>` + n x `<|image|>` + `<image|>` and each
    `<|audio|>` with `<|audio>` + m x `<|audio|>` + `<audio|>`, in order (the reference's
    `replace_image_token` / `replace_audio_token`). An audio entry that is a list (a long clip
    split in 30 s pieces) becomes consecutive audio blocks."""
    for token, counts, (begin, end) in (
        ("<|image|>", image_counts, ("<|image>", "<image|>")),
        ("<|audio|>", audio_counts, ("<|audio>", "<audio|>")),
    ):
        parts = text.split(token)
        if len(parts) - 1 != len(counts):
            raise MediaError(f"the prompt has {len(parts) - 1} {token} placeholders for {len(counts)} inputs")
        blocks = [
            "".join(begin + token * n + end for n in (c if isinstance(c, list) else [c])) for c in counts
        ]
        text = parts[0] + "".join(b + rest for b, rest in zip(blocks, parts[1:], strict=True))
    return text
