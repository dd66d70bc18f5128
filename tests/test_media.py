"""Image/audio preprocessing and prompt expansion against transformers' Gemma 4 unified processor
(`Gemma4UnifiedImageProcessor`, `Gemma4UnifiedAudioFeatureExtractor`, `Gemma4UnifiedProcessor`),
every format and mode, and bad input. Test media are generated in tmp dirs."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image, ImageFilter
from tiny import rewrite_config, save_tokenizer

pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
    Gemma4UnifiedAudioFeatureExtractor,
)
from transformers.models.gemma4_unified.processing_gemma4_unified import (
    get_aspect_ratio_preserving_size,  # the image processor's copy, importable without torchvision
)

from gemma_mlx import generate, load, media
from gemma_mlx.media import (
    BUDGETS,
    AudioInput,
    MediaError,
    batch_audio,
    batch_images,
    expand_media_tokens,
    load_audio,
    load_image,
    preprocess_audio,
    preprocess_image,
    split_audio,
    target_size,
)

# Pillow's bicubic vs torchvision's (uint8, antialiased), measured over PARITY_SIZES x every budget
# x {noise, photo-like} with torch 2.14.1 + torchvision 0.29.1 + Pillow 13.0: see test_pixels_match.
PIXEL_MAX_ERR = 2 / 255  # measured worst 2/255 (0.00784)
PIXEL_MEAN_ERR = 0.01 / 255  # measured worst per-image mean 0.0095/255; all 145 pairs: 0.0048/255

SIZES = [  # (height, width)
    (1, 2000), (2000, 1), (1, 1), (2, 3), (10, 10), (47, 48), (48, 48), (1024, 1024), (1080, 1920),
    (1920, 1080), (333, 777), (4000, 3000), (17, 4096), (96, 5000), (5000, 96), (720, 1280),
    (1, 100_000), (3, 7), (49, 4801), (336, 480), (768, 768), (1584, 1584), (99_999, 2),
]  # fmt: skip
PARITY_SIZES = [
    (1, 2000), (2000, 1), (1, 1), (10, 10), (37, 53), (47, 48), (64, 2000), (2000, 64), (333, 777),
    (1024, 1024), (1080, 1920), (1920, 1080), (97, 3001), (17, 4096), (3000, 4000),
]  # fmt: skip


def photo(h: int, w: int, seed: int, noise: bool) -> Image.Image:
    """Uniform noise (resampling's worst case) or a smooth gradient with mild blur and texture."""
    rng = np.random.default_rng(seed)
    if noise:
        return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), 0.5 + 0.5 * np.sin((xx + yy) / 9)], -1) * 220
    base += rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- image geometry ------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_target_size_matches_reference(budget):
    for h, w in SIZES + [(h, w) for h in range(1, 60, 7) for w in range(1, 3000, 37)]:
        expected = get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
        assert target_size(h, w, budget) == expected, (h, w)
        assert (expected[0] // 48) * (expected[1] // 48) <= budget


def test_known_sizes_and_budgets():
    assert target_size(1024, 1024, 280) == (768, 768)  # 256 tokens
    assert target_size(1080, 1920, 280) == (576, 1056)  # 264 tokens
    assert [target_size(1024, 1024, b)[0] // 48 for b in BUDGETS] == [8, 11, 16, 23, 33]
    assert target_size(1, 2000, 70) == (48, 3360)  # zero-side branch, capped at 70 x 48
    assert target_size(10, 10, 70) == (384, 384)  # upscaled
    for bad in (0, 100, 281, 2240):
        with pytest.raises(ValueError, match="max_soft_tokens"):
            preprocess_image(np.zeros((8, 8, 3), np.uint8), bad)
    with pytest.raises(MediaError, match="max_soft_tokens"):  # checked before the file is touched
        preprocess_image("does-not-exist.png", 100)


def test_patches_are_48px_hwc_in_raster_order():
    """A 336x480 image is already 7x10 patches at budget 70 (no resize): each 6912-vector is
    (row, col, channel) of one 48x48 patch, patches row-major, positions (x=column, y=row)."""
    img = np.random.default_rng(0).integers(0, 256, size=(336, 480, 3), dtype=np.uint8)
    out = preprocess_image(img, max_soft_tokens=70)
    assert out.num_soft_tokens == 70 and out.pixel_values.shape == (70, 6912)
    assert out.pixel_values.dtype == np.float32 and out.position_ids.dtype == np.int32
    for k in range(70):
        y, x = divmod(k, 10)
        patch = img[48 * y : 48 * y + 48, 48 * x : 48 * x + 48].ravel().astype(np.float32) / 255
        np.testing.assert_allclose(out.pixel_values[k], patch, rtol=0, atol=1e-7)
        assert tuple(out.position_ids[k]) == (x, y)
    big = preprocess_image(img, max_soft_tokens=140)  # upscaled to 432x672: 9 x 14, then padding
    assert big.num_soft_tokens == 126 and tuple(big.position_ids[125]) == (13, 8)
    assert (big.position_ids[126:] == -1).all() and not big.pixel_values[126:].any()


def test_batch_images():
    a, b = preprocess_image(np.zeros((50, 90, 3), np.uint8), 70), preprocess_image(np.ones((9, 9)), 70)
    pv, pos, counts = batch_images([a, b])
    assert pv.shape == (2, 70, 6912) and pos.shape == (2, 70, 2) and counts == [a.num_soft_tokens, 64]
    assert pv[1, :64].min() == 1.0 and (pos[1, 64:] == -1).all()
    with pytest.raises(MediaError, match="same max_soft_tokens"):
        batch_images([a, preprocess_image(np.zeros((9, 9)), 140)])
    with pytest.raises(MediaError):
        batch_images([])


# --- image parity with transformers' processor (torchvision) ------------------------------


@pytest.fixture(scope="module")
def image_processor():
    pytest.importorskip("torchvision")  # a guard only: CI installs torch 2.14.1 + torchvision 0.29.1
    from transformers import Gemma4UnifiedImageProcessor

    return Gemma4UnifiedImageProcessor(do_normalize=False, pooling_kernel_size=3)


def test_pixels_match_reference_processor(image_processor):
    """Token count, patch grid and every position id (padding included) are identical; padding
    rows are zero; pixels differ only by resampling rounding (torchvision's native uint8 bicubic vs
    Pillow's fixed point), within the measured PIXEL_MAX_ERR / PIXEL_MEAN_ERR. Images already the
    target size are not resampled by either side and match bit for bit."""
    worst_max, worst_mean, total, count = 0.0, 0.0, 0.0, 0
    for i, (h, w) in enumerate(PARITY_SIZES):
        for noise in (True, False) if h * w < 4e6 else (True,):  # the 12 Mpx photo costs 2 s to make
            img = photo(h, w, i, noise)
            for budget in BUDGETS:
                ref = image_processor(images=[img], max_soft_tokens=budget, return_tensors="np")
                ours = preprocess_image(img, budget)
                n = ours.num_soft_tokens
                assert ref["num_soft_tokens_per_image"] == [n], (h, w, budget)
                np.testing.assert_array_equal(ref["image_position_ids"][0], ours.position_ids)
                assert ref["pixel_values"].shape == (1, budget, 6912) and not ours.pixel_values[n:].any()
                diff = np.abs(ref["pixel_values"][0, :n] - ours.pixel_values[:n])
                worst_max, worst_mean = max(worst_max, diff.max()), max(worst_mean, diff.mean())
                total, count = total + diff.sum(), count + diff.size
    print(f"pixel error x255: max {worst_max * 255:.3f}, worst image mean {worst_mean * 255:.4f}, "
          f"overall mean {total / count * 255:.5f}")  # fmt: skip
    assert worst_max <= PIXEL_MAX_ERR + 1e-6 and worst_mean <= PIXEL_MEAN_ERR
    exact = photo(336, 480, 0, True)  # already 7 x 10 patches at budget 70: no resampling anywhere
    ref = image_processor(images=[exact], max_soft_tokens=70, return_tensors="np")
    np.testing.assert_array_equal(ref["pixel_values"][0], preprocess_image(exact, 70).pixel_values)


def test_single_pass_pillow_resize_would_be_worse(image_processor):
    """Why `resize_image` runs the two passes itself: Pillow's single `resize` runs the vertical
    pass first here (width up, height down) and misses torchvision by far more."""
    img = photo(64, 2000, 0, True)
    ref = image_processor(images=[img], max_soft_tokens=70, return_tensors="np")["pixel_values"][0]
    h, w = target_size(64, 2000, 70)
    one = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255
    one = one.reshape(h // 48, 48, w // 48, 48, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 6912)
    assert np.abs(one - ref[: len(one)]).max() > 10 / 255
    assert np.abs(preprocess_image(img, 70).pixel_values - ref).max() <= PIXEL_MAX_ERR + 1e-6


# --- image formats, modes, EXIF --------------------------------------------------------------


def source(mode: str) -> Image.Image:
    """A 24x16 image in `mode` with distinct values in 8x8 blocks (and partial transparency)."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    rgb = Image.fromarray(blocks)
    alpha = Image.fromarray(np.array([[0, 128, 255], [255, 60, 0]], np.uint8).repeat(8, 0).repeat(8, 1))
    gray = np.asarray(rgb.convert("L"), np.float64)
    if mode == "RGBA":
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), alpha))
    if mode in ("P", "P+transparency"):
        p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        if mode != "P":
            p.info["transparency"] = int(np.asarray(p)[0, 0])
        return p
    if mode == "I;16":
        return Image.fromarray((gray * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((gray * 257).astype(np.int32))
    if mode == "F":
        return Image.fromarray((gray / 255).astype(np.float32))
    return rgb.convert(mode)


LOSSLESS = [
    ("PNG", m, {}) for m in ("RGB", "RGBA", "LA", "L", "P", "P+transparency", "1", "I;16")
] + [
    ("TIFF", m, {}) for m in ("RGB", "RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I", "F")
] + [("BMP", m, {}) for m in ("RGB", "L", "P", "1")] + [
    ("GIF", "P", {}), ("GIF", "P+transparency", {}), ("GIF", "L", {}),
    ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"lossless": True, "exact": True}),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "mode", "kw"), LOSSLESS, ids=[f"{f}-{m}" for f, m, _ in LOSSLESS])
def test_lossless_formats_round_trip(tmp_path, fmt, mode, kw):
    src = source(mode)
    if mode == "P+transparency":
        kw = {**kw, "transparency": src.info["transparency"]}
    path = tmp_path / f"x.{fmt.lower()}"
    src.save(path, format=fmt, **kw)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (24, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(load_image(src)))
    assert preprocess_image(path, 70).num_soft_tokens == 60  # 16x24 upscaled to 288x480


@pytest.mark.parametrize(
    ("fmt", "mode"), [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB"), ("WEBP", "RGBA")]
)
def test_lossy_formats_round_trip(tmp_path, fmt, mode):
    src = photo(16, 24, 0, False).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    src.save(path, format=fmt, quality=95)
    diff = np.abs(np.asarray(load_image(path), float) - np.asarray(load_image(src), float))
    assert load_image(path).size == (24, 16) and diff.mean() < 3


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert tuple(np.asarray(load_image(path))[5, 5]) == (250, 0, 0)


@pytest.mark.parametrize(
    "mode", ["RGBA", "LA", "P", "P+transparency", "L", "1", "CMYK", "YCbCr", "HSV", "RGB"]
)
def test_modes_match_reference_conversion(mode):
    """Transparency is composited onto white exactly as the reference's `convert_to_rgb` (what the
    processor applies to PIL inputs); other modes go through Pillow's `convert("RGB")` as there."""
    src = source(mode)
    np.testing.assert_array_equal(np.asarray(load_image(src)), convert_to_rgb(src, return_numpy=True))
    if mode == "RGBA":
        assert tuple(np.asarray(load_image(src))[0, 0]) == (255, 255, 255)  # alpha 0 -> white


def test_rgb_with_transparency_key_and_alpha_arrays():
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    img.info["transparency"] = (10, 20, 30)
    assert tuple(np.asarray(load_image(img))[0, 0]) == (255, 255, 255)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3], rgba[2:, :, 3] = 200, 0, 255
    out = np.asarray(load_image(rgba))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[3, 0]) == (200, 0, 0)


