"""GGUF import (convert/gguf.py) on tiny GGUF files written here the way llama.cpp writes Gemma 3,
our Gemma 3 chat template, and the offline default model's cache (convert/default_model.py).
The real 270M file is tested in test_gemma3_parity.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tiny import rel_err, save_sp_tokenizer

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from gguf.constants import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from gemma_mlx.checkpoint import load_model  # noqa: E402
from gemma_mlx.config import load_config  # noqa: E402
from gemma_mlx.convert.default_model import check_cache, ensure_converted  # noqa: E402
from gemma_mlx.convert.gguf import GGUFError, import_gguf, our_name  # noqa: E402
from gemma_mlx.text import ChatTemplate, Tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data"
SAMPLES = [
    "Hello world",
    "  runs   of\tspaces\n\nand newlines\n",
    "digits 1234567890 3.14",
    "déjà vu, naïve café",
    "漢字 かな 한국어",
    "emoji 😀👍🏽🇫🇷",
    "<start_of_turn>user\nhi<end_of_turn>\n",
]
# llama.cpp tensor names of Gemma 3, from HF's (convert_hf_to_gguf.py tensor map)
LLAMA_CPP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# every type the gguf package can also write, cycled over the matrices
MATRIX_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q4_1, QT.F16, QT.BF16, QT.F32]
ALL_MATRICES = ["token_embd.weight"] + [f"blk.{i}.{t}.weight" for i in range(6) for t in LLAMA_CPP.values()]
IDS = [2, 17, 99, 5, 300, 42, 7, 250, 12, 64, 128, 33]  # longer than the tiny model's window (4)


def train_sentencepiece(path: Path) -> Path:
    """A small Gemma-like SentencePiece BPE model with a user-defined image marker and run of spaces."""
    text = (DATA / "public_domain.txt").read_text() + "\n" + "\n".join(SAMPLES)
    return save_sp_tokenizer(path, text, vocab_size=600, user_defined=("<start_of_image>", "▁▁"))


def tiny_reference(vocab: int, **overrides):
    """A random transformers Gemma3ForCausalLM; norm weights moved off zero so a wrong offset shows."""
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,  # transformers' GGUF loader assumes query_pre_attn_scalar 256
        sliding_window=4,
        max_position_embeddings=128,
    )
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**cfg, **overrides})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # bfloat16 values, as released: `(w + 1) - 1` is then exact in float32
                p.copy_((torch.rand(p.shape, generator=g) - 0.5).bfloat16().float())
    return model


def write_gguf(
    path: Path,
    model,
    sp_model: Path,
    *,
    arch: str = "gemma3",
    types: dict[str, QT] | None = None,
    skip: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    metadata: dict | None = None,
) -> Path:
    """`model` as llama.cpp's converter writes it: renamed, norm weights + 1, matrices in
    MATRIX_TYPES (or `types` by GGUF name), the SentencePiece vocabulary in the metadata."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    for key, value in (metadata or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    kinds = [
        3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
        for i in range(len(pieces))
    ]
    for i, p in enumerate(pieces):
        if p in ("<start_of_image>", "▁▁"):
            kinds[i], pieces[i] = 4, p.replace("\u2581", " ")  # llama.cpp stores them un-escaped
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
    w.add_token_types(kinds)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    n = 0
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = p.numpy().astype(np.float32)
        stem = name.removeprefix("model.").removesuffix(".weight")
        if stem == "embed_tokens":
            g = "token_embd.weight"
        elif stem == "norm":
            g = "output_norm.weight"
        else:
            _, i, module = stem.split(".", 2)
            g = f"blk.{i}.{LLAMA_CPP[module]}.weight"
        if g in skip:
            continue
        if name.endswith("norm.weight"):
            w.add_tensor(g, a + 1.0)  # llama.cpp's norm_shift
            continue
        t = (types or {}).get(g, MATRIX_TYPES[n % len(MATRIX_TYPES)])
        n += 1
        if t == QT.F32:
            w.add_tensor(g, a)
        else:
            w.add_tensor(g, quantize(a, t), raw_dtype=t)
    for g, a in (extra or {}).items():
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF file, SentencePiece model, reference model) of a tiny Gemma 3."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    sp_model = train_sentencepiece(root)
    model = tiny_reference(spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size())
    return write_gguf(root / "tiny.gguf", model, sp_model), sp_model, model


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
    return import_gguf(tiny[0], tmp_path_factory.mktemp("imported") / "model")


