"""Tokenizers (tokenizer.json and SentencePiece), streaming detokenization, chat templates."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from tiny import ADDED, CORPUS, SPECIAL, save_tokenizer
from tiny import save_sp_tokenizer as save_sp_model

from gemma_mlx.text import ChatTemplate, StreamingDetokenizer, Tokenizer

SAMPLES = [
    "The quick brown fox.",
    "  leading and   runs of   spaces  ",
    "line one\nline two\n\n\ttabbed\r\n",
    "digits 0123456789 and 3.14159",
    "accents: déjà vu, naïve, Ærøskøbing",
    "CJK: 漢字かなカナ한국어",
    "emoji: 😀👍🏽 🇫🇷 and ZWJ 👩‍👩‍👧",
]


def save_sp_tokenizer(path: Path) -> Path:
    """A SentencePiece tokenizer.model with a user-defined piece (`<|image|>`)."""
    save_sp_model(path, "\n".join(CORPUS * 5 + SAMPLES[:4]))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    return save_sp_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def tok(hf_dir) -> Tokenizer:
    return Tokenizer.from_dir(hf_dir)


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)
    deltas = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert detok.text == "".join(deltas)
    return deltas


# --- tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf_dir", "sp_dir"])
def test_round_trip_and_streaming(kind, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(kind))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        deltas = stream(tok, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)  # split multi-byte characters come out whole


def test_vocabulary_and_special_ids(tok, hf_dir):
    assert tok.vocab_size == len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"]) + len(
        ADDED
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2) and tok.add_bos_token
    assert tok.token_to_id("<0x41>") == 4 + 0x41 and tok.id_to_token(4 + 0xF0) == "<0xF0>"
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(2) == "<bos>" and tok.id_to_token(-1) is None and tok.id_to_token(10**6) is None


def test_special_token_strings_map_to_single_ids(tok):
    for t in SPECIAL + ADDED:
        assert tok.encode(t) == [tok.token_to_id(t)]
        ids = tok.encode(f"a{t}b")
        assert ids.count(tok.token_to_id(t)) == 1 and tok.decode(ids) == f"a{t}b"
    ids = tok.encode("<|turn>user\nhi<turn|>")
    assert ids[0] == tok.token_to_id("<|turn>") and ids[-1] == tok.token_to_id("<turn|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("hi", add_special_tokens=True) == [2, *tok.encode("hi")]
    assert tok.decode(np.array([2, *tok.encode("hi")])) == "<bos>hi"  # numpy ids
    assert tok.decode([2, 10**6]) == "<bos>"  # ids past the vocabulary are dropped


def test_byte_fallback_tokens(tok):
    assert tok.encode("😀") == [tok.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert tok.encode("é") == [tok.token_to_id("é")]  # learned: one token, not two bytes
    assert len(tok.encode("한")) == 3  # not learned: three byte tokens


def test_matches_transformers_fast_tokenizer(tok, hf_dir):
    PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    for text in [*SAMPLES, "<bos><|turn>user\nhi <|image|> there<turn|>\n<|turn>model\n"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_config_variants(tmp_path):
    save_tokenizer(tmp_path, add_bos_token=False)
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.add_bos_token and tok.encode("hi", add_special_tokens=True) == tok.encode("hi")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<bos>"}}))
    assert Tokenizer.from_dir(tmp_path).bos_token_id == 2  # the {"content": ...} spelling
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path)  # no config: Gemma's token names, BOS wanted
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.add_bos_token) == (2, 1, 0, True)


def test_missing_and_malformed_files(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: cannot be read"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_specials(sp_dir):
    sp = Tokenizer.from_dir(sp_dir)
    assert (sp.pad_token_id, sp.eos_token_id, sp.bos_token_id, sp.add_bos_token) == (0, 1, 2, True)
    sot, eot, image = (sp.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "<|image|>"))
    assert None not in (sot, eot, image) and sp.token_to_id("no such piece") is None
    ids = sp.encode("<bos><start_of_turn>user\nhi <|image|><end_of_turn>")
    assert ids[:2] == [2, sot] and ids[-2:] == [image, eot]  # control pieces split out by us
    assert sp.decode(ids) == "<bos><start_of_turn>user\nhi <|image|><end_of_turn>"
    assert sp.decode(ids, skip_special_tokens=True) == "user\nhi <|image|>"
    assert sp.decode([3]) == "<unk>"  # not sentencepiece's " ⁇ "
    assert sp.decode([sot, 10**6, eot]) == "<start_of_turn><end_of_turn>"  # as tokenizers: dropped
    assert sp.encode("hi", add_special_tokens=True)[0] == 2


def test_sentencepiece_matches_sentencepiece(sp_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    sp = Tokenizer.from_dir(sp_dir)
    for text in SAMPLES:
        assert sp.encode(text) == ref.encode(text) and sp.decode(ref.encode(text)) == ref.decode(
            ref.encode(text)
        )


# --- streaming detokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf_dir", "sp_dir"])
def test_streaming_holds_back_split_characters(kind, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(kind))
    ids = tok.encode("😀")
    assert len(ids) == 4  # four byte-fallback tokens
    assert stream(tok, ids) == ["", "", "", "", "😀"]  # a byte run is emitted once it has ended
    ids = tok.encode("a한b")
    assert stream(tok, ids) == ["a", "", "", "", "한b", ""]


@pytest.mark.parametrize("kind", ["hf_dir", "sp_dir"])
def test_streaming_matches_decode_with_specials_and_spaces(kind, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(kind))
    turn = "<|turn>" if kind == "hf_dir" else "<start_of_turn>"
    for text in [f"<bos>{turn}user\n  two spaces {turn}😀 end", "   ", "\n\n", " 漢 字 "]:
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_streaming_invalid_bytes(tok):
    """Invalid UTF-8 still streams out (as U+FFFD, like decode), and is not held forever."""
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in (0x80, 0xF0)}
    ids = [byte[0xF0], *tok.encode("a"), byte[0x80], *tok.encode(" b"), byte[0xF0]]
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "\ufffda\ufffd b\ufffd" and deltas[-1] == "\ufffd"
    deltas = stream(tok, [byte[0x80]] * 40)  # longer than MAX_HELD: streams out before the end
    assert "".join(deltas) == tok.decode([byte[0x80]] * 40) and deltas[-1] != "".join(deltas)
    # valid bytes followed by an invalid one in one run: decode replaces the whole run, so must we
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in (0x3B, 0x40, 0xBB)] + tok.encode("a")
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "\ufffd\ufffd\ufffda"


def test_streaming_window_is_short(tok):
    """Each step decodes a few tokens, never the whole history."""
    text = " ".join(SAMPLES * 10)
    ids = tok.encode(text)
    calls: list[int] = []

    class Recording:
        vocab_size = tok.vocab_size
        token_to_id = tok.token_to_id

        def decode(self, ids, skip_special_tokens=False):
            calls.append(len(ids))
            return tok.decode(ids)

    detok = StreamingDetokenizer(Recording())
    assert "".join(detok.add_token(i) for i in ids) + detok.finalize() == text
    # a byte run (emoji sequences here) is decoded whole: windows stay within MAX_HELD + a few
    assert (
        len(ids) > 500 and max(calls) <= StreamingDetokenizer.MAX_HELD + 8 and len(calls) <= 2 * len(ids) + 2
    )
    assert len(detok.tokens) < 100  # the window does not keep the whole history


def test_streaming_reset(tok):
    detok = StreamingDetokenizer(tok)
    for i in tok.encode("Hello 😀"):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "Hello 😀"
    detok.reset()
    assert detok.text == "" and detok.tokens == []
    assert "".join(detok.add_token(i) for i in tok.encode("fox")) + detok.finalize() == "fox"


# --- chat templates --------------------------------------------------------------------------------

GEMMA4 = ChatTemplate.default()
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Hi"}
THINK_OFF = "<|turn>model\n<|channel>thought\n<channel|>"

# (messages, render options, expected text), written by hand from the format in design doc section 6
CASES = [
    (
        [SYSTEM, USER],
        {},
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n" + THINK_OFF,
    ),
    ([USER], {}, "<bos><|turn>user\nHi<turn|>\n" + THINK_OFF),
    ([USER], {"add_generation_prompt": False}, "<bos><|turn>user\nHi<turn|>\n"),
    (
        [USER],
        {"enable_thinking": True},
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
    ),
    (
        [SYSTEM, USER],
        {"enable_thinking": True},
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
    ),
    (
        [
            SYSTEM,
            USER,
            {"role": "assistant", "content": "<|channel>thought\nThey greet me.<channel|>Hello!"},
            {"role": "user", "content": "  Bye \n"},
            {"role": "assistant", "content": "Sure. <|channel>thought\nhmm<channel|> Bye!"},
        ],
        {"add_generation_prompt": False},
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\nSure.  Bye!<turn|>\n",
    ),
    (
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? "}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "<|channel>thought\nA cat<channel|>A cat."}],
            },
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio"}]},
        ],
        {"enable_thinking": True},
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\n\n\n<|image|>\n\nWhat is this?<turn|>\n"
        "<|turn>model\nA cat.<turn|>\n<|turn>user\nAnd this?<|audio|><turn|>\n<|turn>model\n",
    ),
    (
        [
            {"role": "developer", "content": "Rules."},
            {"role": "model", "content": "<|channel>thought\ncut off"},
        ],
        {"add_generation_prompt": False},
        "<bos><|turn>system\nRules.<turn|>\n<|turn>model\n<turn|>\n",
    ),
    ([], {"enable_thinking": True}, "<bos><|turn>system\n<|think|><turn|>\n<|turn>model\n"),
]


@pytest.mark.parametrize("messages, options, expected", CASES)
def test_gemma4_template(messages, options, expected):
    assert GEMMA4.render(messages, **options) == expected


def test_gemma4_template_matches_transformers_rendering(hf_dir):
    """transformers' own apply_chat_template renders our template string to the same text."""
    PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<bos>")
    for messages, options, expected in CASES[:-1]:  # (transformers refuses an empty conversation)
        kw = {"add_generation_prompt": True, "enable_thinking": False, **options}
        assert (
            ref.apply_chat_template(messages, chat_template=GEMMA4.source, tokenize=False, **kw) == expected
        )