def test_high_bit_depth_is_scaled_not_clipped():
    """The one deliberate departure from the reference: Pillow's convert("RGB") clips 16-bit
    values at 255 (a 16-bit photo turns white); we scale to 8 bits."""
    ramp = np.array([[0, 32768, 65535]], np.uint16)
    assert np.asarray(load_image(Image.fromarray(ramp)))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(Image.fromarray(ramp.astype(np.int32))))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(Image.fromarray(np.array([[0, 77, 255]], np.int32))))[0, :, 0].tolist() == [
        0,
        77,
        255,
    ]
    floats = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert np.asarray(load_image(Image.fromarray(floats)))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(Image.fromarray(floats * 255)))[0, :, 0].tolist() == [0, 128, 255]


def test_arrays():
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    assert load_image(np.zeros((5, 7, 1), np.uint8)).size == (7, 5)
    assert load_image(np.zeros((3, 5, 7), np.uint8)).size == (7, 5)  # CHW
    assert np.asarray(load_image(np.full((4, 4, 3), 0.5, np.float32)))[0, 0, 0] == 128
    assert np.asarray(load_image(np.ones((4, 4), bool)))[0, 0, 0] == 255
    for bad, match in [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), 200.0), r"must be in \[0, 1\]"),
        (np.zeros((4, 4, 3), np.int64), "unsupported image array type"),
        (np.zeros((5, 5, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((0, 4, 3), np.uint8), "the image array is empty"),
    ]:
        with pytest.raises(MediaError, match=match):
            load_image(bad)
    with pytest.raises(MediaError, match="expected a path"):
        load_image(123)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    """All eight EXIF orientations come out upright, as transformers' `load_image` gives them."""
    from transformers.image_utils import load_image as reference_load_image

    stored = source("RGB")
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "x.png"
    stored.save(path, exif=exif)
    out = np.asarray(load_image(path))
    np.testing.assert_array_equal(out, np.asarray(reference_load_image(str(path))))
    assert out.shape[:2] == ((16, 24) if orientation < 5 else (24, 16))
    if orientation == 6:  # rotate 90 degrees clockwise to display: top-left comes from bottom-left
        assert tuple(out[0, 0]) == tuple(np.asarray(stored)[-1, 0])


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels (no real image data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_bad_images_are_named(tmp_path, monkeypatch):
    png, jpeg = encode(source("RGB"), "PNG"), encode(photo(64, 64, 0, False), "JPEG")
    cases = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.png": b"hello, not an image",
        "bomb.png": png_header(30_000, 30_000),  # 900 Mpx claimed by a 60-byte file
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
    for name in ("missing.png", ""):
        with pytest.raises(MediaError, match=f"{tmp_path / name}: cannot read"):
            load_image(tmp_path / name)  # missing file, directory
    with pytest.raises(MediaError, match="<bytes>: not an image, or a format Pillow cannot read"):
        load_image(b"GIF89a garbage")
    monkeypatch.setattr(media, "MAX_PIXELS", 1000)  # our own cap, checked before decoding
    (tmp_path / "big.png").write_bytes(encode(Image.new("1", (50, 30)), "PNG"))
    with pytest.raises(MediaError, match=r"big.png: 50x30 pixels is more than the 1,000 allowed"):
        load_image(tmp_path / "big.png")
    with pytest.raises(MediaError, match="50x30 pixels"):
        load_image(Image.new("RGB", (50, 30)))


# --- audio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 639, 640, 641, 16000 + 123, 16000 * 7 + 5])
def test_frames_match_reference_extractor(length):
    wave = np.random.default_rng(length).normal(size=length).astype(np.float32)
    ref = Gemma4UnifiedAudioFeatureExtractor()(wave, return_tensors="np")
    ours = preprocess_audio(wave)
    assert ours.num_frames == int(ref["input_features_mask"][0].sum()) == -(-length // 640)
    assert ours.features.dtype == np.float32
    np.testing.assert_array_equal(ours.features, ref["input_features"][0])
    np.testing.assert_array_equal(preprocess_audio(wave.astype(np.float64)).features, ours.features)


def test_batch_matches_reference_padding():
    rng = np.random.default_rng(0)
    waves = [rng.normal(size=n).astype(np.float32) for n in (700, 3000, 1)]
    ref = Gemma4UnifiedAudioFeatureExtractor()(waves, return_tensors="np")
    feats, mask = batch_audio([preprocess_audio(w) for w in waves])
    np.testing.assert_array_equal(feats, ref["input_features"])
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    with pytest.raises(MediaError):
        batch_audio([])


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave[:16000] * np.hanning(16000)))
    return float(np.argmax(spectrum))  # 1 Hz bins over one second at 16 kHz


FILES = [
    ("WAV", "PCM_16", (8000, 16000, 44100, 48000)),
    ("WAV", "PCM_24", (16000, 44100)),
    ("WAV", "PCM_32", (48000,)),
    ("WAV", "FLOAT", (16000, 44100)),
    ("WAV", "DOUBLE", (22050,)),
    ("FLAC", "PCM_16", (8000, 16000, 44100, 48000)),
    ("FLAC", "PCM_24", (48000,)),
    ("OGG", "VORBIS", (16000, 44100, 48000)),
    ("OGG", "OPUS", (16000, 48000)),
    ("MP3", "MPEG_LAYER_III", (16000, 44100)),
    ("AIFF", "PCM_16", (44100,)),
]
FILE_CASES = [(f, s, r) for f, s, rates in FILES for r in rates]


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"), FILE_CASES, ids=[f"{f}-{s}-{r}" for f, s, r in FILE_CASES]
)
def test_audio_files_resample_and_downmix(tmp_path, fmt, subtype, rate):
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    stereo = np.stack([sine(440, rate), 0.5 * sine(440, rate)], 1)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, stereo, rate, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 16000) <= 1200  # codec delay
    assert abs(peak_hz(wave) - 440) <= 1  # the tone survives decoding and resampling
    assert 0.3 < np.abs(wave).max() < 0.45  # mean of 0.5 and 0.25 amplitude channels
    if fmt in ("WAV", "FLAC", "AIFF") and rate == 16000:  # lossless at 16 kHz: the samples themselves
        np.testing.assert_allclose(wave, stereo.mean(1), rtol=0, atol=2**-15)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_resampling_keeps_frequency_and_length(rate):
    for freq in (100, 440, 3000):
        wave = load_audio(sine(freq, rate, 1.5), rate)
        assert wave.dtype == np.float32 and abs(len(wave) - 24000) <= 1
        assert abs(peak_hz(wave[4000:]) - freq) <= 1
        assert abs(np.abs(wave[4000:20000]).max() - 0.5) < 0.01  # no gain change
    if rate > 16000:  # content above the new Nyquist is filtered out, not aliased
        assert np.abs(load_audio(sine(9000, rate), rate)[2000:-2000]).max() < 0.01


