"""PaliGemma configuration, read from the checkpoint's own `config.json`.

Never trust class defaults for a real checkpoint (SPEC.md §2.1): the real vocabulary is 257216
rows and the real SigLIP MLP is 4304 wide, while HF's `PaliGemmaConfig()` says 257152 and 4096.
The defaults below are HF's for a key that is *absent from the file* (as HF fills them), so a
config.json that omits `head_dim` or `rms_norm_eps` means what it means to transformers.

Dimension letters used in shape comments across npvlm (see nn.py for the full legend):
D text width, Dv vision width, H query heads, K kv heads, E head dim, F MLP width, V vocab,
N image tokens (patches), P patch size, S image side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, show
from ..io.files import bad_number, check_numbers, read_json_object

SUPPORTED_MODEL_TYPES = ("paligemma",)
SUPPORTED_TEXT_TYPES = ("gemma", "gemma2")
SUPPORTED_VISION_TYPES = ("siglip_vision_model",)
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu_tanh")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (So400m/14 in the real checkpoints)."""

    hidden_size: int = 768  # Dv: 1152 in PaliGemma
    intermediate_size: int = 3072  # Fv: 4304 in PaliGemma (not 4096)
    num_hidden_layers: int = 12  # 27 in PaliGemma
    num_attention_heads: int = 12  # 16 in PaliGemma, head dim 72
    num_channels: int = 3  # RGB
    image_size: int = 224  # S: 224, 448 or 896
    patch_size: int = 16  # P: 14 in PaliGemma
    layer_norm_eps: float = 1e-6  # Flax's default, not PyTorch's 1e-5
    hidden_act: str = "gelu_pytorch_tanh"  # tanh-approximated GELU
    use_head: bool = True  # `vision_use_head`: a pooling head PaliGemma never uses; its weights are skipped

    @property
    def num_patches(self) -> int:  # N = (S / P)^2 image tokens, no CLS token
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    model_type: str = "gemma"  # "gemma" or "gemma2": picks the decoder layer
    vocab_size: int = 256000  # V: 257216 in the real checkpoints (257152 + 2, padded to 64)
    hidden_size: int = 3072  # D: 2048 for PG1, 2304 for PG2-3B
    intermediate_size: int = 24576  # F: GeGLU width, 16384 for PG1
    num_hidden_layers: int = 28  # 18 for PG1, 26 for PG2-3B
    num_attention_heads: int = 16  # H query heads
    num_key_value_heads: int = 16  # K kv heads: 1 (MQA) for PG1, 4 (GQA) for PG2-3B
    head_dim: int = 256  # E, not necessarily D / H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192  # the longest sequence (image + prompt + answer)
    hidden_act: str = "gelu_pytorch_tanh"
    # Gemma 2 only (None / 0 for Gemma 1):
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power instead of E's
    attn_logit_softcapping: float | None = None  # s = c * tanh(s / c) before the mask
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c)
    sliding_window: int | None = None  # local attention window on the "sliding" layers
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:  # multiplies q . k
        scalar = self.query_pre_attn_scalar if self.is_gemma2 else self.head_dim
        return float(scalar) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.is_gemma2 and self.sliding_window and self.layer_types[layer] == "sliding_attention")


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 256000  # id of "<image>": 257152 in the real checkpoints
    projection_dim: int = 2048  # projector output width, must equal text D
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "PaliGemmaConfig":
        """Build from the dict of an HF PaliGemma config.json, with HF's defaults for absent keys."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{where}: model_type {_q(mt)} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        _check_numbers(d, "", where)
        try:
            vision = _vision_from_hf(d.get("vision_config"), where)
            text = _text_from_hf(d.get("text_config"), where)
            image_token = d.get("image_token_index", d.get("image_token_id", 256000))
            projection_dim = int(d.get("projection_dim", 2048))
            eos = d.get("eos_token_id", (d.get("text_config") or {}).get("eos_token_id", 1))
            eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
            tc = d.get("text_config") or {}
            cfg = cls(
                vision=vision,
                text=text,
                image_token_index=int(image_token),
                projection_dim=projection_dim,
                bos_token_id=int(d.get("bos_token_id", tc.get("bos_token_id", 2))),
                eos_token_ids=eos,
                pad_token_id=int(d.get("pad_token_id", tc.get("pad_token_id", 0)) or 0),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{where}: malformed value ({e})") from None
        cfg.validate(where)
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str) -> "PaliGemmaConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise ConfigError(f"{model_dir}: not a directory")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: not found (a PaliGemma model folder holds config.json and *.safetensors)")
        d = read_json_object(path, ConfigError)
        return cls.from_hf(d, where=path)

    def validate(self, where: str = "config.json") -> None:
        v, t = self.vision, self.text

        def need(ok, what):
            if not ok:
                raise ConfigError(f"{where}: {what}")

        for name, val in [("vision_config.hidden_size", v.hidden_size), ("vision_config.intermediate_size", v.intermediate_size),
                          ("vision_config.num_hidden_layers", v.num_hidden_layers), ("vision_config.num_attention_heads", v.num_attention_heads),
                          ("vision_config.image_size", v.image_size), ("vision_config.patch_size", v.patch_size),
                          ("text_config.vocab_size", t.vocab_size), ("text_config.hidden_size", t.hidden_size),
                          ("text_config.intermediate_size", t.intermediate_size), ("text_config.num_hidden_layers", t.num_hidden_layers),
                          ("text_config.num_attention_heads", t.num_attention_heads), ("text_config.num_key_value_heads", t.num_key_value_heads),
                          ("text_config.head_dim", t.head_dim), ("text_config.max_position_embeddings", t.max_position_embeddings)]:
            need(isinstance(val, int) and 0 < val <= 1 << 24, f"{name} must be a positive integer, got {_q(val)}")
        need(v.num_channels == 3, f"vision_config.num_channels must be 3 (RGB), got {v.num_channels}")
        need(v.image_size % v.patch_size == 0, f"vision_config.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        need(v.hidden_size % v.num_attention_heads == 0,
             f"vision_config.hidden_size {v.hidden_size} is not divisible by num_attention_heads {v.num_attention_heads}")
        need(t.num_attention_heads % t.num_key_value_heads == 0,
             f"text_config.num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads {t.num_key_value_heads}")
        need(t.head_dim % 2 == 0, f"text_config.head_dim must be even for RoPE, got {t.head_dim}")
        need(v.layer_norm_eps >= 0, f"vision_config.layer_norm_eps must be >= 0, got {v.layer_norm_eps}")
        need(t.rms_norm_eps >= 0, f"text_config.rms_norm_eps must be >= 0, got {t.rms_norm_eps}")
        need(t.rope_theta > 0, f"text_config.rope_theta must be > 0, got {t.rope_theta}")
        for name, tid in [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)] + [
                ("eos_token_id", e) for e in self.eos_token_ids]:
            need(0 <= tid < t.vocab_size, f"{name} {tid} is outside the vocabulary (text_config.vocab_size {t.vocab_size})")
        need(self.projection_dim == t.hidden_size,
             f"projection_dim {self.projection_dim} must equal text_config.hidden_size {t.hidden_size}")
        need(0 <= self.image_token_index < t.vocab_size,
             f"image_token_index {self.image_token_index} is outside the vocabulary (text_config.vocab_size {t.vocab_size})")
        need(self.num_image_tokens < t.max_position_embeddings,
             f"{self.num_image_tokens} image tokens do not fit text_config.max_position_embeddings {t.max_position_embeddings}")
        for act, name in [(v.hidden_act, "vision_config.hidden_act"), (t.hidden_act, "text_config.hidden_activation")]:
            need(act in SUPPORTED_ACTIVATIONS, f"{name} {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if t.is_gemma2:
            need(len(t.layer_types) == t.num_hidden_layers,
                 f"text_config.layer_types has {len(t.layer_types)} entries for {t.num_hidden_layers} layers")
            need(all(x in ("full_attention", "sliding_attention") for x in t.layer_types),
                 f"text_config.layer_types must hold 'full_attention' / 'sliding_attention', got {_q(list(t.layer_types))}")
            need(t.query_pre_attn_scalar > 0, f"text_config.query_pre_attn_scalar must be > 0, got {t.query_pre_attn_scalar}")
            need(t.sliding_window is None or t.sliding_window >= 1,
                 f"text_config.sliding_window must be a positive integer or null, got {t.sliding_window}")


# HF's defaults for a key absent from config.json live once: in the dataclass fields above (SiglipVisionConfig's
# and GemmaConfig's), plus what differs for Gemma 2, plus what PaliGemmaConfig puts in a missing sub-config.
_GEMMA2_DEFAULTS = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, sliding_window=4096)
_PALIGEMMA_VISION = dict(hidden_size=1152, intermediate_size=4096, num_hidden_layers=27, num_attention_heads=16,
                         image_size=224, patch_size=14, vision_use_head=False)  # So400m/14 at 224
_PALIGEMMA_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                       num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)  # Gemma 2B


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def _vision_from_hf(vc, where) -> VisionConfig:
    vc = dict(_PALIGEMMA_VISION) if vc is None else vc
    if not isinstance(vc, dict):
        raise ConfigError(f"{where}: vision_config must be an object")
    mt = vc.get("model_type", "siglip_vision_model")
    if mt not in SUPPORTED_VISION_TYPES:
        raise ConfigError(f"{where}: vision_config.model_type {_q(mt)} is not supported (supported: {', '.join(SUPPORTED_VISION_TYPES)})")
    _check_numbers(vc, "vision_config", where)
    g = _defaults(VisionConfig)
    g.update({k: vc[k] for k in g if k in vc})
    g["use_head"] = vc.get("vision_use_head", g["use_head"])
    return VisionConfig(**{k: type(default)(g[k]) for k, default in _defaults(VisionConfig).items()})


def _text_from_hf(tc, where) -> TextConfig:
    tc = dict(_PALIGEMMA_TEXT) if tc is None else tc
    if not isinstance(tc, dict):
        raise ConfigError(f"{where}: text_config must be an object")
    mt = tc.get("model_type", "gemma")
    if mt not in SUPPORTED_TEXT_TYPES:
        raise ConfigError(f"{where}: text_config.model_type {_q(mt)} is not supported (supported: {', '.join(SUPPORTED_TEXT_TYPES)})")
    _check_numbers(tc, "text_config", where)
    g = {**_defaults(TextConfig), **(_GEMMA2_DEFAULTS if mt == "gemma2" else {})}
    g.update({k: tc[k] for k in tc if k in g})
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5 / 4 names; only plain RoPE is implemented
        r = tc.get(key) or {}
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: text_config.{key} must be an object, got {_q(r)}")
        kind = r.get("rope_type") or r.get("type") or "default"
        if kind != "default":
            raise ConfigError(f"{where}: text_config.{key}.rope_type {_q(kind)} is not supported (supported: default)")
    rope = tc.get("rope_parameters") or {}
    if "rope_theta" in rope and bad_number(rope["rope_theta"], integer=False):
        raise ConfigError(f"{where}: text_config.rope_parameters.rope_theta must be a finite number, got {_q(rope['rope_theta'])}")
    theta = tc.get("rope_theta", rope.get("rope_theta", 10000.0))
    act = tc.get("hidden_activation") or tc.get("hidden_act") or "gelu_pytorch_tanh"
    n_layers = int(g["num_hidden_layers"])
    gemma2 = mt == "gemma2"
    layer_types = ()
    if gemma2:
        lt = tc.get("layer_types")
        if lt is not None and not isinstance(lt, list):
            raise ConfigError(f"{where}: text_config.layer_types must be a list, got {_q(lt)}")
        # HF Gemma 2: even layers (0, 2, ...) use the sliding window, odd layers attend globally
        layer_types = tuple(lt) if lt else tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    none_if_zero = lambda x: None if x in (None, 0, 0.0) else float(x)  # noqa: E731
    return TextConfig(
        model_type=mt,
        vocab_size=int(g["vocab_size"]),
        hidden_size=int(g["hidden_size"]),
        intermediate_size=int(g["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(g["num_attention_heads"]),
        num_key_value_heads=int(g["num_key_value_heads"]),
        head_dim=int(g["head_dim"] if g.get("head_dim") is not None else _div(g["hidden_size"], g["num_attention_heads"])),
        rms_norm_eps=float(g["rms_norm_eps"]),
        rope_theta=float(theta),
        max_position_embeddings=int(g["max_position_embeddings"]),
        hidden_act=str(act),
        query_pre_attn_scalar=float(g["query_pre_attn_scalar"]) if gemma2 else None,
        attn_logit_softcapping=none_if_zero(g.get("attn_logit_softcapping")) if gemma2 else None,
        final_logit_softcapping=none_if_zero(g.get("final_logit_softcapping")) if gemma2 else None,
        sliding_window=int(g["sliding_window"]) if gemma2 and g.get("sliding_window") else None,
        layer_types=layer_types,
    )


def _div(a, b) -> int:  # hidden_size // num_attention_heads; 0 (refused by validate) where heads <= 0
    return int(a) // int(b) if int(b) > 0 else 0


# Keys read as numbers, per section ("" = top level). None is allowed where HF reads null as "default" / "off".
_INT_KEYS = {
    "": ("image_token_index", "image_token_id", "projection_dim", "bos_token_id", "pad_token_id"),
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                      "image_size", "patch_size"),
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "bos_token_id",
                    "pad_token_id"),
}
_FLOAT_KEYS = {
    "": (),
    "vision_config": ("layer_norm_eps",),
    "text_config": ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
}
_NULLABLE = ("head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "pad_token_id")


def _check_numbers(d: dict, section: str, where: str) -> None:
    """The numeric keys of one section of config.json hold numbers; the error names the key and the value."""
    prefix = f"{section}." if section else ""
    check_numbers(d, _INT_KEYS[section], _FLOAT_KEYS[section], _NULLABLE, where, ConfigError, prefix)
    if section != "vision_config" and "eos_token_id" in d:
        eos = d["eos_token_id"]
        if any(bad_number(e, integer=True) for e in (eos if isinstance(eos, list) else [eos])):
            raise ConfigError(f"{where}: {prefix}eos_token_id must be an integer or a list of integers, got {_q(eos)}")


def _q(v) -> str:
    return show(v)
