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


# --- Part 1: the rows that were not clear ----------------------------------------------------


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """Run the console entry point in-process: (exit code, stderr)."""
    from gemma_mlx.cli.app import main

    monkeypatch.setattr(sys, "argv", ["gemma-mlx", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def nan_ckpt(checkpoint, tmp_path):
    """Row 1's checkpoint: layer 0's q_proj set to NaN (`t1_checkpoints.py nan`)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    path = tmp_path / "nanweights"
    shutil.copytree(checkpoint, path)
    tensors = load_file(str(path / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(path / "model.safetensors"))
    return path, name


def test_nan_weights_stop_generation_with_a_hint(nan_ckpt, capsys, monkeypatch):
    """Row 1: NaN weights generated `<pad><pad><pad>` with exit 0 (API and CLI)."""
    from gemma_mlx import NonFiniteLogitsError, generate, load

    path, name = nan_ckpt
    model, processor = load(path)
    with pytest.raises(
        NonFiniteLogitsError, match=r"NaN or infinite at generated token 1: .*check_finite=True"
    ):
        generate(model, processor, "hello", max_tokens=3)
    with pytest.raises(NonFiniteLogitsError):  # sampled, too
        generate(model, processor, "hello", max_tokens=3, temperature=1.0, seed=0)
    code, err = cli(capsys, monkeypatch, "generate", "--model", str(path), "-n", "3", "hello")
    assert code == 1 and "error: the model's logits turned NaN" in err and "--check-finite" in err
    code, err = cli(capsys, monkeypatch, "generate", "--model", str(path), "--check-finite", "-n", "3", "hi")
    assert code == 1 and f"non-finite (NaN or infinite) values in {name}" in err


def test_the_flag_marks_a_token_chosen_from_a_non_finite_logit():
    import mlx.core as mx

    from gemma_mlx.generate import NON_FINITE, _flag_non_finite

    greedy = _flag_non_finite(lambda logits, *_: mx.argmax(logits, axis=-1))
    nan, inf = float("nan"), float("inf")
    rows = mx.array([[1.0, 3.0, 2.0], [1.0, nan, 2.0], [nan, nan, nan], [1.0, inf, 2.0], [-inf, 0.0, 1.0]])
    assert greedy(rows).tolist() == [1, NON_FINITE, NON_FINITE, NON_FINITE, 2]


def test_finite_logits_generate_as_before(checkpoint):
    """The check changes no output: greedy tokens equal the model's own argmax chain."""
    import mlx.core as mx

    from gemma_mlx import generate, load
    from gemma_mlx.generate import make_cache

    model, processor = load(checkpoint)
    result = generate(model, processor, "The quick brown fox", max_tokens=6)
    ids, cache, expected = processor.encode_text("The quick brown fox"), make_cache(model), []
    logits = model(mx.array([ids]), cache)[:, -1]
    for _ in range(6):
        expected.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[expected[-1]]]), cache)[:, -1]
    assert result.tokens[: len(expected)] == expected[: len(result.tokens)]


def test_eos_token_id_that_is_not_an_id_names_file_and_field(checkpoint, tmp_path, capsys, monkeypatch):
    """Row 2: `{"eos_token_id": "abc"}` gave `invalid literal for int() with base 10: 'abc'`."""
    import shutil

    from gemma_mlx.processor import Processor

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    (path / "generation_config.json").write_text('{"eos_token_id": "abc"}')
    match = r"generation_config.json: eos_token_id is 'abc'; expected a token id"
    with pytest.raises(ValueError, match=match):
        Processor.from_dir(path)
    code, err = cli(capsys, monkeypatch, "generate", "--model", str(path), "-n", "2", "hi")
    assert code == 1 and "generation_config.json: eos_token_id is 'abc'" in err


def test_group_size_zero_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    """Row 3: `convert --group-size 0` wrote `"group_size": 64` with exit 0."""
    from gemma_mlx.convert.quantize import QuantSpec

    with pytest.raises(ValueError, match=r"--group-size 0: expected 32, 64 or 128"):
        QuantSpec.make(4, 0)
    assert QuantSpec.make(4, None).group_size == 64
    code, err = cli(
        capsys, monkeypatch, "convert", str(checkpoint), str(tmp_path / "out"), "--group-size", "0"
    )
    assert code != 0 and "--group-size 0" in err and not (tmp_path / "out").exists()