def test_audio_arrays():
    clip = sine(440, 16000)
    np.testing.assert_array_equal(load_audio(clip, 16000), clip)  # 16 kHz float: untouched
    np.testing.assert_array_equal(load_audio(clip.astype(np.float64), 16000), clip)
    pcm = (clip * 32767).astype(np.int16)
    np.testing.assert_array_equal(load_audio(pcm, 16000), pcm / np.float32(32768))  # as soundfile scales
    np.testing.assert_allclose(load_audio((clip * 127 + 128).astype(np.uint8), 16000), clip, atol=0.02)
    np.testing.assert_allclose(load_audio((clip * 2**31).astype(np.int32), np.int64(16000)), clip, atol=1e-6)
    left, right = sine(300, 16000), sine(500, 16000)
    both = np.stack([left, right], 1)
    np.testing.assert_array_equal(load_audio(both, 16000), (left + right) / 2)  # [samples, channels]
    np.testing.assert_array_equal(load_audio(both.T, 16000), (left + right) / 2)  # [channels, samples]
    quad = np.stack([left, right, -left, right], 1)
    np.testing.assert_allclose(load_audio(quad, 16000), right / 2, atol=1e-7)
    assert len(load_audio((sine(100, 32000) * 32767).astype(np.int16), 32000)) == 16000


