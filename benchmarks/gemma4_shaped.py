"""A random Gemma-4-12B-shaped checkpoint (and MTP drafter) small enough to build on a laptop, big
enough that decode reads mostly weights: the released config (`tests/data/gemma-4-12b-config.json`)
with its real hidden size 3840, FFN 15360, head geometry (16 heads; sliding 8 KV heads of 256,
full 1 KV head of 512, k_eq_v) and window, but `layers` decoder layers (the last one full) and a
`vocab`-token vocabulary (the real 262144 would make the LM head most of a 2-layer model).

    python benchmarks/gemma4_shaped.py OUT_DIR [--layers 2] [--vocab 16384] [--bits 4] [--drafter]

Writes OUT_DIR/target (quantized by our converter's writer, `write_checkpoint`) and with
--drafter OUT_DIR/drafter: the 12B assistant's geometry (hidden 1024, FFN 8192, 4 query-only
layers [sliding x3, full]) with the same vocabulary, float. Random weights, so drafts are almost
never accepted: what the drafter rows measure is the cost of the speculative loop.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.config import parse_config, parse_drafter_config
from gemma_mlx.convert import write_checkpoint
from gemma_mlx.convert.quantize import QuantSpec
from gemma_mlx.models.drafter import Drafter
from gemma_mlx.models.gemma import Model

CONFIG_12B = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma-4-12b-config.json"


def target_config(layers: int, vocab: int, hidden: int = 3840) -> dict:
    """`hidden` other than 3840 (FFN 4x, vision projection alike) is only for quick plumbing
    checks: the point of this model is the 12B's real matrix shapes."""
    config = json.loads(CONFIG_12B.read_text())
    text = config["text_config"]
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    text.update(
        num_hidden_layers=layers, layer_types=types, vocab_size=vocab, vocab_size_per_layer_input=vocab
    )
    text.update(hidden_size=hidden, intermediate_size=4 * hidden)
    config["vision_config"].update(mm_embed_dim=hidden, output_proj_dims=hidden)
    config["vocab_size"] = vocab  # mlx-lm reads the top-level one
    return config


def drafter_config(target: dict) -> dict:
    """The 12B assistant's config (design notes section 8.1) for `target`'s vocabulary."""
    text = copy.deepcopy(target["text_config"])
    text.update(
        hidden_size=1024,
        intermediate_size=8192,
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        num_kv_shared_layers=4,
        final_logit_softcapping=None,
    )
    return {
        "architectures": ["Gemma4UnifiedAssistantForCausalLM"],
        "model_type": "gemma4_unified_assistant",
        "backbone_hidden_size": target["text_config"]["hidden_size"],
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "text_config": text,
        "dtype": "float32",
    }


def random_weights(module, seed: int, dtype: mx.Dtype) -> Iterator[tuple[str, mx.array]]:
    """One random tensor at a time (norms and scalars near 1, the rest N(0, 0.02)), so the float
    model never sits in memory whole: parameters of a fresh module are lazy until evaluated."""
    for i, (name, p) in enumerate(tree_flatten(module.parameters())):
        key = mx.random.key(seed * 100_003 + i)
        if name.endswith(("norm.weight", "layer_scalar")):
            a = 1 + 0.1 * mx.random.normal(p.shape, key=key)
        else:
            a = 0.02 * mx.random.normal(p.shape, key=key)
        yield name, a.astype(dtype)


def build(
    out: Path, layers: int = 2, vocab: int = 16384, bits: int = 4, drafter: bool = False, hidden: int = 3840
) -> dict:
    """Write `out/target` (and `out/drafter`); returns {"target": path, "drafter": path or None}."""
    config = target_config(layers, vocab, hidden)
    model = Model(parse_config(config))
    write_checkpoint(
        out / "target",
        config,
        random_weights(model, 0, mx.bfloat16),
        quantization=QuantSpec(bits, 64),
        force=True,
    )
    paths = {"target": out / "target", "drafter": None}
    if drafter:
        dconfig = drafter_config(config)
        d = Drafter(parse_drafter_config(dconfig))
        write_checkpoint(out / "drafter", dconfig, random_weights(d, 1, mx.float32), force=True)
        paths["drafter"] = out / "drafter"
    return paths


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--drafter", action="store_true")
    p.add_argument("--hidden", type=int, default=3840, help="only for quick plumbing checks")
    a = p.parse_args()
    print(build(a.out, a.layers, a.vocab, a.bits, a.drafter, a.hidden))


if __name__ == "__main__":
    main()
