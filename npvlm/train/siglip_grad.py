"""The SigLIP vision tower's gradient: models/siglip_vision.py's functions, each as a forward that saves
what its backward reads and a backward that walks it back (npvlm.nn_backward's pairs composed).

    x0 = patch_embed(pixels) + pos          x_{l+1} = x_l + attn(ln1(x_l)) ;  x_l' = x_l + mlp(ln2(x_l))
    feats = post_layernorm(x_L)

A residual branch's backward adds: dx = dy + branch_backward(dy). The pixels are data: no gradient.
References: the chain rule; karpathy/llm.c `train_gpt2.c` (the block's backward in this order).
"""

from __future__ import annotations

from .. import nn
from .. import nn_backward as NB
from ..models.paligemma_config import VisionConfig

_QKV = ("q_proj", "k_proj", "v_proj")


def siglip_attention_forward(x, q_proj, k_proj, v_proj, out_proj, *, n_heads):  # [B, N, Dv] -> [B, N, Dv]
    qkv, saved = [], {}
    for name, p in zip(_QKV, (q_proj, k_proj, v_proj)):
        y, saved[name] = NB.linear_forward(x, **p)
        qkv.append(nn.split_heads(y, n_heads))  # [B, h, N, Ev]
    o, saved["attn"] = NB.attention_forward(*qkv, None, scale=qkv[0].shape[-1] ** -0.5)
    y, saved["out_proj"] = NB.linear_forward(nn.merge_heads(o), **out_proj)
    return y, {**saved, "n_heads": n_heads}


def siglip_attention_backward(dy, saved):  # [B, N, Dv] -> [B, N, Dv], {q_proj, k_proj, v_proj, out_proj}
    dm, grads = NB.linear_backward(dy, saved["out_proj"])
    grads = {"out_proj": grads}
    dqkv = NB.attention_backward(nn.split_heads(dm, saved["n_heads"]), saved["attn"])
    dx = None
    for name, d in zip(_QKV, dqkv):
        dxi, grads[name] = NB.linear_backward(nn.merge_heads(d), saved[name])
        dx = dxi if dx is None else dx + dxi  # x feeds q, k and v: add
    return dx, grads


def encoder_block_forward(x, layer_norm1, self_attn, layer_norm2, mlp, *, cfg: VisionConfig):  # [B, N, Dv] -> same
    eps = cfg.layer_norm_eps
    h, s_ln1 = NB.layer_norm_forward(x, **layer_norm1, eps=eps)
    a, s_attn = siglip_attention_forward(h, **self_attn, n_heads=cfg.num_attention_heads)
    x = x + a
    h, s_ln2 = NB.layer_norm_forward(x, **layer_norm2, eps=eps)
    m, s_mlp = NB.siglip_mlp_forward(h, **mlp)
    return x + m, {"layer_norm1": s_ln1, "self_attn": s_attn, "layer_norm2": s_ln2, "mlp": s_mlp}


def encoder_block_backward(dy, saved):  # [B, N, Dv] -> [B, N, Dv], grads shaped like the block's params
    dh, g_mlp = NB.siglip_mlp_backward(dy, saved["mlp"])
    dx, g_ln2 = NB.layer_norm_backward(dh, saved["layer_norm2"])
    dx = dy + dx  # through the MLP residual
    da, g_attn = siglip_attention_backward(dx, saved["self_attn"])
    dh, g_ln1 = NB.layer_norm_backward(da, saved["layer_norm1"])
    return dx + dh, {"layer_norm1": g_ln1, "self_attn": g_attn, "layer_norm2": g_ln2, "mlp": g_mlp}


def vision_tower_forward(pixels, embeddings, encoder, post_layernorm, *, cfg: VisionConfig):  # -> [B, N, Dv]
    """The `vision_model` subtree's forward, as models.siglip_vision.vision_tower, saving per block."""
    x, s_patch = NB.patch_embed_forward(pixels, **embeddings["patch_embedding"])  # [B, N, Dv]
    x, _ = NB.position_add_forward(x, embeddings["position_embedding"]["weight"])
    blocks = []
    for block in encoder["layers"]:
        x, s = encoder_block_forward(x, **block, cfg=cfg)
        blocks.append(s)
    y, s_post = NB.layer_norm_forward(x, **post_layernorm, eps=cfg.layer_norm_eps)
    return y, {"patch": s_patch, "blocks": blocks, "post_layernorm": s_post}


def vision_tower_backward(dy, saved):  # [B, N, Dv] -> grads shaped like the `vision_model` subtree
    dx, g_post = NB.layer_norm_backward(dy, saved["post_layernorm"])
    layers = []
    for s in reversed(saved["blocks"]):
        dx, g = encoder_block_backward(dx, s)
        layers.append(g)
    dx, g_pos = NB.position_add_backward(dx, {})
    _, g_patch = NB.patch_embed_backward(dx, saved["patch"])  # d pixels is not needed: they are data
    embeddings = {"patch_embedding": g_patch, "position_embedding": g_pos}
    return {"embeddings": embeddings, "encoder": {"layers": layers[::-1]}, "post_layernorm": g_post}