def test_gemma4_template_details():
    assert GEMMA4.origin.endswith("templates/gemma4.jinja")
    out = GEMMA4.render([{"role": "user", "content": [{"type": "video"}, "plain part"]}])
    assert out.startswith("<bos><|turn>user\n\n\n<|video|>\n\nplain part<turn|>\n")
    # content=None (e.g. an assistant message that only called a tool) renders as empty
    assert "<|turn>model\n<turn|>\n" in GEMMA4.render([USER, {"role": "assistant", "content": None}])
    assert GEMMA4.render([USER], bos_token="").startswith("<|turn>user")
    with pytest.raises(ValueError, match=r"gemma4\.jinja: a role 'tool' message must follow"):
        GEMMA4.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"gemma4\.jinja: unsupported role 'robot'"):
        GEMMA4.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="list of dicts"):
        GEMMA4.render("Hi")


def test_template_environment(hf_dir):
    """The helpers and whitespace rules of transformers' template environment."""
    source = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ ns.n }} {{ strftime_now('%Y') }}"
    )
    messages = [{"role": "user", "content": 'é "<b>"'}]
    out = ChatTemplate(source).render(messages)
    assert out == f'"é \\"<b>\\""1 {datetime.now():%Y}'  # trim_blocks ate the newlines
    with pytest.raises(ValueError, match="<chat template>: no thanks"):
        ChatTemplate("{{ raise_exception('no thanks') }}").render([])
    PreTrainedTokenizerFast = pytest.importorskip("transformers").PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    assert ref.apply_chat_template(messages, chat_template=source, tokenize=False) == out


