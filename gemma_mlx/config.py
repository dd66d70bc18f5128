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


# Upper bounds far above any Gemma (12B: hidden 3840, 48 layers, vocab 262,144) that keep every
# derived size inside MLX's integer range, so a typo fails here and not as an overflow later.
MAX_SIZE = 1 << 20
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 30
# Quantization MLX can load: bits per mode, and the group sizes each mode allows (the fp modes
# have one). The converter plans with the same table.
QUANT_MODES = {"affine": (2, 3, 4, 5, 6, 8), "mxfp4": (4,), "mxfp8": (8,), "nvfp4": (4,)}
QUANT_GROUPS = {"affine": (32, 64, 128), "mxfp4": (32,), "mxfp8": (32,), "nvfp4": (16,)}
QUANT_DEFAULT_GROUP = {"affine": 64, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}


def check_int(value: Any, name: str, source: str, lo: int = 1, hi: int = MAX_SIZE) -> int:
    """`value` if it is an integer in [lo, hi] (JSON true/false and 8.7 are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(name, value, f"an integer in [{lo}, {hi}]", source)
    return value


def check_float(
    value: Any, name: str, source: str, lo: float = 0.0, hi: float = math.inf, hi_closed: bool = False
) -> float:
    """`value` as a float if it is a finite number in (lo, hi) (or (lo, hi] with `hi_closed`)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (lo < value < hi or (hi_closed and value == hi)):
        interval = f"({lo}, {hi}]" if hi_closed else f"({lo}, {hi})" if hi != math.inf else f"> {lo}"
        raise _fail(name, value, f"a finite number {interval}", source)
    return float(value)


