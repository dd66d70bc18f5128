"""Regression tests for the library rows of the 2026-12-07 audit (`reliability-2026-12-07.md`):
Part 1's rows that were not clear, and Part 2's media rows F20-F26, each reproduced as the audit
did it and now answered with a named error or bounded work."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import soundfile as sf
from tiny import save_tokenizer

from gemma_mlx import media
from gemma_mlx.media import MediaBudget, MediaError, load_audio, load_image


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from gemma_mlx.processor import Processor

    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return Processor.from_dir(path)


def wav(samples: int, rate: int = 16_000, header_rate: int | None = None) -> bytes:
    """A PCM_16 WAV of quiet noise; `header_rate` overwrites the rate field (bytes 24..27) as the
    audit's `media/rate1_small.wav` did."""
    buf = io.BytesIO()
    wave = (np.random.default_rng(0).random(samples) * 0.1).astype(np.float32)
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    if header_rate is not None:
        data[24:28] = struct.pack("<I", header_rate)
    return bytes(data)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` RGB pixels but holds one byte of image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def never(*_a, **_k):
    raise AssertionError("decoded although the header already said no")


# --- Part 2 F20-F23, Part 1 row 6: audio rates and durations --------------------------------


@pytest.mark.parametrize("rate", [0, 0xFFFFFFFF])
def test_wav_header_rate_zero_or_huge_is_named_without_a_bytesio_repr(rate):
    """F20/F21: `Error opening <_io.BytesIO object at 0x7f...>: Internal error : SF_INFO struct
    incomplete.`"""
    with pytest.raises(MediaError, match=r"^<bytes>: invalid sampling rate") as e:
        load_audio(wav(1600, header_rate=rate))
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)


@pytest.mark.parametrize("samples", [1_600, 16_000])
def test_wav_that_declares_1_hz_is_refused_from_its_header(samples, monkeypatch, tmp_path):
    """F22/F23: a 3,244-byte WAV declaring 1 Hz was accepted as 1,600 s of audio and held the
    worker > 300 s; the 32 KB one cost 3.5 GB and 15 s. Refused before decoding."""
    data = wav(samples, header_rate=1)
    assert len(data) == 44 + 2 * samples
    monkeypatch.setattr(media.sf, "read", never)
    monkeypatch.setattr(media.soxr, "resample", never)
    with pytest.raises(MediaError, match=r"<bytes>: invalid sampling rate 1 Hz \(expected 1,000 to 768,000"):
        load_audio(data)
    (tmp_path / "rate1.wav").write_bytes(data)
    with pytest.raises(MediaError, match=r"rate1.wav: invalid sampling rate 1 Hz"):
        MediaBudget().add_audio(tmp_path / "rate1.wav")


def test_absurd_array_rate_is_named_not_an_empty_clip():
    """Part 1 row 6: `load_audio(np.zeros(1600), 10**9)` returned an empty array, and generate()
    then said `the audio is empty`."""
    with pytest.raises(MediaError, match=r"<ndarray>: invalid sampling rate 1,000,000,000 Hz"):
        load_audio(np.zeros(1600, np.float32), 10**9)


def test_audio_duration_is_checked_before_decoding(tmp_path, monkeypatch):
    """A small compressed file can decode to hours of samples: its header's duration is checked
    before libsndfile decodes it or soxr resamples it."""
    path = tmp_path / "silence.flac"
    sf.write(path, np.zeros(48_000 * 20, np.float32), 48_000, format="FLAC")  # 20 s of silence
    assert path.stat().st_size < 50_000
    assert len(load_audio(path, max_seconds=20)) == 16_000 * 20
    monkeypatch.setattr(media.sf, "read", never)
    with pytest.raises(MediaError, match=r"silence.flac: 20.0 s of audio \(960,000 samples at 48,000 Hz\) "):
        load_audio(path, max_seconds=19.5)
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 10.0)  # the library-wide default cap
    with pytest.raises(MediaError, match=r"more than the 10.0 s allowed"):
        load_audio(path)


# --- Part 2 F24-F26: image sizes and the per-request budget --------------------------------


def test_image_over_the_pixel_cap_is_refused_from_its_header(monkeypatch):
    """F24-F26: a 13000x13000 PNG (493 KB, 169 M pixels) was under the old 179 M cap and cost
    2 GB. The cap is now 50 M pixels, checked before decoding."""
    assert media.MAX_PIXELS == 50_000_000
    monkeypatch.setattr(media.Image.Image, "load", never)
    for size in ((13_000, 13_000), (8_000, 6_400)):
        with pytest.raises(MediaError, match=rf"{size[0]}x{size[1]} pixels is more than the 50,000,000"):
            load_image(png_header(*size))
        with pytest.raises(MediaError, match=r"more than the 50,000,000 allowed"):
            MediaBudget().add_image(png_header(*size))
    assert media.image_size(png_header(8_064, 6_048)) == (8_064, 6_048)  # a 48-MP phone photo fits


def test_media_budget_totals_are_charged_from_headers():
    budget = MediaBudget(max_pixels=100_000_000, max_bytes=200_000, max_audio_seconds=5)
    for _ in range(2):
        budget.add_image(png_header(7_000, 7_000))  # 49 M pixels each, nothing decoded
    assert budget.used_pixels == 98_000_000
    with pytest.raises(MediaError, match=r"<bytes>: 7000x7000 pixels brings the request to 147,000,000"):
        budget.add_image(png_header(7_000, 7_000))
    budget.add_image(np.zeros((10, 10, 3), np.uint8))  # 300 bytes and 100 pixels still fit
    assert budget.add_audio(np.zeros(48_000, np.float32), 16_000) == 3.0  # arrays count their bytes
    with pytest.raises(MediaError, match=r"<ndarray>: 3.0 s of audio brings the request to 6.0 s, more than"):
        budget.add_audio(np.zeros(48_000, np.float32), 16_000)
    with pytest.raises(MediaError, match=r"<bytes>: 12,044 bytes of media .* to 204,.*200,000 allowed"):
        budget.add_audio(wav(6_000))


def test_prepare_charges_every_input_before_decoding_any(processor, monkeypatch):
    """F26: all images of a request were decoded and kept before anything refused them."""
    monkeypatch.setattr(media, "load_image", never)
    monkeypatch.setattr(media, "load_audio", never)
    images = [png_header(6_000, 6_000)] * 6  # 36 M pixels each, 216 M in all
    with pytest.raises(MediaError, match=r"request to 216,000,000 pixels, more than the 200,000,000"):
        processor.prepare("Describe.", images=images)
    with pytest.raises(MediaError, match=r"more than the 10,000,000 allowed"):
        processor.prepare("Describe.", images=images[:1], media_budget=MediaBudget(max_pixels=10_000_000))
    with pytest.raises(MediaError, match=r"invalid sampling rate 1 Hz"):
        processor.prepare("Listen.", images=images[:1], audio=[wav(1600, header_rate=1)])


RSS_SCRIPT = """
import io, resource, sys
import numpy as np
from PIL import Image
from gemma_mlx.media import synthetic_image
from gemma_mlx.processor import Processor

processor = Processor.from_dir(sys.argv[1])
buf = io.BytesIO()
Image.fromarray(np.tile(synthetic_image(0, 500, 500), (6, 8, 1))).save(buf, "PNG")  # 4000x3000
image = buf.getvalue()
audio = (np.random.default_rng(0).standard_normal(44_100 * 20) * 0.1).astype(np.float32)

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

sizes = []
for _ in range(20):
    out = processor.prepare("Describe this.", images=[image], audio=[(audio, 44_100)], max_soft_tokens=1120)
    del out
    sizes.append(rss())
print(sizes[2], sizes[-1])
"""


def test_the_same_media_twenty_times_leaves_rss_where_it_was(tmp_path):
    """Item 1: memory stays bounded. A 12-MP PNG and 20 s of 44.1 kHz audio prepared 20 times in a
    fresh process: RSS after the 20th is within 64 MiB of RSS after the 3rd."""
    save_tokenizer(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    third, last = map(float, run.stdout.split())
    assert last - third < 64, (third, last)
