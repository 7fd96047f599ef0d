"""The SigLIP vision tower's gradient: models/siglip_vision.py's functions, each as a forward that saves
what its backward reads and a backward that walks it back (npvlm.nn_backward's pairs composed).

    x0 = patch_embed(pixels) + pos          x_{l+1} = x_l + attn(ln1(x_l)) ;  x_l' = x_l + mlp(ln2(x_l))
    feats = post_layernorm(x_L)                                  (PaliGemma stops here)
    pooled = a + mlp(ln(a)),  a = MHA(probe, feats, feats)       (the two-tower model's MAP head)

A residual branch's backward adds: dx = dy + branch_backward(dy). The pixels are data: no gradient.
References: the chain rule; karpathy/llm.c `train_gpt2.c` (the block's backward in this order).
"""

from __future__ import annotations

from array_api_compat import array_namespace

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


def map_head_forward(x, probe, attention, layernorm, mlp, *, cfg: VisionConfig):  # [B, N, Dv] -> [B, Dv]
    """models.siglip_vision.map_head, saving: k, v [B, N, Dv] and the probe's attention p [B, h, 1, N]
    (4 (2 Dv + h) bytes per patch), and the pooled row's LayerNorm and MLP (~4 (2 Dv + F) bytes per image)."""
    xp = array_namespace(x)
    B, N, Dv = x.shape
    h = cfg.num_attention_heads
    w, b = attention["in_proj_weight"], attention["in_proj_bias"]  # packed q; k; v rows (torch MultiheadAttention)
    q, s_q = NB.linear_forward(probe, w[:Dv, :], b[:Dv])  # [1, 1, Dv]
    k, s_k = NB.linear_forward(x, w[Dv:2 * Dv, :], b[Dv:2 * Dv])  # [B, N, Dv]
    v, s_v = NB.linear_forward(x, w[2 * Dv:, :], b[2 * Dv:])
    q = xp.broadcast_to(nn.split_heads(q, h), (B, h, 1, Dv // h))  # one probe for every image
    o, s_att = NB.attention_forward(q, nn.split_heads(k, h), nn.split_heads(v, h), None, scale=(Dv // h) ** -0.5)
    a, s_out = NB.linear_forward(nn.merge_heads(o), **attention["out_proj"])  # [B, 1, Dv]
    n, s_ln = NB.layer_norm_forward(a, **layernorm, eps=cfg.layer_norm_eps)
    m, s_mlp = NB.siglip_mlp_forward(n, **mlp)
    saved = {"q": s_q, "k": s_k, "v": s_v, "attn": s_att, "out_proj": s_out, "layernorm": s_ln, "mlp": s_mlp, "h": h}
    return (a + m)[:, 0, :], saved


def map_head_backward(dy, saved):  # [B, Dv] -> [B, N, Dv], grads shaped like the `head` subtree
    xp = array_namespace(dy)
    h = saved["h"]
    dy = dy[:, None, :]  # [B, 1, Dv]
    dn, g_mlp = NB.siglip_mlp_backward(dy, saved["mlp"])
    da, g_ln = NB.layer_norm_backward(dn, saved["layernorm"])
    da = dy + da  # through the residual
    dm, g_out = NB.linear_backward(da, saved["out_proj"])
    dq, dk, dv = NB.attention_backward(nn.split_heads(dm, h), saved["attn"])
    dq = xp.sum(dq, axis=0, keepdims=True)  # the probe was broadcast over the batch: its gradient sums over it
    dprobe, gq = NB.linear_backward(nn.merge_heads(dq), saved["q"])
    dxk, gk = NB.linear_backward(nn.merge_heads(dk), saved["k"])
    dxv, gv = NB.linear_backward(nn.merge_heads(dv), saved["v"])
    attention = {"in_proj_weight": xp.concat([gq["weight"], gk["weight"], gv["weight"]], axis=0),  # re-packed q; k; v
                 "in_proj_bias": xp.concat([gq["bias"], gk["bias"], gv["bias"]], axis=0), "out_proj": g_out}
    return dxk + dxv, {"probe": dprobe, "attention": attention, "layernorm": g_ln, "mlp": g_mlp}  # x feeds k and v


def vision_model_forward(pixels, vision_model, *, cfg: VisionConfig):  # [B, 3, S, S] -> pooled [B, Dv]
    """The two-tower model's image side: the tower, then the MAP head (`vision_model` with its `head`)."""
    tower = {k: vision_model[k] for k in ("embeddings", "encoder", "post_layernorm")}
    x, s_tower = vision_tower_forward(pixels, **tower, cfg=cfg)  # [B, N, Dv]
    y, s_head = map_head_forward(x, **vision_model["head"], cfg=cfg)
    return y, {"tower": s_tower, "head": s_head}


def vision_model_backward(dy, saved):  # [B, Dv] -> grads shaped like the `vision_model` subtree
    dx, g_head = map_head_backward(dy, saved["head"])
    return {**vision_tower_backward(dx, saved["tower"]), "head": g_head}