def test_audio_errors(tmp_path):
    cases = [
        (np.zeros(10, np.float32), None, "give the sampling rate"),
        (np.array([0.1, np.nan], np.float32), 16000, "NaN or infinite"),
        (np.array([0.1, np.inf], np.float32), 16000, "NaN or infinite"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.zeros((2, 0), np.float32), 16000, "empty"),
        (np.zeros((2, 2, 2), np.float32), 16000, r"got shape \(2, 2, 2\)"),
        (np.array(["a"]), 16000, "unsupported sample type"),
        (np.zeros(4, complex), 16000, "unsupported sample type"),
        (np.zeros(4, bool), 16000, "unsupported sample type"),
        (np.zeros(4, np.float32), 0, "invalid sampling rate"),
        (np.zeros(4, np.float32), float("nan"), "invalid sampling rate"),
        (b"", None, "<bytes>: the file is empty"),
        (b"not audio at all", None, "<bytes>: not a readable audio file"),
        (123, None, "expected a path"),
    ]
    for src, rate, match in cases:
        with pytest.raises(MediaError, match=match):
            load_audio(src, rate)
    good = io.BytesIO()
    sf.write(good, sine(440, 16000), 16000, format="WAV", subtype="PCM_16")
    wav = good.getvalue()
    unsupported = bytearray(wav)
    unsupported[20:22] = struct.pack("<H", 0x0161)  # WAV format tag: Windows Media Audio
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.array([0.1, np.nan, 0.2], np.float32), 16000, format="WAV", subtype="FLOAT")
    empty_wav = io.BytesIO()
    sf.write(empty_wav, np.zeros(0, np.float32), 16000, format="WAV", subtype="PCM_16")
    files = {
        "text.wav": (b"hello, not audio", "not a readable audio file"),
        "header.wav": (b"RIFF....WAVEfmt garbage", "not a readable audio file"),
        "truncated.wav": (wav[:30], "not a readable audio file"),
        "codec.wav": (bytes(unsupported), "not a readable audio file"),
        "nan.wav": (nan_wav.getvalue(), "NaN or infinite"),
        "no-samples.wav": (empty_wav.getvalue(), "the audio is empty"),
        "zero.ogg": (b"", "the file is empty"),
    }
    for name, (data, match) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=f"{name}: .*({match})"):
            load_audio(tmp_path / name)
    for name in ("missing.wav", ""):  # missing file, directory
        with pytest.raises(MediaError, match=f"{tmp_path / name}: cannot read the file"):
            load_audio(tmp_path / name)
    for bad in (np.zeros(0, np.float32), np.zeros((2, 640), np.float32)):
        with pytest.raises(MediaError, match="non-empty mono waveform"):
            preprocess_audio(bad)