def check_dict(value: Any, name: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(name, value, "a JSON object", source)
    return value


def check_quantization(q: Any, source: str, name: str = "quantization") -> dict | None:
    """The mlx-lm `quantization` block: global `bits`/`group_size`/`mode` (defaults 4/64/affine)
    and per-module entries that are `false` (float) or a dict of the same three."""
    if q is None:
        return None
    check_dict(q, name, source)

    def spec(d: dict, where: str, defaults: dict) -> dict:
        mode = d.get("mode", defaults["mode"])
        if not isinstance(mode, str) or mode not in QUANT_MODES:
            raise _fail(f"{where}.mode", mode, f"one of {', '.join(QUANT_MODES)}", source)
        bits = d.get("bits", defaults["bits"])
        if isinstance(bits, bool) or bits not in QUANT_MODES[mode]:
            raise _fail(f"{where}.bits", bits, f"one of {QUANT_MODES[mode]} for mode {mode}", source)
        group = d.get("group_size", defaults.get("group_size", QUANT_DEFAULT_GROUP[mode]))
        if isinstance(group, bool) or group not in QUANT_GROUPS[mode]:
            raise _fail(f"{where}.group_size", group, f"one of {QUANT_GROUPS[mode]} for mode {mode}", source)
        return {"mode": mode, "bits": bits, "group_size": group}

    top = spec(q, name, {"mode": "affine", "bits": 4})
    for key, value in q.items():
        if key in ("mode", "bits", "group_size", "quant_method"):
            continue
        if value is False:
            continue
        spec(check_dict(value, f"{name}.{key}", source), f"{name}.{key}", top)
    return q


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


def _rope(params: Any, head_dim: int, where: str, source: str = "config.json") -> Rope:
    check_dict(params, where, source)
    kind = params.get("rope_type", "default")
    theta = check_float(params.get("rope_theta", 10000.0), f"{where}.rope_theta", source)
    if kind == "default":
        return Rope(dims=head_dim, base=theta)
    if kind == "linear":
        if params.get("factor") is None:
            raise ConfigError(f"{source}: required field '{where}.factor' is missing (linear RoPE)")
        return Rope(
            dims=head_dim, base=theta, scale=1.0 / check_float(params["factor"], f"{where}.factor", source)
        )
    if kind == "proportional":
        # HF `_compute_proportional_rope_parameters`: the first int(p*D//2) frequencies use the
        # full head_dim as denominator, the rest are zero (MLX: infinite wavelength).
        partial = check_float(
            params.get("partial_rotary_factor", 1.0), f"{where}.partial_rotary_factor", source, 0.0, 1.0, True
        )
        angles = int(partial * head_dim // 2)
        factor = check_float(params.get("factor", 1.0), f"{where}.factor", source)
        freqs = [factor * theta ** (2 * i / head_dim) for i in range(angles)]
        return Rope(dims=head_dim, base=None, freqs=tuple(freqs + [math.inf] * (head_dim // 2 - angles)))
    raise _fail(f"{where}.rope_type", kind, "'default', 'linear' or 'proportional'", source)


def _gemma3_rope_parameters(t: dict, source: str) -> dict:
    """Gemma 3 configs come in two schemas: `rope_parameters` per layer type, or the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling` trio (HF `convert_rope_params_to_dict`)."""
    given = check_dict(t.get("rope_parameters") or {}, "rope_parameters", source)
    rp = {k: dict(v) if isinstance(v, dict) else v for k, v in given.items() if v is not None}
    if SLIDING not in rp and FULL not in rp and "rope_type" in rp:  # one dict for both types
        rp = {FULL: dict(rp), SLIDING: dict(rp)}
    full = rp.setdefault(FULL, {"rope_type": "default"})
    if t.get("rope_scaling"):
        full.update(check_dict(t["rope_scaling"], "rope_scaling", source))
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

    # A null optional field means "the default", as in transformers' configs.
    def size(name: str, default: Any = None, hi: int = MAX_SIZE, lo: int = 1) -> int:
        value = get(name, required=default is None)
        return check_int(default if value is None else value, f"{where}.{name}", source, lo, hi)

    def number(name: str, default: float, hi: float = math.inf) -> float:
        value = get(name)
        return check_float(default if value is None else value, f"{where}.{name}", source, 0.0, hi)

    n = size("num_hidden_layers", hi=4096)
    heads = size("num_attention_heads", hi=4096)
    head_dim = size("head_dim", hi=1 << 16)
    kv_heads = size("num_key_value_heads", heads, hi=heads)
    vocab = size("vocab_size", hi=MAX_VOCAB)
    if gemma4:
        default_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    else:
        pattern = size("sliding_window_pattern", 6, hi=4096)
        default_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    layer_types = get("layer_types") or default_types
    if not isinstance(layer_types, list | tuple):
        raise _fail(f"{where}.layer_types", layer_types, "a list of layer types", source)
    layer_types = tuple(layer_types)
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
            per_layer = check_dict(get("per_layer_config"), f"{where}.per_layer_config", source)
            for k, v in per_layer.items():
                if not (isinstance(k, str) and k.isdigit() and int(k) < n):
                    raise _fail(f"{where}.per_layer_config", k, f"layer indices below {n}", source)
                overrides[int(k)] = dict(check_dict(v, f"{where}.per_layer_config.{k}", source))
        else:  # released 12B config (transformers 5.10.dev): global_* fields
            # HF `Gemma4UnifiedTextConfig.__post_init__`: full layers always take global_head_dim
            # (default 512); num_global_key_value_heads applies only with attention_k_eq_v.
            o: dict[str, int] = {"head_dim": size("global_head_dim", 512, hi=1 << 16)}
            if k_eq_v and get("num_global_key_value_heads") is not None:
                o["num_key_value_heads"] = size("num_global_key_value_heads", hi=heads)
            overrides = {i: o for i, lt in enumerate(layer_types) if lt == FULL}
        rope_params = check_dict(
            get("rope_parameters")
            or {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            },
            f"{where}.rope_parameters",
            source,
        )
    else:
        rope_params = _gemma3_rope_parameters(t, source)

    layers = []
    for i, lt in enumerate(layer_types):
        o = overrides.get(i, {})
        at = f"{where}.per_layer_config.{i}" if i in overrides else where
        hd = check_int(o.get("head_dim", head_dim), f"{at}.head_dim", source, 1, 1 << 16)
        kvh = check_int(o.get("num_key_value_heads", kv_heads), f"{at}.num_key_value_heads", source, 1, heads)
        if hd % 2:
            raise _fail(f"{at}.head_dim", hd, "an even number (RoPE rotates pairs)", source)
        if heads % kvh:
            raise _fail(f"{where}.num_key_value_heads (layer {i})", kvh, f"a divisor of {heads}", source)
        if lt not in rope_params:
            raise ConfigError(f"{source}: '{where}.rope_parameters' has no entry for '{lt}'")
        rope = _rope(rope_params[lt], hd, f"{where}.rope_parameters.{lt}", source)
        layers.append(LayerSpec(lt == SLIDING, hd, kvh, k_eq_v and lt == FULL, rope))

    def token_id(name: str, value: Any) -> int:
        return check_int(value, f"{where}.{name}", source, 0, vocab - 1)

    eos = get("eos_token_id", 1)
    softcap = get("final_logit_softcapping")
    return TextConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=size("hidden_size"),
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=n,
        num_attention_heads=heads,
        layer_types=layer_types,
        layers=tuple(layers),
        sliding_window=size("sliding_window", 1024 if gemma4 else 4096, hi=MAX_POSITIONS),
        rms_norm_eps=number("rms_norm_eps", 1e-6, hi=1.0),
        max_position_embeddings=size(
            "max_position_embeddings", 262144 if gemma4 else 131072, hi=MAX_POSITIONS
        ),
        final_logit_softcapping=None if softcap is None else number("final_logit_softcapping", 0.0),
        norm_offset=0.0 if gemma4 else 1.0,
        query_scale=1.0 if gemma4 else number("query_pre_attn_scalar", 256) ** -0.5,
        layer_scalar=gemma4,
        v_norm=gemma4,
        bidirectional_vision=bidir == "vision",
        pad_token_id=token_id("pad_token_id", get("pad_token_id", 0) or 0),
        bos_token_id=token_id("bos_token_id", get("bos_token_id", 2) or 2),
        eos_token_ids=tuple(token_id("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos])),
    )


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Parse a full config dict: `gemma4_unified` (text + vision + audio) or a bare text model."""
    model_type = raw.get("model_type")
    if model_type not in TOP_TYPES:
        raise _fail("model_type", model_type, f"one of {TOP_TYPES}", source)
    quant = check_quantization(raw.get("quantization"), source)
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
        if d is None:
            return None
        values = {}
        for k, v in check_dict(d, name, source).items():
            if k == "rms_norm_eps":
                values[k] = check_float(v, f"{name}.{k}", source, 0.0, 1.0)
            elif k in fields_of[cls]:
                values[k] = check_int(v, f"{name}.{k}", source)
        return cls(**values)

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
    for k, v in ids.items():
        check_int(v, k, source, 0, MAX_VOCAB)
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
    check_quantization(raw.get("quantization"), source)
    return DrafterConfig(
        parse_text_config(raw["text_config"], source, drafter=True),
        check_int(raw.get("backbone_hidden_size", 3840), "backbone_hidden_size", source),
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
