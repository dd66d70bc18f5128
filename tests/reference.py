"""Reference helpers: tiny random Gemma 4 unified models built and saved by transformers (the
reference), with the real on-disk tensor names and config schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

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


def randomize(model) -> None:
    """Move norm weights and layer scalars away from their all-ones init, so a wrong norm
    offset or a skipped scalar changes the logits."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention scale is 1.0 on RMS-normed q/k: larger weights make the softmax so
                # peaked that float32 itself drifts ~1e-4 from float64 (measured), masking bugs.
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.2)
            elif ("norm" in name and name.endswith("weight")) or name.endswith("layer_scalar"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def build(kind: str, path: Path, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "unified":
        cfg = transformers.Gemma4UnifiedConfig(text_config=TEXT, vision_config=VISION, audio_config={})
        model = transformers.Gemma4UnifiedForConditionalGeneration(cfg)
    else:
        model = transformers.Gemma4UnifiedForCausalLM(transformers.Gemma4UnifiedTextConfig(**TEXT))
    randomize(model)
    model = model.float().eval()
    model.save_pretrained(path)
    return model


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def rewrite_config(path: Path, fn) -> None:
    """Edit `path/config.json` in place with `fn(dict)`."""
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def save_tokenizer(path: Path) -> None:
    """A tiny Gemma-like tokenizer (BPE with byte fallback, metaspace, ids < VOCAB) plus the
    tokenizer/generation configs a real checkpoint ships, so the generation stack runs end to end."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, this is a tiny tokenizer."]
    base.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=150, special_tokens=SPECIAL, show_progress=False)
    )
    d = json.loads(base.to_str())
    learned = [t for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]  # regular vocab entries, as in Gemma's tokenizer
    vocab = {t: i for i, t in enumerate(SPECIAL + byte_tokens + learned)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in d["model"]["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    extra = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|image|>", "<|audio|>"]
    tools = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>"]
    extra += [*tools, '<|"|>']  # appended: earlier ids stay as other tests know them
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL + extra])
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    end_of_turn = tok.token_to_id("<turn|>")
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": [1, end_of_turn]})
    )