def test_read_only_or_virtual_output_folder_says_so(checkpoint, tmp_path, monkeypatch, capsys):
    """Rows 4/5: a read-only folder and /proc/self/out were reported as "not enough free space"."""
    import os

    from gemma_mlx.convert import writer

    code, err = cli(capsys, monkeypatch, "convert", str(checkpoint), "/proc/self/out")
    assert code == 1 and "/proc/self is on a virtual file system" in err and "free" not in err
    real = os.statvfs

    class ReadOnly:  # what statvfs says of a read-only mount (none can be made without privileges)
        def __init__(self, path):
            self.__dict__.update({k: getattr(real(path), k) for k in ("f_blocks", "f_bavail", "f_frsize")})
            self.f_flag = os.ST_RDONLY

    monkeypatch.setattr(writer.os, "statvfs", ReadOnly)
    with pytest.raises(OSError, match=rf"{tmp_path / 'ro'}: {tmp_path} is on a read-only file system"):
        with writer.atomic_directory(tmp_path / "ro", needed=10**15):
            pass


def test_sampling_arguments_must_be_finite(checkpoint, capsys, monkeypatch):
    """Rows 8/12: `temperature=inf` emitted the last vocabulary id every time (API and CLI);
    `top_k=inf` raised OverflowError."""
    from gemma_mlx import SamplingParams, generate, load

    model, processor = load(checkpoint)
    with pytest.raises(ValueError, match=r"temperature=inf: must be >= 0 and finite"):
        generate(model, processor, "The quick brown fox", temperature=float("inf"), seed=0)
    for top_k in (float("inf"), float("nan"), 2.5, -1):
        with pytest.raises(ValueError, match=rf"top_k={top_k}: must be an integer >= 0"):
            SamplingParams(temperature=1.0, top_k=top_k)
    code, err = cli(capsys, monkeypatch, "generate", "--model", str(checkpoint), "-n", "4", "-t", "inf", "hi")
    assert code == 1 and "temperature=inf" in err


def test_stop_given_as_a_string_is_one_stop_string(checkpoint):
    """Row 9: `TextStream(tok, "zzz").stop == ('z', 'z', 'z')`; it stopped after 'the la'."""
    from gemma_mlx import generate, load
    from gemma_mlx.generate import TextStream

    model, processor = load(checkpoint)
    stream = TextStream(processor.tokenizer, "zzz")
    assert stream.stop == ("zzz",)
    text = "".join(stream.add(t) for t in processor.tokenizer.encode("the lazy dog")) + stream.add(None, True)
    assert text == "the lazy dog" and not stream.stopped
    full = generate(model, processor, "The quick brown fox", max_tokens=12).text
    stop = full.strip()[1:4]  # a piece of the output that a character split would cut earlier
    cut = generate(model, processor, "The quick brown fox", max_tokens=12, stop=stop)
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_audio_part_for_a_template_without_audio_is_refused(checkpoint, processor, tmp_path):
    """Rows 10/11: the Gemma 3 template dropped an audio part silently; through generate() the
    error was `the prompt has 0 <|audio|> placeholders for 1 audio clips`."""
    from gemma_mlx import generate, load
    from gemma_mlx.processor import Processor
    from gemma_mlx.text import ChatTemplate

    gemma3 = Processor(processor.tokenizer, ChatTemplate.default("gemma3"), processor.generation_config)
    (tmp_path / "x.wav").write_bytes(wav(16_000))
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": str(tmp_path / "x.wav")}, {"type": "text", "text": "hi"}],
        }
    ]
    match = r"message 0, part 0: the chat template \(.*\) has no <\|audio\|> placeholder for an audio part"
    with pytest.raises(MediaError, match=match):
        gemma3.apply_chat_template(messages)
    model, _ = load(checkpoint)
    with pytest.raises(MediaError, match=match + r".*takes no audio input"):
        generate(model, gemma3, messages, max_tokens=2)
    assert "<|audio|>" in processor.apply_chat_template(messages)  # Gemma 4's template keeps it


def test_image_token_id_outside_the_tokenizer_is_named(checkpoint, tmp_path):
    """Row 7: `images: 266 soft tokens for 0 placeholder tokens in the prompt`."""
    import shutil

    from tiny import rewrite_config

    from gemma_mlx import generate, load

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    rewrite_config(path, lambda c: c.update(image_token_id=258880))  # the real id, beyond the tiny vocab
    model, processor = load(path)
    image = np.zeros((96, 96, 3), np.uint8)
    with pytest.raises(
        ValueError,
        match=r"config.json's image_token_id is 258880, but the tokenizer encodes <\|image\|> as \d+",
    ):
        generate(model, processor, "<|image|>What is this?", images=[image], max_tokens=2)
    assert generate(model, processor, "No image here.", max_tokens=2).tokens  # text still works


