"""Tokenizers (tokenizer.json and SentencePiece), streaming detokenization, chat templates, processor."""

from __future__ import annotations

import json

import pytest
from reference import save_tokenizer

from gemma_mlx.processor import Processor
from gemma_mlx.text import ChatTemplate, StreamingDetokenizer, Tokenizer

SAMPLES = [
    "The quick brown fox.",
    "  leading and   runs of   spaces  ",
    "line one\nline two\n\n\ttabbed",
    "digits 0123456789 and 3.14159",
    "accents: déjà vu, naïve, Ærøskøbing",
    "CJK: 漢字かなカナ한국어",
    "emoji: 😀👍🏽 🇫🇷 and ZWJ 👩‍👩‍👧",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A SentencePiece model with byte fallback, control tokens and user-defined turn markers."""
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("sp")
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 20 + SAMPLES[:4]))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "tokenizer"),
        vocab_size=340,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (path / "corpus.txt").unlink()
    (path / "tokenizer.vocab").unlink()
    return path


@pytest.mark.parametrize("kind", ["hf_dir", "sp_dir"])
def test_round_trip_and_streaming(kind, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(kind))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        detok = StreamingDetokenizer(tok)
        deltas = [detok.add_token(i) for i in ids]
        deltas.append(detok.finalize())
        assert "".join(deltas) == text == detok.text
        assert not any("\ufffd" in d for d in deltas)  # split multi-byte characters come out whole


def test_streaming_holds_back_split_characters(hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    ids = tok.encode("😀")
    assert len(ids) == 4  # four byte-fallback tokens
    detok = StreamingDetokenizer(tok)
    assert [detok.add_token(i) for i in ids] == ["", "", "", "😀"]


def test_long_stream_matches_decode(hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    text = " ".join(SAMPLES * 10)
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    assert "".join(detok.add_token(i) for i in ids) + detok.finalize() == tok.decode(ids)
    assert len(detok.tokens) < 100  # the window does not keep the whole history


def test_special_tokens(hf_dir, sp_dir):
    tok = Tokenizer.from_dir(hf_dir)
    turn = tok.token_to_id("<|turn>")
    assert tok.encode("<|turn>user\nhi")[0] == turn
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id == 2
    assert tok.eos_token_id == 1 and tok.id_to_token(2) == "<bos>" and tok.id_to_token(10**6) is None
    sp = Tokenizer.from_dir(sp_dir)
    ids = sp.encode("<bos><start_of_turn>user\nhi<end_of_turn>")
    assert ids[:2] == [2, sp.token_to_id("<start_of_turn>")] and ids[-1] == sp.token_to_id("<end_of_turn>")
    assert sp.decode(ids, skip_special_tokens=True) == "<start_of_turn>user\nhi<end_of_turn>"
    assert sp.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>"


def test_matches_transformers_fast_tokenizer(hf_dir):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    tok = Tokenizer.from_dir(hf_dir)
    for text in SAMPLES:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False))


GEMMA4 = ChatTemplate.default("gemma4")


def test_gemma4_template_turns():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert GEMMA4.render(messages) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert GEMMA4.render(messages[1:2], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    assert GEMMA4.render(messages[1:2], add_generation_prompt=False) == "<bos><|turn>user\nHi<turn|>\n"


def test_gemma4_template_media_parts():
    parts = [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "audio"}]
    out = GEMMA4.render([{"role": "user", "content": parts}], add_generation_prompt=False)
    assert out == "<bos><|turn>user\n\n\n<|image|>\n\nWhat is this?<|audio|><turn|>\n"


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported role 'tool'"):
        GEMMA4.render([{"role": "tool", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match="chat_template.jinja: invalid chat template"):
        ChatTemplate.from_dir(tmp_path)
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        sandboxed.render([])


def test_template_sources(tmp_path):
    assert ChatTemplate.from_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}x"}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "<bos>x"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}y")
    assert ChatTemplate.from_dir(tmp_path).render([]) == "<bos>y"


def test_processor(hf_dir, tmp_path):
    assert Processor.from_dir(tmp_path) is None
    p = Processor.from_dir(hf_dir)
    assert p.eos_token_ids == [1, p.tokenizer.token_to_id("<turn|>")]
    assert p.encode_prompt("Hello")[0] == 2
    assert p.encode_prompt([5, 6, 7]) == [5, 6, 7]
    ids = p.encode_prompt([{"role": "user", "content": "Hello"}])
    assert ids.count(2) == 1 and p.tokenizer.decode(ids).startswith("<bos><|turn>user\nHello")
    with pytest.raises(ValueError, match="prompt must be"):
        p.encode_prompt([1.5])