def test_silence_is_valid_input():
    """The reference extractor has no silence check; an all-zero frame stays all zero through the
    model's weightless per-frame RMSNorm (x / sqrt(mean(x^2) + eps))."""
    silent = load_audio(np.zeros(16000, np.int16), 16000)
    out = preprocess_audio(silent)
    assert out.num_frames == 25 and not out.features.any()
    ref = Gemma4UnifiedAudioFeatureExtractor()(silent, return_tensors="np")
    np.testing.assert_array_equal(ref["input_features"][0], out.features)
    normed = out.features / np.sqrt((out.features**2).mean(-1, keepdims=True) + 1e-6)
    assert np.isfinite(normed).all() and not normed.any()


def test_long_audio_becomes_30s_blocks():
    wave = np.random.default_rng(0).normal(size=16000 * 70 + 1).astype(np.float32)
    clips = split_audio(wave)
    assert [preprocess_audio(c).num_frames for c in clips] == [750, 750, 251]
    # cuts on frame boundaries: the clips' frames are exactly the frames of the whole waveform
    np.testing.assert_array_equal(
        np.concatenate([preprocess_audio(c).features for c in clips]), preprocess_audio(wave).features
    )
    assert [len(c) for c in split_audio(wave[: 16000 * 30])] == [480000]
    assert [preprocess_audio(c).num_frames for c in split_audio(wave[:16000], max_seconds=0.1)] == [
        2
    ] * 12 + [1]
    with pytest.raises(MediaError, match="at least one"):
        split_audio(wave, max_seconds=0.01)
    with pytest.raises(MediaError, match="empty"):
        split_audio(wave[:0])


