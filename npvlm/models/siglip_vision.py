"""The SigLIP vision tower, as PaliGemma uses it (no pooling head).

pixels [B, 3, S, S] in [-1, 1]
  -> patch embedding (a P x P conv with stride P) + a learned position table (no CLS token)
  -> L pre-LayerNorm encoder blocks, attention bidirectional over all patches
  -> post_layernorm -> [B, N, Dv]

References: Zhai et al. 2023 "Sigmoid Loss for Language Image Pre-Training"; Dosovitskiy et al.
2021 (ViT); HF transformers `modeling_siglip.py`; big_vision `models/vit.py`.
"""

from __future__ import annotations

from .paligemma_config import VisionConfig
from ..nn import attention, layer_norm, linear, merge_heads, patch_embed, siglip_mlp, split_heads


def siglip_attention(x, q_proj, k_proj, v_proj, out_proj, *, n_heads):  # [B, N, Dv] -> [B, N, Dv]
    q, k, v = (split_heads(linear(x, **p), n_heads) for p in (q_proj, k_proj, v_proj))  # [B, h, N, Ev]
    o = attention(q, k, v, None, scale=q.shape[-1] ** -0.5)  # no mask: every patch sees every patch
    return linear(merge_heads(o), **out_proj)


def encoder_block(x, layer_norm1, self_attn, layer_norm2, mlp, *, cfg: VisionConfig):  # [B, N, Dv] -> same
    x = x + siglip_attention(layer_norm(x, **layer_norm1, eps=cfg.layer_norm_eps), **self_attn, n_heads=cfg.num_attention_heads)
    x = x + siglip_mlp(layer_norm(x, **layer_norm2, eps=cfg.layer_norm_eps), **mlp)
    return x


def vision_tower(pixels, embeddings, encoder, post_layernorm, *, cfg: VisionConfig):
    """pixels [B, 3, S, S] -> patch features [B, N, Dv]. The keywords are the `vision_model` subtree
    (PaliGemma's loader skips the pooling head, which the two-tower SigLIP model adds on top)."""
    x = patch_embed(pixels, **embeddings["patch_embedding"])  # [B, N, Dv]
    x = x + embeddings["position_embedding"]["weight"]  # + [N, Dv], patch p at row p
    for block in encoder["layers"]:
        x = encoder_block(x, **block, cfg=cfg)
    return layer_norm(x, **post_layernorm, eps=cfg.layer_norm_eps)
