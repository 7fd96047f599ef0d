"""SigLIP two-tower model (HF `SiglipModel`): image and text embeddings, sigmoid-scored pairs.

    image_embeds = normalize(map_head(vision_tower(pixels)))   [B, D]
    text_embeds  = normalize(text_tower(ids))                  [C, D]
    logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T + logit_bias    [B, C]
    probabilities    = sigmoid(logits)  (each pair on its own; not a softmax over labels)

References: Zhai et al. 2023 "Sigmoid Loss for Language Image Pre-Training" (eq. 1, and §3.2 on
t = exp(t'), b); HF transformers `modeling_siglip.py` `SiglipModel.forward`; SPEC.md §13.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .siglip_config import SiglipConfig
from .siglip_text import text_tower
from .siglip_vision import map_head, vision_tower


def l2_normalize(x):  # [..., D] -> [..., D], unit rows (as torch's x / x.norm(dim=-1))
    xp = array_namespace(x)
    return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))


def image_embeds(params, pixels, *, cfg: SiglipConfig):  # [B, 3, S, S] -> unit [B, D]
    vm = params["vision_model"]
    x = vision_tower(pixels, vm["embeddings"], vm["encoder"], vm["post_layernorm"], cfg=cfg.vision)  # [B, N, Dv]
    return l2_normalize(map_head(x, **vm["head"], cfg=cfg.vision))


def text_embeds(params, ids, *, cfg: SiglipConfig, valid=None):  # [C, T] int (, bool [C, T]) -> unit [C, D]
    return l2_normalize(text_tower(ids, **params["text_model"], cfg=cfg.text, valid=valid))


def logits_per_image(params, img, txt):  # unit [B, D], unit [C, D] -> [B, C]
    xp = array_namespace(img)
    scale = xp.exp(params["logit_scale"])  # [1]
    return (img @ xp.permute_dims(txt, (1, 0))) * scale + params["logit_bias"]


def sigmoid(x):  # [...] -> [...] in (0, 1), without overflow for large |x|
    xp = array_namespace(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