def test_media_for_a_text_only_model_is_refused_before_decoding(tmp_path, monkeypatch):
    """Part 2 F30/F31's library side: an image or audio clip given to a text-only model ended in
    `ValueError: 0 image blocks in the prompt for 1 tensors` from inside the model."""
    from tiny import UNIFIED_CONFIG, save_checkpoint

    from gemma_mlx import generate, load

    path = save_checkpoint(tmp_path / "text", {**UNIFIED_CONFIG["text_config"], "dtype": "float32"})
    model, processor = load(path)
    monkeypatch.setattr(media, "load_image", never)
    monkeypatch.setattr(media, "load_audio", never)
    image, clip = np.zeros((96, 96, 3), np.uint8), (np.zeros(16_000, np.float32), 16_000)
    with pytest.raises(MediaError, match=r"this model \(gemma4_unified_text\) takes no image input"):
        generate(model, processor, "<|image|>What is this?", images=[image], max_tokens=2)
    with pytest.raises(MediaError, match=r"takes no audio input; a Gemma 4 unified model does"):
        generate(model, processor, "Listen.", audio=[clip], max_tokens=2)


def test_save_onto_a_directory_leaves_no_tmp_file(tmp_path):
    """Row 13: `/save DIR` said `[Errno 21] Is a directory` and left `DIR.tmp` behind."""
    from types import SimpleNamespace

    from gemma_mlx.cli.chat import save_transcript

    session = SimpleNamespace(system=None, history=[{"role": "user", "content": "hi"}])
    (tmp_path / "savedir").mkdir()
    with pytest.raises(IsADirectoryError, match="savedir is a directory"):
        save_transcript(session, tmp_path / "savedir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["savedir"]
    save_transcript(session, tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == "**user**: hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["savedir", "t.md"]


# --- issue 27 item 10: first-run friction in the CLI -----------------------------------------


def test_top_level_help_names_every_command():
    from typer.main import get_command
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    names = set(get_command(app).commands)
    assert names == {"generate", "chat", "serve", "convert", "info", "bench"}
    description = app.info.help
    assert all(name in description for name in names), description
    assert all(name in CliRunner().invoke(app, ["--help"]).stdout for name in names)


def test_each_short_option_means_one_thing_across_commands():
    """`-p` was --prompt-tokens in bench and --port in serve; `-n` --max-tokens and --trials."""
    from typer.main import get_command

    from gemma_mlx.cli.app import app

    meaning: dict[str, set[str]] = {}
    for command in get_command(app).commands.values():
        for param in command.params:
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts + param.secondary_opts if len(o) == 2):
                meaning.setdefault(short, set()).update(longs)
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}
    assert meaning["-p"] == {"--prompt-tokens"} and meaning["-n"] == {"--max-tokens"}


def test_debug_shows_the_traceback_of_an_error_turned_into_a_red_line(tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, monkeypatch, "generate", "--model", str(tmp_path / "missing"), "hi")
    assert code == 1 and "no such checkpoint directory" in err and "Traceback" not in err
    code, err = cli(capsys, monkeypatch, "--debug", "generate", "--model", str(tmp_path / "missing"), "hi")
    assert code == 1 and "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.rstrip().endswith("no such checkpoint directory") or "error: --model" in err


def test_one_generated_token_prints_no_rate(checkpoint):
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    result = CliRunner().invoke(app, ["generate", "--model", str(checkpoint), "-n", "1", "hi"])
    assert result.exit_code == 0, result.output
    assert ", 1 generated, peak memory" in result.stderr and "0.0 tok/s" not in result.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--kv-bits", "3"], "--kv-bits/--kv-group-size: kv_bits=3"),
        (["--kv-bits", "8", "--kv-group-size", "48"], "kv_group_size=48"),
        (["-t", "inf"], "temperature=inf"),
        (["--draft", "/nonexistent/drafter"], "--draft"),
    ],
)
def test_option_checks_run_before_the_model_loads(checkpoint, args, match, capsys, monkeypatch):
    from gemma_mlx.cli import common

    monkeypatch.setattr(common, "load", never)  # loading would fail the test
    for command in (["generate", *args, "hi"], ["chat", *args]):
        code, err = cli(capsys, monkeypatch, command[0], "--model", str(checkpoint), *command[1:])
        assert code == 1 and match in err, err


def test_convert_check_says_how_long_it_took(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from gemma_mlx.cli.app import app

    result = CliRunner().invoke(
        app, ["convert", str(checkpoint), str(tmp_path / "q8"), "--bits", "8", "--check"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps the table to the terminal's width
    assert "s check)" in text and "check: time" in text, text


def test_chat_repl_reports_a_generation_error_and_goes_on(nan_ckpt, monkeypatch, capsys):
    """A NaN model in `gemma-mlx chat`: one red line per answer, and the session (and /save) stay."""
    import builtins

    from gemma_mlx import ChatSession, load
    from gemma_mlx.cli import chat as chat_cli

    model, processor = load(nan_ckpt[0])
    session = ChatSession(model, processor, max_tokens=3)
    lines = iter(["hello", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(chat_cli, "_history_file", lambda: nan_ckpt[0] / "history")
    chat_cli.repl(session, "test")
    err = capsys.readouterr().err
    assert "error: the model's logits turned NaN or infinite" in err
