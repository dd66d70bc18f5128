"""The processor: prompt encoding (text, ids, chat messages), EOS/suppressed ids, checkpoint files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_text import save_sp_tokenizer
from tiny import save_tokenizer

from gemma_mlx.processor import Processor
from gemma_mlx.text import ChatTemplate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Tokenizer files as a Gemma 4 IT checkpoint ships them (add_bos_token false: the template
    writes BOS), with its generation config."""
    path = save_tokenizer(tmp_path_factory.mktemp("ckpt"), add_bos_token=False)
    gen = {"eos_token_id": [1, 106, 50], "suppress_tokens": [258883, 258882], "top_k": 64}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


@pytest.fixture(scope="module")
def p(ckpt) -> Processor:
    return Processor.from_dir(ckpt)


def test_from_dir(ckpt, tmp_path):
    assert Processor.from_dir(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert Processor.from_dir(tmp_path) is None  # weights without tokenizer files
    p = Processor.from_dir(ckpt)
    assert p.generation_config["top_k"] == 64
    assert p.eos_token_ids == [1, 106, 50] and p.suppress_token_ids == [258883, 258882]
    assert p.chat_template.source == ChatTemplate.default().source  # the checkpoint ships none


def test_generation_config_variants(ckpt, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tmp_path / name)
    p = Processor.from_dir(tmp_path)  # no generation_config.json: EOS, end of turn, tool-call wait
    assert p.generation_config == {} and p.suppress_token_ids == []
    assert p.eos_token_ids == [
        1,
        p.tokenizer.token_to_id("<turn|>"),
        p.tokenizer.token_to_id("<|tool_response>"),
    ]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Processor.from_dir(tmp_path).eos_token_ids == [1]
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        Processor.from_dir(tmp_path)


def test_checkpoint_template_wins(ckpt, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if enable_thinking %}T{% endif %}"
    )
    p = Processor.from_dir(tmp_path)
    assert p.apply_chat_template(MESSAGES, enable_thinking=True) == "<bos>[system]Be brief.[user]Hello thereT"


def test_encode_text_prompt(p):
    tok = p.tokenizer
    assert not tok.add_bos_token  # BOS all the same: Gemma always wants it
    assert p.encode_prompt("Hello there") == [2, *tok.encode("Hello there")]
    assert p.encode_prompt("<bos>Hello") == [2, *tok.encode("Hello")]  # not a second one
    assert p.encode_prompt(" ") == [2, *tok.encode(" ")]
    assert p.prepare("Hello").ids == p.encode_prompt("Hello")
    assert p.prepare("Hello", add_bos=False).ids == tok.encode("Hello")  # continues a cached text
    rendered = p.apply_chat_template(MESSAGES)
    assert p.prepare(rendered).ids.count(2) == 1  # a rendered chat fed as text keeps one BOS


def test_encode_token_ids(p):
    assert p.encode_prompt([5, 6, 7]) == [5, 6, 7]
    assert p.encode_prompt((5, 6)) == [5, 6]
    ids = p.encode_prompt(np.array([5, 6, 7], dtype=np.int32))
    assert ids == [5, 6, 7] and all(type(i) is int for i in ids)
    assert p.encode_prompt(mx.array([5, 6])) == [5, 6] and p.encode_prompt(iter([5, 6])) == [5, 6]
    assert p.prepare([5, 6]).ids == [5, 6]


def test_encode_chat_messages(p):
    text = p.apply_chat_template(MESSAGES)
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello there<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    ids = p.encode_prompt(MESSAGES)
    assert ids == p.tokenizer.encode(text) and ids[0] == 2 and ids.count(2) == 1
    assert p.tokenizer.decode(ids) == text
    for t in ("<|turn>", "<turn|>", "<|channel>", "<channel|>"):
        assert p.tokenizer.token_to_id(t) in ids  # markers are single special tokens
    thinking = p.encode_prompt(MESSAGES, enable_thinking=True)
    assert p.tokenizer.decode(thinking).startswith("<bos><|turn>system\n<|think|>Be brief.")
    assert p.prepare(MESSAGES).ids == ids
    assert p.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("Hello there<turn|>\n")


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "empty"),
        (None, "not NoneType"),
        (42, "not int"),
        (b"hi", "not bytes"),
        ({"role": "user", "content": "hi"}, "not dict"),
        ([1.5], "1.5 is not a token id"),
        (np.array([[1, 2]]), r"\[1, 2\] is not a token id"),
        ([True, 2], "True is not a token id"),
        ([-1], "-1 is not a token id"),
        (["a", "b"], "'a' is not a token id"),
        ([{"role": "user", "content": "hi"}, 5], "is not a token id"),
        ([{"content": "hi"}], "chat message 0 has no 'role'"),
    ],
)
def test_bad_prompts(p, prompt, match):
    with pytest.raises(ValueError, match=match):
        p.encode_prompt(prompt)
    with pytest.raises(ValueError, match=match):
        p.prepare(prompt)


def test_media_need_placeholders(p):
    with pytest.raises(ValueError, match="not token ids"):
        p.prepare([5, 6], images=["x.png"])


def test_sentencepiece_checkpoint(tmp_path):
    """A GGUF-derived (tokenizer.model) Gemma 3 checkpoint without a template gets our Gemma 3 one."""
    save_sp_tokenizer(tmp_path)
    p = Processor.from_dir(tmp_path)
    assert p.chat_template.source == ChatTemplate.default("gemma3").source
    sot, eot = (p.tokenizer.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>"))
    assert p.eos_token_ids == [1, eot]
    ids = p.encode_prompt([{"role": "user", "content": "Hello"}])
    assert ids[:2] == [2, sot] and ids.count(2) == 1
    assert p.tokenizer.decode(ids) == "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    assert p.encode_prompt("Hello")[0] == 2


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "user", "content": 5}],
            "message 0: 'content' must be a string or a list of parts, not int",
        ),
        (
            [{"role": "user", "content": [{"type": "file", "file": "v.pdf"}]}],
            "message 0, part 0: type 'file' is not one of text, image, audio, video",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "message 0, part 0: a text part needs 'text'"),
        ([{"role": "user", "content": ["hi"]}], "message 0, part 0: type None"),
        ([{"role": "user"}], r"message 0 \(user\): no 'content'"),
        ([{"role": "robot", "content": "x"}], "role 'robot' is not one of"),
        (["hello"], "message 0: expected a dict"),
    ],
)
def test_messages_that_would_render_wrongly_are_refused(p, messages, match):
    with pytest.raises(ValueError, match=match):
        p.apply_chat_template(messages)


def test_thinking_needs_a_template_that_has_it(tmp_path):
    save_sp_tokenizer(tmp_path)  # our Gemma 3 template: no thinking mode
    gemma3 = Processor.from_dir(tmp_path)
    assert not gemma3.supports_thinking
    with pytest.raises(ValueError, match="cannot switch thinking on"):
        gemma3.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=True)