# --- prompt expansion ----------------------------------------------------------------------


def test_expand_media_tokens():
    text = expand_media_tokens("a<|image|>b<|audio|>c<|image|>", [2, 1], [3])
    assert text == (
        "a<|image><|image|><|image|><image|>b<|audio><|audio|><|audio|><|audio|><audio|>c<|image><|image|><image|>"
    )
    text = expand_media_tokens("a<|audio|>b", [], [[2, 1]])  # one long clip in two 30 s blocks
    assert text == "a<|audio><|audio|><|audio|><audio|><|audio><|audio|><audio|>b"
    assert expand_media_tokens("plain text <|image>", [], []) == "plain text <|image>"
    for args, match in [
        (("<|image|>", [1, 2], []), r"1 <\|image\|> placeholders for 2 images"),
        (("<|image|><|image|>", [1], []), r"2 <\|image\|> placeholders for 1 images"),
        (("<|audio|>", [], []), r"1 <\|audio\|> placeholders for 0 audio clips"),
        (("hi", [], [4]), r"0 <\|audio\|> placeholders for 1 audio clips"),
    ]:
        with pytest.raises(ValueError, match=match):
            expand_media_tokens(*args)


def test_expansion_matches_reference_processor():
    """Token ids from `Gemma4UnifiedProcessor` (its `replace_image_token` / `replace_audio_token`
    through `get_text_with_replacements`) equal our expansion with our own token counts."""
    pytest.importorskip("torchvision")
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Gemma4UnifiedImageProcessor, Gemma4UnifiedProcessor, PreTrainedTokenizerFast
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import Gemma4UnifiedVideoProcessor

    specials = {
        "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
        "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    }  # fmt: skip
    word = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=word, unk_token="<unk>", pad_token="<pad>", extra_special_tokens=specials
    )
    ref = Gemma4UnifiedProcessor(
        feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
        image_processor=Gemma4UnifiedImageProcessor(do_normalize=False),
        tokenizer=tok,
        video_processor=Gemma4UnifiedVideoProcessor(),
    )
    images = [photo(100, 60, 0, False), photo(40, 400, 1, False)]
    audio = [sine(440, 16000, 0.3), sine(440, 16000, 0.05)]
    text = "a <|image|> b <|audio|> a <|image|><|audio|> b"
    out = ref(text=[text], images=[images], audio=audio, max_soft_tokens=70, return_tensors="np")
    ours = expand_media_tokens(
        text,
        [preprocess_image(i, 70).num_soft_tokens for i in images],
        [preprocess_audio(a).num_frames for a in audio],
    )
    assert tok(ours)["input_ids"] == out["input_ids"][0].tolist()
    with pytest.raises(ValueError):  # the reference also refuses a count mismatch
        ref(text=[text], images=[images[:1]], audio=audio)


