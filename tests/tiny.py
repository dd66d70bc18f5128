"""Tiny checkpoints and tokenizers made without torch or transformers (the fast test tier).

`UNIFIED_CONFIG` is the config.json transformers 5.24 saves for `Gemma4UnifiedConfig(text_config=TEXT,
vision_config=VISION, audio_config={})` (copied from a saved reference model), so the checkpoints
here use the real schema and tensor names; their weights are random MLX ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from gemma_mlx.config import parse_config
from gemma_mlx.models.gemma import Model

VOCAB = 512
# Two layer types with distinct geometry: sliding (4 q / 2 kv heads of 32) and full
# (1 kv head of 64, k_eq_v, proportional RoPE); window 12 so short tests cross it often.
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    sliding_window=12,
    attention_k_eq_v=True,
    final_logit_softcapping=30.0,
    layer_types=["sliding_attention"] * 3
    + ["full_attention"]
    + ["sliding_attention"] * 3
    + ["full_attention"],
)
VISION = dict(mm_embed_dim=128, mm_posemb_size=64, output_proj_dims=128)

UNIFIED_CONFIG = {
    "architectures": ["Gemma4UnifiedForConditionalGeneration"],
    "audio_config": {"audio_embed_dim": 640, "model_type": "gemma4_unified_audio", "rms_norm_eps": 1e-06},
    "audio_token_id": 258881,
    "boa_token_id": 256000,
    "boi_token_id": 255999,
    "dtype": "float32",
    "eoa_token_index": 258883,
    "eoi_token_id": 258882,
    "image_token_id": 258880,
    "model_type": "gemma4_unified",
    "text_config": {
        "attention_bias": False,
        "attention_k_eq_v": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 32,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 128,
        "intermediate_size": 256,
        "layer_types": TEXT["layer_types"],
        "max_position_embeddings": 262144,
        "model_type": "gemma4_unified_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 8,
        "num_key_value_heads": 2,
        "num_kv_shared_layers": 0,
        "pad_token_id": 0,
        "per_layer_config": {
            "3": {"head_dim": 64, "num_key_value_heads": 1},
            "7": {"head_dim": 64, "num_key_value_heads": 1},
        },
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": 12,
        "tie_word_embeddings": True,
        "use_bidirectional_attention": "vision",
        "use_double_wide_mlp": False,
        "vocab_size": VOCAB,
    },
    "tie_word_embeddings": True,
    "video_token_id": 258884,
    "vision_config": {
        "mm_embed_dim": 128,
        "mm_posemb_size": 64,
        "model_type": "gemma4_unified_vision",
        "output_proj_dims": 128,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "rms_norm_eps": 1e-06,
    },
}

GEMMA3_CONFIG = dict(  # a tiny Gemma 3 text model: sliding window 12, one global layer in six
    model_type="gemma3_text",
    architectures=["Gemma3ForCausalLM"],
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=12,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
)

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's vocabulary
ADDED = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|image|>", "<|audio|>"]
# tool-call markup, appended so the ids above stay as tests know them
ADDED += [
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
]
# Gemma 4's media markers and the video placeholder, appended so the ids above stay as they were
ADDED += ["<|image>", "<image|>", "<|audio>", "<audio|>", "<|video|>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]  # regular vocabulary entries, as in Gemma's tokenizer
# accented letters and two CJK characters are in the training text, so some multi-byte characters
# are whole tokens and the rest (Korean, kana, emoji) come as byte-fallback tokens
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, this is a tiny tokenizer with digits 0123456789.",
    "déjà vu, naïve café, Ærøskøbing",
    "漢字 漢字",
]


def save_tokenizer(path: Path, add_bos_token: bool = True) -> Path:
    """A tiny Gemma-like tokenizer.json (Replace(" ", "▁") normalizer, no pre-tokenizer, BPE with
    byte fallback, decoder Replace + ByteFallback + Fuse; ids < VOCAB) plus the tokenizer and
    generation configs a real checkpoint ships, so the generation stack runs end to end."""
    from tokenizers import AddedToken, decoders, models, normalizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL, show_progress=False)
    )
    trained = json.loads(base.to_str())["model"]
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL]
    vocab = {t: i for i, t in enumerate(SPECIAL + BYTES + learned)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL + ADDED])
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": add_bos_token,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    end_of_turn = tok.token_to_id("<turn|>")
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": [1, end_of_turn]})
    )
    return path


def save_sp_tokenizer(
    path: Path, text: str, vocab_size: int = 360, user_defined: tuple[str, ...] = ("<|image|>",)
) -> Path:
    """`path/tokenizer.model`: a Gemma-like SentencePiece BPE model trained on `text` (byte
    fallback, Gemma's special ids, control turn markers as Gemma 3 GGUFs make them, no dummy prefix)."""
    import sentencepiece as spm

    corpus = path / "corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "tokenizer"),
        vocab_size=vocab_size,
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
        control_symbols=["<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=list(user_defined),
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    return path / "tokenizer.model"


def token_ids(path: Path) -> dict[str, int]:
    """Ids of the added (special) tokens of a tokenizer.json."""
    return {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}


def use_tokenizer_media_ids(path: Path) -> None:
    """Point the config's image/audio/video placeholder ids at the tiny tokenizer's, so prompts with
    media run end to end (the real ids are beyond the tiny vocabulary)."""
    ids = token_ids(path)
    rewrite_config(
        path,
        lambda c: c.update(
            image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"], video_token_id=ids["<|video|>"]
        ),
    )


def randomized_weights(model: Model, seed: int) -> dict[str, mx.array]:
    """Random weights with norm weights and layer scalars away from their all-ones init (as the
    reference models get), so a skipped norm or scalar changes the output."""
    rng = np.random.default_rng(seed)

    def init(name: str, p: mx.array) -> mx.array:
        if name.endswith(("norm.weight", "layer_scalar")):
            return mx.array(rng.uniform(0.5, 1.5, p.shape).astype(np.float32))
        return mx.array(rng.normal(0, 0.05, p.shape).astype(np.float32))

    return dict(tree_flatten(tree_map_with_path(init, model.parameters())))


def save_checkpoint(path: Path, config: dict | None = None, seed: int = 0, tokenizer: bool = True) -> Path:
    """A runnable tiny checkpoint (default: the unified model with vision and audio) with random
    weights under our names, the tiny tokenizer and media ids that fit its vocabulary."""
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config or UNIFIED_CONFIG)
    model = Model(parse_config(config))
    mx.save_safetensors(str(path / "model.safetensors"), randomized_weights(model, seed))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        save_tokenizer(path)
        if config.get("model_type") == "gemma4_unified":
            use_tokenizer_media_ids(path)
    return path


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def rewrite_config(path: Path, fn) -> None:
    """Edit `path/config.json` in place with `fn(dict)`."""
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


class Oracle:
    """A drafter that knows the target's continuation `sequence` (prompt + output) and errs on
    every `wrong`-th draft (1: always), to drive full and partial acceptance through the rollback
    paths without a drafter model."""

    def __init__(self, sequence: list[int], vocab: int, wrong: int = 0):
        self.sequence, self.vocab, self.wrong = sequence, vocab, wrong
        self.calls = 0

    def draft(self, target, cache, token, hidden, n):
        position = cache[0].offset  # `token`'s position: the caches hold everything before it
        drafts = []
        for step in range(n):
            index = position + 1 + step
            self.calls += 1
            draft = self.sequence[index] if index < len(self.sequence) else 0
            if self.wrong and self.calls % self.wrong == 0:
                draft = (draft + 1) % self.vocab
            drafts.append(draft)
        return mx.array([drafts])