def test_template_sandbox():
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ValueError):
        ChatTemplate("{% set ns = namespace(_hidden=1) %}").render([])
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages.append(1) }}").render([])

    class Image:
        saved = False

        def save(self) -> str:
            Image.saved = True
            return "saved"

    messages = [{"role": "user", "content": [{"type": "image", "image": Image()}]}]
    assert ChatTemplate("{{ messages[0].content[0].image }}").render(messages) == "<Image>"
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages[0].content[0].image.save() }}").render(messages)
    assert not Image.saved  # the template only ever saw a placeholder string


def test_template_sources(tmp_path):
    assert ChatTemplate.from_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert ChatTemplate.from_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}a"}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "<bos>a"
    named = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "{{ bos_token }}b"}]
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "<bos>b"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}c")
    template = ChatTemplate.from_dir(tmp_path)
    assert template.render([]) == "<bos>c" and template.origin == str(tmp_path / "chat_template.jinja")


def test_malformed_templates(tmp_path):
    (tmp_path / "chat_template.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match="chat_template.json: not valid JSON"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "chat_template.json").write_text('{"chat_template": 3}')
    with pytest.raises(ValueError, match="chat_template.json: chat_template must be"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }")
    with pytest.raises(ValueError, match=r"chat_template.jinja: invalid chat template \(line 2"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content + 1 }}")
    with pytest.raises(ValueError, match="chat_template.jinja: rendering failed"):
        ChatTemplate.from_dir(tmp_path).render([USER])