def test_audio_input_dataclass():
    clip = preprocess_audio(np.ones(700, np.float32))
    assert (
        isinstance(clip, AudioInput) and clip.features.shape == (2, 640) and clip.features[1, 60:].sum() == 0
    )


# --- end to end through the processor and the model -----------------------------------------


@pytest.fixture(scope="module")
def chat_model(unified, tmp_path_factory):
    out = tmp_path_factory.mktemp("media") / "ckpt"
    shutil.copytree(unified[0], out)
    save_tokenizer(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    # the tiny vocabulary has its own ids for the placeholders
    rewrite_config(out, lambda c: c.update(image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"]))
    return out, *load(out)


def test_chat_with_image_and_audio(chat_model, tmp_path):
    path, model, processor = chat_model
    img = tmp_path / "cat.png"
    img.write_bytes(encode(Image.new("RGB", (200, 120), (10, 200, 30)), "PNG"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(img)},
                {"type": "text", "text": "What is this?"},
                {"type": "audio", "audio": sine(300, 16000, 0.5), "sampling_rate": 16000},
            ],
        }
    ]
    inputs = processor.prepare(messages, max_soft_tokens=70)
    assert (
        inputs.ids.count(model.config.image_token_id) == preprocess_image(str(img), 70).num_soft_tokens == 60
    )
    assert inputs.ids.count(model.config.audio_token_id) == 13 and inputs.pixel_values.shape == (1, 70, 6912)
    logits = model(mx.array([inputs.ids]), **inputs.model_kwargs())[0, -1]
    # the media change the prediction, and generation feeds them exactly like the direct call
    assert not np.allclose(np.array(logits), np.array(model(mx.array([inputs.ids]))[0, -1]))
    greedy = int(mx.argmax(logits).item())
    assert generate(model, processor, messages, max_tokens=1, max_soft_tokens=70).tokens == [greedy]


def test_more_media_than_context(chat_model, tmp_path):
    path, _, _ = chat_model
    small = tmp_path / "small"
    shutil.copytree(path, small)
    rewrite_config(small, lambda c: c["text_config"].update(max_position_embeddings=200))
    model, processor = load(small)
    parts = [{"type": "image", "image": np.zeros((480, 480, 3), np.uint8)}, {"type": "text", "text": "hi"}]
    with pytest.raises(ValueError, match="context is 200 tokens"):
        generate(model, processor, [{"role": "user", "content": parts}], max_tokens=4)
