"""Model configuration parsed from a Hugging Face `config.json`.

One text backbone serves the Gemma family: Gemma 4 12B ("gemma4_unified") and Gemma 3 text
("gemma3_text") differ only in the switches of `TextConfig` (norm offset, query scale, layer
scalar, k_eq_v, RoPE kinds, softcap). The per-layer attention geometry is derived once here so
the model never re-reads the raw dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
TEXT_TYPES = ("gemma4_unified_text", "gemma3_text")
TOP_TYPES = ("gemma4_unified", *TEXT_TYPES)


class ConfigError(ValueError):
    """A config.json value we cannot run: names the field and what was expected."""


def _fail(field_name: str, got: Any, expected: str, source: str = "config.json") -> ConfigError:
    return ConfigError(f"{source}: field '{field_name}' is {got!r}, expected {expected}")


@dataclass(frozen=True)
class Rope:
    """RoPE of one layer type. `freqs` (MLX wavelengths) is set only for proportional RoPE."""

    dims: int
    base: float | None
    scale: float = 1.0
    freqs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LayerSpec:
    """Attention geometry of one decoder layer."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # V is the raw K projection: no v_proj (Gemma 4 full layers)
    rope: Rope


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rms_norm_eps: float
    max_position_embeddings: int
    final_logit_softcapping: float | None
    norm_offset: float  # Gemma 3 norms scale by (1 + w); Gemma 4 uses w directly
    query_scale: float  # Gemma 4: 1.0 (q/k are RMS-normed); Gemma 3: query_pre_attn_scalar**-0.5
    layer_scalar: bool  # Gemma 4 multiplies the residual stream by a learned scalar per layer
    v_norm: bool  # Gemma 4 applies a weightless RMSNorm to V
    bidirectional_vision: bool
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840

    @property
    def patch_dim(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    image_token_id: int = 258880
    audio_token_id: int = 258881
    video_token_id: int = 258884
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    boa_token_id: int = 256000
    eoa_token_id: int = 258883
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def multimodal(self) -> bool:
        return self.model_type == "gemma4_unified"


def _rope(params: dict, head_dim: int, where: str) -> Rope:
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", 10000.0))
    if kind == "default":
        return Rope(dims=head_dim, base=theta)
    if kind == "linear":
        return Rope(dims=head_dim, base=theta, scale=1.0 / float(params["factor"]))
    if kind == "proportional":
        # HF `_compute_proportional_rope_parameters`: the first int(p*D//2) frequencies use the
        # full head_dim as denominator, the rest are zero (MLX: infinite wavelength).
        angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        factor = float(params.get("factor", 1.0))
        freqs = [factor * theta ** (2 * i / head_dim) for i in range(angles)]
        return Rope(dims=head_dim, base=None, freqs=tuple(freqs + [math.inf] * (head_dim // 2 - angles)))
    raise _fail(f"{where}.rope_type", kind, "'default', 'linear' or 'proportional'")


def _gemma3_rope_parameters(t: dict) -> dict:
    """Gemma 3 configs come in two schemas: `rope_parameters` per layer type, or the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling` trio (HF `convert_rope_params_to_dict`)."""
    rp = {k: dict(v) for k, v in (t.get("rope_parameters") or {}).items() if v is not None}
    if SLIDING not in rp and FULL not in rp and "rope_type" in rp:  # one dict for both types
        rp = {FULL: dict(rp), SLIDING: dict(rp)}
    full = rp.setdefault(FULL, {"rope_type": "default"})
    if t.get("rope_scaling"):
        full.update(t["rope_scaling"])
    full.setdefault("rope_theta", t.get("rope_theta", 1_000_000.0))
    rp.setdefault(SLIDING, {"rope_type": "default"}).setdefault(
        "rope_theta", t.get("rope_local_base_freq", 10_000.0)
    )
    return rp


def parse_text_config(t: dict, source: str = "config.json", drafter: bool = False) -> TextConfig:
    """Parse a `gemma4_unified_text` or `gemma3_text` dict (the released and the 5.24 schemas).
    `drafter`: the MTP assistant's layers all reuse the target's K/V (num_kv_shared_layers)."""
    where = "text_config" if source.endswith("config.json") else source
    model_type = t.get("model_type")
    if model_type not in TEXT_TYPES:
        raise _fail(f"{where}.model_type", model_type, f"one of {TEXT_TYPES}", source)
    gemma4 = model_type == "gemma4_unified_text"

    def get(name: str, default: Any = None, required: bool = False) -> Any:
        if required and t.get(name) is None:
            raise ConfigError(f"{source}: required field '{where}.{name}' is missing")
        return t.get(name, default)

    n = int(get("num_hidden_layers", required=True))
    heads = int(get("num_attention_heads", required=True))
    head_dim = int(get("head_dim", required=True))
    kv_heads = int(get("num_key_value_heads", heads))
    if gemma4:
        default_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    else:
        pattern = int(get("sliding_window_pattern", 6))
        default_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    layer_types = tuple(get("layer_types") or default_types)
    if len(layer_types) != n:
        raise _fail(f"{where}.layer_types", f"{len(layer_types)} entries", f"{n} (num_hidden_layers)", source)
    for i, lt in enumerate(layer_types):
        if lt not in (SLIDING, FULL):
            raise _fail(f"{where}.layer_types[{i}]", lt, f"'{SLIDING}' or '{FULL}'", source)
    if gemma4 and layer_types[-1] != FULL:
        # HF forces this silently; a checkpoint trained otherwise would be mis-run, so refuse.
        raise _fail(f"{where}.layer_types[{n - 1}]", layer_types[-1], f"'{FULL}' (last layer)", source)

    act = get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise _fail(f"{where}.hidden_activation", act, "'gelu_pytorch_tanh'", source)
    for name, ok in (("num_kv_shared_layers", n if drafter else 0), ("hidden_size_per_layer_input", 0)):
        if (get(name, 0) or 0) != ok:
            raise _fail(f"{where}.{name}", get(name), f"{ok} (not used by the 12B)", source)
    if get("enable_moe_block", False):
        raise _fail(f"{where}.enable_moe_block", True, "false (dense model)", source)
    if get("attention_bias", False):
        raise _fail(f"{where}.attention_bias", True, "false", source)
    if get("attn_logit_softcapping") is not None:
        raise _fail(f"{where}.attn_logit_softcapping", get("attn_logit_softcapping"), "null", source)
    bidir = get("use_bidirectional_attention")
    if bidir not in (None, False, "vision"):
        raise _fail(f"{where}.use_bidirectional_attention", bidir, "null or 'vision'", source)

    k_eq_v = bool(get("attention_k_eq_v", False)) if gemma4 else False
    overrides: dict[int, dict] = {}
    if gemma4:
        if get("per_layer_config") is not None:  # configs saved by transformers >= 5.24
            overrides = {int(k): dict(v) for k, v in get("per_layer_config").items()}
        else:  # released 12B config (transformers 5.10.dev): global_* fields
            # HF `Gemma4UnifiedTextConfig.__post_init__`: full layers always take global_head_dim
            # (default 512); num_global_key_value_heads applies only with attention_k_eq_v.
            o: dict[str, int] = {"head_dim": int(get("global_head_dim", 512))}
            if k_eq_v and get("num_global_key_value_heads") is not None:
                o["num_key_value_heads"] = int(get("num_global_key_value_heads"))
            overrides = {i: o for i, lt in enumerate(layer_types) if lt == FULL}
        rope_params = get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
    else:
        rope_params = _gemma3_rope_parameters(t)

    layers = []
    for i, lt in enumerate(layer_types):
        o = overrides.get(i, {})
        hd, kvh = int(o.get("head_dim", head_dim)), int(o.get("num_key_value_heads", kv_heads))
        if heads % kvh:
            raise _fail(f"{where}.num_key_value_heads (layer {i})", kvh, f"a divisor of {heads}", source)
        if lt not in rope_params:
            raise ConfigError(f"{source}: '{where}.rope_parameters' has no entry for '{lt}'")
        rope = _rope(rope_params[lt], hd, f"{where}.rope_parameters.{lt}")
        layers.append(LayerSpec(lt == SLIDING, hd, kvh, k_eq_v and lt == FULL, rope))

    eos = get("eos_token_id", 1)
    return TextConfig(
        model_type=model_type,
        vocab_size=int(get("vocab_size", required=True)),
        hidden_size=int(get("hidden_size", required=True)),
        intermediate_size=int(get("intermediate_size", required=True)),
        num_hidden_layers=n,
        num_attention_heads=heads,
        layer_types=layer_types,
        layers=tuple(layers),
        sliding_window=int(get("sliding_window", 1024 if gemma4 else 4096)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(get("max_position_embeddings", 262144 if gemma4 else 131072)),
        final_logit_softcapping=get("final_logit_softcapping"),
        norm_offset=0.0 if gemma4 else 1.0,
        query_scale=1.0 if gemma4 else float(get("query_pre_attn_scalar", 256)) ** -0.5,
        layer_scalar=gemma4,
        v_norm=gemma4,
        bidirectional_vision=bidir == "vision",
        pad_token_id=int(get("pad_token_id", 0) or 0),
        bos_token_id=int(get("bos_token_id", 2) or 2),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
    )


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Parse a full config dict: `gemma4_unified` (text + vision + audio) or a bare text model."""
    model_type = raw.get("model_type")
    if model_type not in TOP_TYPES:
        raise _fail("model_type", model_type, f"one of {TOP_TYPES}", source)
    quant = raw.get("quantization")
    if model_type != "gemma4_unified":
        return ModelConfig(
            model_type=model_type, text=parse_text_config(raw, source), quantization=quant, raw=raw
        )

    if not isinstance(raw.get("text_config"), dict):
        raise ConfigError(f"{source}: 'text_config' is missing (required for model_type 'gemma4_unified')")
    text = parse_text_config(raw["text_config"], source)
    fields_of = {
        VisionConfig: VisionConfig.__dataclass_fields__,
        AudioConfig: AudioConfig.__dataclass_fields__,
    }

    def sub(name: str, cls: type) -> Any:
        d = raw.get(name)
        return None if d is None else cls(**{k: v for k, v in d.items() if k in fields_of[cls]})

    vision, audio = sub("vision_config", VisionConfig), sub("audio_config", AudioConfig)
    if vision is not None and vision.output_proj_dims != vision.mm_embed_dim:
        raise _fail("vision_config.output_proj_dims", vision.output_proj_dims, "== mm_embed_dim", source)
    ids = {
        k: raw[k]
        for k in (
            "image_token_id",
            "audio_token_id",
            "video_token_id",
            "boi_token_id",
            "eoi_token_id",
            "boa_token_id",
        )
        if raw.get(k) is not None
    }
    if raw.get("eoa_token_index") is not None:  # HF spells this one "_index"
        ids["eoa_token_id"] = raw["eoa_token_index"]
    return ModelConfig(
        model_type=model_type, text=text, vision=vision, audio=audio, quantization=quant, raw=raw, **ids
    )


@dataclass(frozen=True)
class DrafterConfig:
    """The MTP assistant (`gemma4_unified_assistant`): query-only layers over the target's K/V."""

    text: TextConfig
    backbone_hidden_size: int


def parse_drafter_config(raw: dict, source: str = "config.json") -> DrafterConfig:
    if raw.get("model_type") != "gemma4_unified_assistant":
        raise _fail("model_type", raw.get("model_type"), "'gemma4_unified_assistant'", source)
    if raw.get("use_ordered_embeddings"):
        raise _fail("use_ordered_embeddings", True, "false (the 12B drafter's dense head)", source)
    if not isinstance(raw.get("text_config"), dict):
        raise ConfigError(f"{source}: 'text_config' is missing")
    return DrafterConfig(
        parse_text_config(raw["text_config"], source, drafter=True),
        int(raw.get("backbone_hidden_size", 3840)),
    )


def config_file(path: str | Path) -> Path:
    """`<path>/config.json`, or `path` itself when it names a file."""
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def read_config(path: str | Path) -> dict:
    """The JSON object of `<path>/config.json` (or a config.json path), unparsed."""
    p = config_file(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no config.json found")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return raw


def load_config(path: str | Path) -> ModelConfig:
    """Read and parse `<path>/config.json` (or a config.json path)."""
    return parse_config(read_config(path), str(config_file(path)))
