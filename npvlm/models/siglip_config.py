"""SigLIP (two towers, HF `SiglipModel`) configuration, read from the checkpoint's own `config.json`.

model_type "siglip": a `vision_config` (SiglipVisionConfig) and a `text_config` (SiglipTextConfig).
Keys absent from the file take HF's class defaults (transformers 5 `configuration_siglip.py`), so a
config.json means what it means to transformers. The text head maps D -> projection_size (HF:
defaults to the text width); both towers' embeddings must be of one width for the dot product.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, show
from ..io.files import read_json_object
from .paligemma_config import SUPPORTED_ACTIVATIONS, VisionConfig


@dataclass(frozen=True)
class SiglipTextConfig:
    """SigLIP text tower: token + position embeddings, a bidirectional pre-LN encoder, last-token pooling."""

    vocab_size: int = 32000  # V
    hidden_size: int = 768  # Dt
    intermediate_size: int = 3072  # Ft
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64  # T: texts are padded to exactly this many tokens (16 for so400m-14-224)
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_token_id: int = 1
    projection_size: int | None = None  # head output width; None -> hidden_size (HF's __post_init__)

    @property
    def head_size(self) -> int:
        return self.hidden_size if self.projection_size is None else self.projection_size


@dataclass(frozen=True)
class SiglipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)

    @property
    def embed_dim(self) -> int:  # the width of both towers' unit vectors
        return self.vision.hidden_size

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "SiglipConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt != "siglip":
            raise ConfigError(f"{where}: model_type {show(mt)} is not a SigLIP model (expected 'siglip')")
        vc, tc = d.get("vision_config") or {}, d.get("text_config") or {}
        if not isinstance(vc, dict) or not isinstance(tc, dict):
            raise ConfigError(f"{where}: vision_config and text_config must be JSON objects")
        try:
            vision = VisionConfig(**_pick(VisionConfig, vc, {"vision_use_head": "use_head"}))
            text = SiglipTextConfig(**_pick(SiglipTextConfig, tc, {}))
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{where}: malformed value ({e})") from None
        cfg = cls(vision=vision, text=text)
        cfg.validate(where)
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str) -> "SiglipConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise ConfigError(f"{model_dir}: not a directory")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: not found (a SigLIP model folder holds config.json and *.safetensors)")
        return cls.from_hf(read_json_object(path, ConfigError), where=path)

    def validate(self, where: str = "config.json") -> None:
        v, t = self.vision, self.text

        def need(ok, what):
            if not ok:
                raise ConfigError(f"{where}: {what}")

        for name, val in [("vision_config.hidden_size", v.hidden_size), ("vision_config.intermediate_size", v.intermediate_size),
                          ("vision_config.num_hidden_layers", v.num_hidden_layers),
                          ("vision_config.num_attention_heads", v.num_attention_heads),
                          ("vision_config.image_size", v.image_size), ("vision_config.patch_size", v.patch_size),
                          ("text_config.vocab_size", t.vocab_size), ("text_config.hidden_size", t.hidden_size),
                          ("text_config.intermediate_size", t.intermediate_size),
                          ("text_config.num_hidden_layers", t.num_hidden_layers),
                          ("text_config.num_attention_heads", t.num_attention_heads),
                          ("text_config.max_position_embeddings", t.max_position_embeddings),
                          ("text_config.projection_size", t.head_size)]:
            need(isinstance(val, int) and not isinstance(val, bool) and 0 < val <= 1 << 24,
                 f"{name} must be a positive integer, got {show(val)}")
        need(v.num_channels == 3, f"vision_config.num_channels must be 3 (RGB), got {show(v.num_channels)}")
        need(v.image_size % v.patch_size == 0,
             f"vision_config.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        for tower, c in (("vision_config", v), ("text_config", t)):
            need(c.hidden_size % c.num_attention_heads == 0,
                 f"{tower}.hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}")
            need(c.hidden_act in SUPPORTED_ACTIVATIONS,
                 f"{tower}.hidden_act {show(c.hidden_act)} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
            need(isinstance(c.layer_norm_eps, float) and c.layer_norm_eps >= 0,
                 f"{tower}.layer_norm_eps must be a number >= 0, got {show(c.layer_norm_eps)}")
        need(v.use_head, "vision_config.vision_use_head is false: a SigLIP model needs the pooling head for image embeddings")
        need(t.head_size == v.hidden_size,
             f"text_config.projection_size {t.head_size} must equal vision_config.hidden_size {v.hidden_size} "
             "(image and text embeddings are compared by a dot product)")
        need(isinstance(t.pad_token_id, int) and 0 <= t.pad_token_id < t.vocab_size,
             f"text_config.pad_token_id {show(t.pad_token_id)} is outside the vocabulary ({t.vocab_size})")


def _pick(cls, d: dict, renames: dict) -> dict:
    """The fields of dataclass `cls` present in HF dict `d` (others keep HF's defaults), typed as the defaults."""
    out = {}
    names = {f.name: f for f in fields(cls)}
    for key, value in d.items():
        name = renames.get(key, key)
        if name not in names or value is None:
            continue
        default = names[name].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {show(value)}")
        elif isinstance(default, int) or name == "projection_size":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
                    value = value[0]  # HF allows image_size / patch_size as a square pair
                else:
                    raise ValueError(f"{key} must be an integer, got {show(value)}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {show(value)}")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {show(value)}")
        out[name] = value
    return out