def test_names():
    assert our_name("blk.3.attn_q.weight") == "language_model.layers.3.self_attn.q_proj.weight"
    assert (
        our_name("blk.0.post_ffw_norm.weight") == "language_model.layers.0.post_feedforward_layernorm.weight"
    )
    assert our_name("token_embd.weight") == "language_model.embed_tokens.weight"
    assert our_name("output_norm.weight") == "language_model.norm.weight"
    for bad in ("output.weight", "blk.x.attn_q.weight", "blk.0.attn_qkv.weight", "rope_freqs.weight"):
        with pytest.raises(KeyError):
            our_name(bad)


def test_tiny_import_matches_transformers_gguf_loader(tiny, imported):
    """Our import against transformers loading the same file: its own dequantization (of every
    type in MATRIX_TYPES), names, metadata reading and norm convention."""
    from transformers import AutoModelForCausalLM

    path = tiny[0]
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = reference(torch.tensor([IDS])).logits.numpy()
    assert rel_err(load_model(imported)(mx.array([IDS])), ref) <= 1e-5


def test_tiny_float_import_is_the_original(tiny, tmp_path):
    """An all-float32 file imports to the original model: logits, and the norm weights bit for bit."""
    _, sp_model, original = tiny
    src = write_gguf(tmp_path / "f32.gguf", original, sp_model, types=dict.fromkeys(ALL_MATRICES, QT.F32))
    out = import_gguf(src, tmp_path / "f32")
    with torch.no_grad():
        ref = original(torch.tensor([IDS])).logits.numpy()
    assert rel_err(load_model(out)(mx.array([IDS])), ref) <= 1e-5
    got, sd = mx.load(str(next(out.glob("*.safetensors")))), original.state_dict()
    for name in ("model.norm.weight", "model.layers.2.self_attn.q_norm.weight"):
        np.testing.assert_array_equal(np.array(got[name]), sd[name].numpy())  # mlx-lm's names, as HF's


