"""The SigLIP vision tower, as PaliGemma uses it (no pooling head).

pixels [B, 3, S, S] in [-1, 1]
  -> patch embedding (a P x P conv with stride P) + a learned position table (no CLS token)
  -> L pre-LayerNorm encoder blocks, attention bidirectional over all patches
  -> post_layernorm -> [B, N, Dv]
and, for the two-tower SigLIP model (siglip.py), the MAP pooling head `map_head` -> [B, Dv].

References: Lee et al. 2019 "Set Transformer" (pooling by multihead attention); Zhai et al. 2023 "Sigmoid Loss for Language Image Pre-Training"; Dosovitskiy et al.
2021 (ViT); HF transformers `modeling_siglip.py`; big_vision `models/vit.py`.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .paligemma_config import VisionConfig
from ..nn import attention, layer_norm, linear, merge_heads, patch_embed, siglip_mlp, split_heads
from .. import nn as _nn  # map_head's `attention` keyword is the checkpoint's subtree, so the op is _nn.attention there


def siglip_attention(x, q_proj, k_proj, v_proj, out_proj, *, n_heads, mask=None):  # [B, N, Dv] -> [B, N, Dv]
    q, k, v = (split_heads(linear(x, **p), n_heads) for p in (q_proj, k_proj, v_proj))  # [B, h, N, Ev]
    o = attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)  # no mask for images: every patch sees every patch
    return linear(merge_heads(o), **out_proj)


def encoder_block(x, layer_norm1, self_attn, layer_norm2, mlp, *, cfg: VisionConfig, mask=None):  # [B, N, Dv] -> same
    """`mask`: an optional additive [B, 1, N, N] (the text tower's padding mask); never causal."""
    x = x + siglip_attention(layer_norm(x, **layer_norm1, eps=cfg.layer_norm_eps), **self_attn,
                             n_heads=cfg.num_attention_heads, mask=mask)
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


def map_head(x, probe, attention, layernorm, mlp, *, cfg: VisionConfig):  # [B, N, Dv] -> [B, Dv]
    """Multihead attention pooling (HF `SiglipMultiheadAttentionPoolingHead`, big_vision `MAPHead`):
    one learned probe [1, 1, Dv] queries the patches through a torch `nn.MultiheadAttention` (packed
    in_proj_weight [3Dv, Dv] = q; k; v rows, in_proj_bias [3Dv], out_proj), then y = a + MLP(LN(a))."""
    Dv = x.shape[-1]
    w, b = attention["in_proj_weight"], attention["in_proj_bias"]
    q = linear(probe, w[:Dv, :], b[:Dv])  # [1, 1, Dv]
    k = linear(x, w[Dv : 2 * Dv, :], b[Dv : 2 * Dv])  # [B, N, Dv]
    v = linear(x, w[2 * Dv :, :], b[2 * Dv :])  # [B, N, Dv]
    h = cfg.num_attention_heads
    q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)  # [1, h, 1, Ev], [B, h, N, Ev]
    q = array_namespace(x).broadcast_to(q, (k.shape[0],) + tuple(q.shape[1:]))  # the probe is shared by the batch
    o = _nn.attention(q, k, v, None, scale=q.shape[-1] ** -0.5)  # [B, h, 1, Ev]
    a = linear(merge_heads(o), **attention["out_proj"])  # [B, 1, Dv]
    a = a + siglip_mlp(layer_norm(a, **layernorm, eps=cfg.layer_norm_eps), **mlp)
    return a[:, 0, :]  # [B, Dv]
