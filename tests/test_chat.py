"""Chat sessions (cache reuse, media turns, context trimming) and the terminal chat itself."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
import wave

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tiny import rewrite_config
from typer.testing import CliRunner

from gemma_mlx import SamplingParams, generate, load
from gemma_mlx.chat import ChatSession
from gemma_mlx.cli.app import app
from gemma_mlx.media import load_audio, preprocess_audio, preprocess_image


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (100, 60), (255, 0, 0)).save(d / "red.png")
    with wave.open(str(d / "tone.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 10) * 8000).astype(np.int16).tobytes())
    return d


def run_turn(session: ChatSession, text: str) -> str:
    return "".join(c.text for c in session.send(text))


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_each_turn_prefills_only_new_tokens(model_dir, kv_bits):
    model, processor = load(model_dir)
    kv = dict(kv_bits=kv_bits, kv_group_size=32)  # the tiny sliding layers have head_dim 32
    session = ChatSession(model, processor, max_tokens=10, sampling=SamplingParams(temperature=0.0), **kv)
    run_turn(session, "Hello there")
    first = list(session.tokens)
    assert session.stats.cached_prompt_tokens == 0 and session.stats.prompt_tokens == len(first) - 10
    run_turn(session, "The quick brown fox")
    assert session.stats.cached_prompt_tokens > 0
    new = session.tokens[len(first) : len(first) + session.stats.prompt_tokens]
    assert processor.tokenizer.decode(new).startswith("<turn|>\n<|turn>user\nThe quick brown fox")
    # the answer is exactly what a fresh run on the same token sequence gives
    answer = session.tokens[len(first) + len(new) :]
    assert generate(model, processor, first + new, max_tokens=10, **kv).tokens == answer
    assert session.cache[0].offset == len(session.tokens)


def test_later_turn_adds_an_image_with_the_cache(model_dir, media_files):
    model, processor = load(model_dir)
    session = ChatSession(
        model, processor, max_tokens=6, max_soft_tokens=70, sampling=SamplingParams(temperature=0.0)
    )
    run_turn(session, "Hi")
    before = list(session.tokens)
    session.attach_image(str(media_files / "red.png"))
    session.attach_audio(str(media_files / "tone.wav"))
    run_turn(session, "What is this?")
    assert session.stats.cached_prompt_tokens > 0
    new = session.tokens[len(before) : len(before) + session.stats.prompt_tokens]
    assert new.count(model.config.image_token_id) == 60 and new.count(model.config.audio_token_id) == 13
    # one forward pass over the whole token sequence with the image and audio gives the same token
    img = preprocess_image(str(media_files / "red.png"), 70)
    clip = preprocess_audio(load_audio(str(media_files / "tone.wav")))
    logits = model(
        mx.array([before + new]),
        pixel_values=mx.array(img.pixel_values[None]),
        image_position_ids=mx.array(img.position_ids[None]),
        input_features=mx.array(clip.features[None]),
    )
    assert int(mx.argmax(logits[0, -1]).item()) == session.tokens[len(before) + len(new)]


def test_bad_media_and_full_context(model_dir, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    rewrite_config(small, lambda c: c["text_config"].update(max_position_embeddings=120))
    model, processor = load(small)
    session = ChatSession(model, processor, max_tokens=20, sampling=SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="nope.png"):
        session.attach_image(str(tmp_path / "nope.png"))
    assert session.pending == []
    for i in range(4):
        run_turn(session, f"turn number {i} says hello")
    assert any("dropped the oldest turn" in n for n in session.notices)
    assert len(session.tokens) <= 120 and session.history[0]["content"] != "turn number 0 says hello"


def test_interrupt_before_the_first_token_closes_the_turn(model_dir):
    """Ctrl-C during the prefill (before any token): the next turn first closes the empty model
    turn, as a fresh render of the history does, instead of leaving it open."""
    model, processor = load(model_dir)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    session = ChatSession(model, processor, max_tokens=5, prefill_progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_turn(session, "Hello")
    assert session.history[-1] == {"role": "assistant", "content": ""}
    session.prefill_progress = None
    run_turn(session, "Second")
    assert session.stats.cached_prompt_tokens > 0  # the cache was continued, not rebuilt
    text = processor.tokenizer.decode(session.tokens)
    assert "<|turn>model\n<|channel>thought\n<channel|><turn|>\n<|turn>user\nSecond<turn|>" in text
    assert session.cache[0].offset == len(session.tokens)


def test_cli_chat_commands(model_dir, media_files, tmp_path):
    script = (
        "\n".join(
            [
                "Hello",
                "/stats",
                f"/image {media_files / 'red.png'}",
                "/image /no/such.png",
                "What is it?",
                "/think on",
                "/system Be brief.",
                f"/save {tmp_path / 't.json'}",
                "/reset",
                "/help",
                "/quit",
            ]
        )
        + "\n"
    )
    result = CliRunner().invoke(app, ["chat", "--model", str(model_dir), "-n", "5", "-t", "0"], input=script)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "prompt tokens" in out and "[image attached" in out and "/no/such.png" in out
    assert "[thinking on]" in out and "[conversation reset]" in out and "/image PATH" in out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.slow
def test_real_terminal_session(model_dir, media_files, tmp_path):
    """The REPL in a pseudo-terminal: two turns, an image, an audio clip, Ctrl-C during a long
    generation (the session survives), /reset, /quit. The end-of-turn ids are suppressed, so both
    answers run until Ctrl-C: an answer that ends early is a bug, not chance."""
    pexpect = pytest.importorskip("pexpect")
    endless = tmp_path / "endless"
    shutil.copytree(model_dir, endless)
    gen = json.loads((endless / "generation_config.json").read_text())
    (endless / "generation_config.json").write_text(
        json.dumps({**gen, "suppress_tokens": gen["eos_token_id"]})
    )
    model_dir = endless
    cmd = [
        sys.executable,
        "-m",
        "gemma_mlx.cli",
        "chat",
        "--model",
        str(model_dir),
        "-n",
        "100000",
        "-t",
        "1.0",
    ]
    child = pexpect.spawn(
        cmd[0], cmd[1:], encoding="utf-8", timeout=60, env={"TERM": "dumb", "PATH": "/usr/bin"}
    )
    log = io.StringIO()
    child.logfile_read = log
    child.expect(">>> ")
    child.sendline("Hello")  # a first turn that ends (Ctrl-C) and a second one with media
    time.sleep(1.0)
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(">>> ")
    child.sendline(f"/image {media_files / 'red.png'}")
    child.expect(r"\[image attached")
    child.sendline(f"/audio {media_files / 'tone.wav'}")
    child.expect(r"\[audio attached")
    child.sendline("Describe this.")
    time.sleep(1.5)
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("prompt tokens")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, log.getvalue()