def test_tiny_config_and_files(imported):
    cfg = load_config(imported).text
    assert cfg.model_type == "gemma3_text" and cfg.norm_offset == 1.0 and cfg.query_scale == 256**-0.5
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",) and cfg.sliding_window == 4
    assert [s.rope.base for s in cfg.layers] == [10_000.0] * 5 + [1_000_000.0]
    assert not cfg.layer_scalar and not cfg.v_norm and cfg.final_logit_softcapping is None
    gen = json.loads((imported / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 1 and gen["bos_token_id"] == 2
    assert (imported / "chat_template.jinja").read_text() == ChatTemplate.default("gemma3").source


def test_tiny_tokenizer_matches_sentencepiece(tiny, imported):
    """The model rebuilt from GGUF metadata tokenizes like the SentencePiece model it came from."""
    original = spm.SentencePieceProcessor(model_file=str(tiny[1]))
    tok = Tokenizer.from_dir(imported)
    text = (DATA / "public_domain.txt").read_text()[:1500]
    for s in [*SAMPLES, text, "a  b   c", "<start_of_image>x"]:
        ids = tok.encode(s)
        if "<start_of_turn>" not in s:  # SentencePiece itself never matches control pieces in text
            assert ids == original.encode(s), s
        assert tok.decode(ids) == s


def metadata_only(path: Path, arch: str = "gemma3", **fields) -> Path:
    """A GGUF with only `gemma3.*` metadata (no tensors), for config tests."""
    w = gguf.GGUFWriter(str(path), arch)
    base = {
        "context_length": 8192,
        "embedding_length": 5376,
        "block_count": 62,
        "feed_forward_length": 21504,
        "attention.head_count": 32,
        "attention.head_count_kv": 16,
        "attention.key_length": 128,
        "attention.value_length": 128,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 1e6,
        "attention.sliding_window": 1024,
    }
    for key, value in {**base, **fields}.items():
        if value is None:
            continue
        key = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_config_rules_of_llama_cpp(tmp_path):
    """27B's query scale (hidden / heads), linear RoPE scaling on global layers only, softcap, and
    a file without a sliding window (all layers global)."""
    from gemma_mlx.config import parse_config
    from gemma_mlx.convert.gguf import gemma3_config, open_gguf

    def config(**fields):
        path = metadata_only(tmp_path / f"m{len(list(tmp_path.iterdir()))}.gguf", **fields)
        return parse_config(gemma3_config(open_gguf(path), path)).text

    big = config(**{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
    assert big.query_scale == (5376 // 32) ** -0.5
    assert {(s.sliding, s.rope.base, s.rope.scale) for s in big.layers} == {
        (True, 10_000.0, 1.0),
        (False, 1e6, 1 / 8),
    }
    small = config(block_count=34, **{"final_logit_softcapping": 30.0, "attention.sliding_window": None})
    assert small.query_scale == 128**-0.5 and small.final_logit_softcapping == 30.0
    assert set(small.layer_types) == {"full_attention"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("arch", "general.architecture is 'llama'"),
        ("field", "'gemma3.block_count' is missing"),
        ("int8", "tensor blk.0.attn_q.weight has type I8"),
        ("unknown", "tensor blk.0.attn_qkv.weight is not part of a Gemma 3 text model"),
        ("missing", "missing tensors language_model.layers.1.mlp.down_proj.weight"),
        ("shape", r"tensor output_norm.weight has shape \(32,\)"),
        ("garbage", "not a readable GGUF file"),
    ],
)
def test_clear_errors(tiny, tmp_path, case, match):
    path, sp_model, model = tiny
    src = tmp_path / "bad.gguf"
    if case == "arch":
        metadata_only(src, arch="llama")
    elif case == "field":
        metadata_only(src, block_count=None)
    elif case == "int8":
        write_gguf(
            src,
            model,
            sp_model,
            skip=("blk.0.attn_q.weight",),
            extra={"blk.0.attn_q.weight": np.zeros((512, 64), np.int8)},
        )
    elif case == "unknown":
        write_gguf(src, model, sp_model, extra={"blk.0.attn_qkv.weight": np.zeros((4, 64), np.float32)})
    elif case == "missing":
        write_gguf(src, model, sp_model, skip=("blk.1.ffn_down.weight",))
    elif case == "shape":
        write_gguf(
            src,
            model,
            sp_model,
            skip=("output_norm.weight",),
            extra={"output_norm.weight": np.ones(32, np.float32)},
        )
    else:
        src.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(GGUFError, match=match):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# Google's Gemma 3 chat template (google/gemma-3-*-it tokenizer_config.json), the reference for ours
GOOGLE_GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  Hi\n"}],
        [
            {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
            {"role": "assistant", "content": "A cat.\n"},
            {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": " b"}]},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_google(messages, add_generation_prompt):
    ours = ChatTemplate.default("gemma3").render(messages, add_generation_prompt=add_generation_prompt)
    google = ChatTemplate(GOOGLE_GEMMA3).render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == google


# The default-model cache, on the tiny GGUF (the real one is the same code with another source).


@pytest.fixture
def cache(tiny, tmp_path):
    builds = []

    def make_gguf(scratch: Path) -> Path:
        builds.append(scratch)
        return tiny[0]

    def get(source: str = "v1", **kw) -> Path:
        return ensure_converted(make_gguf, tmp_path / "cache" / "model", source, **kw)

    return get, builds


def test_cache_is_built_once_and_reused(cache):
    get, builds = cache
    path = get()
    assert get() == path and len(builds) == 1 and check_cache(path, "v1") is None
    assert not [p.name for p in path.parent.iterdir() if p.name not in ("model", ".model.lock")]


def _flip_byte(f: Path, keep_mtime: bool = False) -> None:
    st = f.stat()
    with f.open("r+b") as fh:
        fh.seek(st.st_size // 2)
        b = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([b[0] ^ 1]))
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "delete", "source"])
def test_damaged_cache_is_rebuilt(cache, damage):
    get, builds = cache
    path = get()
    weights = next(path.glob("*.safetensors"))
    if damage == "truncate":  # an interrupted copy
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "flip":  # same size, new mtime: hashed
        _flip_byte(weights)
    elif damage == "manifest":  # a build that died before completing
        (path / "MANIFEST.json").unlink()
    elif damage == "delete":
        (path / "tokenizer.model").unlink()
    source = "v2" if damage == "source" else "v1"  # the package now ships another GGUF
    assert check_cache(path, source) is not None
    assert get(source) == path and len(builds) == 2 and check_cache(path, source) is None


def test_cache_verify_and_restamp(cache):
    get, builds = cache
    path = get()
    weights = next(path.glob("*.safetensors"))
    _flip_byte(weights, keep_mtime=True)  # silent corruption: only a full check sees it
    assert check_cache(path, "v1") is None and "sha256" in check_cache(path, "v1", verify=True)
    get(verify=True)
    assert len(builds) == 2
    os.utime(weights)  # touched, content intact: hashed once, then re-stamped
    assert check_cache(path, "v1") is None
    stamped = json.loads((path / "MANIFEST.json").read_text())["files"][weights.name]["mtime_ns"]
    assert stamped == weights.stat().st_mtime_ns and len(builds) == 2


# One checkpoint layout everywhere (issue 27 item 9): the GGUF import and the default model's cache
# were written under `language_model.*`, which mlx-lm ("236 parameters not in model") and mlx-vlm
# (KeyError) refused; they now go through the converter's writer like `gemma-mlx convert`.


def peer_logits(peer: str, path: Path) -> np.ndarray:
    if peer == "mlx_lm":
        from mlx_lm.utils import load_model as peer_load

        model = peer_load(path)[0]
    else:
        from mlx_vlm.utils import load_model as peer_load

        model = peer_load(path)
    out = model(mx.array([IDS]))
    return np.array(getattr(out, "logits", out).astype(mx.float32))


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["mlx_lm", "mlx_vlm"])
def test_peers_load_the_gguf_import_and_the_default_model_cache(tiny, imported, cache, peer):
    pytest.importorskip(peer)
    names = mx.load(str(next(imported.glob("*.safetensors"))))
    assert names and all(k.startswith("model.") for k in names)  # mlx-lm's layout, as convert writes
    ours = np.array(load_model(imported)(mx.array([IDS])))
    # mlx-lm and mlx-vlm round Gemma 3's embedding scale sqrt(64) = 8 exactly: same logits
    for path in (imported, cache[0]()):
        diff = np.abs(peer_logits(peer, path) - ours).max()
        assert diff <= 1e-4, (path, diff)


def test_a_cache_of_the_old_layout_is_rebuilt(cache):
    """A cache written before the layout change (format 2, `language_model.*` names) is rebuilt."""
    get, builds = cache
    path = get()
    manifest = json.loads((path / "MANIFEST.json").read_text())
    (path / "MANIFEST.json").write_text(json.dumps({**manifest, "format": 2}))
    assert "another version" in check_cache(path, "v1")
    assert get() == path and len(builds) == 2 and check_cache(path, "v1") is None
    assert all(k.startswith("model.") for k in mx.load(str(next(path.glob("*.safetensors")))))
