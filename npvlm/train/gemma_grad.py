"""The Gemma decoder's gradient (Gemma 1 and Gemma 2): models/gemma.py's functions as forward-that-saves /
backward pairs built from npvlm.nn_backward.

    Gemma 1 layer:  x += attn(rms(x));            x += mlp(rms(x))
    Gemma 2 layer:  x += rms(attn(rms(x)));       x += rms(mlp(rms(x)))   (+ attention soft-cap, sliding window)

The rotary tables cos/sin and the additive masks are constants (no gradient); RoPE's backward is the
inverse rotation, the soft-cap's is 1 - tanh^2 (both in nn_backward). The tied head and the lookup
live in paligemma_grad.py, which adds their two gradients of embed_tokens.
References: HF `modeling_gemma.py`, `modeling_gemma2.py`; the chain rule.
"""

from __future__ import annotations

from .. import nn
from .. import nn_backward as NB
from ..models.paligemma_config import TextConfig


def self_attention_forward(x, cos, sin, mask, q_proj, k_proj, v_proj, o_proj, *, cfg: TextConfig):
    """[B, T, D] -> [B, T, D], as models.gemma.self_attention without a cache (training sees the whole row)."""
    q, s_q = NB.linear_forward(x, **q_proj)
    k, s_k = NB.linear_forward(x, **k_proj)
    v, s_v = NB.linear_forward(x, **v_proj)
    q = nn.rope(nn.split_heads(q, cfg.num_attention_heads), cos, sin)  # [B, H, T, E]
    k = nn.rope(nn.split_heads(k, cfg.num_key_value_heads), cos, sin)  # [B, K, T, E]
    v = nn.split_heads(v, cfg.num_key_value_heads)  # [B, K, T, E]
    o, s_attn = NB.attention_forward(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_logit_softcapping)
    y, s_o = NB.linear_forward(nn.merge_heads(o), **o_proj)
    return y, {"q_proj": s_q, "k_proj": s_k, "v_proj": s_v, "attn": s_attn, "o_proj": s_o, "cos": cos, "sin": sin}


def self_attention_backward(dy, saved):  # [B, T, D] -> [B, T, D], {q_proj, k_proj, v_proj, o_proj}
    dm, g_o = NB.linear_backward(dy, saved["o_proj"])
    H = saved["attn"]["q"].shape[1]
    dq, dk, dv = NB.attention_backward(nn.split_heads(dm, H), saved["attn"])
    rot = {"cos": saved["cos"], "sin": saved["sin"]}
    dq, dk = NB.rope_backward(dq, rot), NB.rope_backward(dk, rot)
    dx_q, g_q = NB.linear_backward(nn.merge_heads(dq), saved["q_proj"])
    dx_k, g_k = NB.linear_backward(nn.merge_heads(dk), saved["k_proj"])
    dx_v, g_v = NB.linear_backward(nn.merge_heads(dv), saved["v_proj"])
    return dx_q + dx_k + dx_v, {"q_proj": g_q, "k_proj": g_k, "v_proj": g_v, "o_proj": g_o}


def gemma_layer_forward(x, cos, sin, mask, input_layernorm, self_attn, post_attention_layernorm, mlp, *,
                        cfg: TextConfig):  # [B, T, D] -> [B, T, D]
    eps = cfg.rms_norm_eps
    h, s_in = NB.rms_norm_forward(x, **input_layernorm, eps=eps)
    a, s_attn = self_attention_forward(h, cos, sin, mask, **self_attn, cfg=cfg)
    x = x + a
    h, s_post = NB.rms_norm_forward(x, **post_attention_layernorm, eps=eps)  # Gemma 1: the pre-MLP norm
    m, s_mlp = NB.geglu_forward(h, **mlp)
    return x + m, {"input_layernorm": s_in, "self_attn": s_attn, "post_attention_layernorm": s_post, "mlp": s_mlp}


def gemma_layer_backward(dy, saved):  # [B, T, D] -> [B, T, D], grads shaped like the layer's params
    dh, g_mlp = NB.geglu_backward(dy, saved["mlp"])
    dx, g_post = NB.rms_norm_backward(dh, saved["post_attention_layernorm"])
    dx = dy + dx
    da, g_attn = self_attention_backward(dx, saved["self_attn"])
    dh, g_in = NB.rms_norm_backward(da, saved["input_layernorm"])
    return dx + dh, {"input_layernorm": g_in, "self_attn": g_attn, "post_attention_layernorm": g_post, "mlp": g_mlp}


def gemma2_layer_forward(x, cos, sin, mask, input_layernorm, self_attn, post_attention_layernorm,
                         pre_feedforward_layernorm, mlp, post_feedforward_layernorm, *, cfg: TextConfig):
    eps = cfg.rms_norm_eps
    s = {}
    h, s["input_layernorm"] = NB.rms_norm_forward(x, **input_layernorm, eps=eps)
    a, s["self_attn"] = self_attention_forward(h, cos, sin, mask, **self_attn, cfg=cfg)
    a, s["post_attention_layernorm"] = NB.rms_norm_forward(a, **post_attention_layernorm, eps=eps)  # the output norm
    x = x + a
    h, s["pre_feedforward_layernorm"] = NB.rms_norm_forward(x, **pre_feedforward_layernorm, eps=eps)
    m, s["mlp"] = NB.geglu_forward(h, **mlp)
    m, s["post_feedforward_layernorm"] = NB.rms_norm_forward(m, **post_feedforward_layernorm, eps=eps)
    return x + m, s


def gemma2_layer_backward(dy, saved):  # [B, T, D] -> [B, T, D], grads of the layer's 4 norms, attention, MLP
    g = {}
    dm, g["post_feedforward_layernorm"] = NB.rms_norm_backward(dy, saved["post_feedforward_layernorm"])
    dh, g["mlp"] = NB.geglu_backward(dm, saved["mlp"])
    dx, g["pre_feedforward_layernorm"] = NB.rms_norm_backward(dh, saved["pre_feedforward_layernorm"])
    dx = dy + dx
    da, g["post_attention_layernorm"] = NB.rms_norm_backward(dx, saved["post_attention_layernorm"])
    da, g["self_attn"] = self_attention_backward(da, saved["self_attn"])
    dh, g["input_layernorm"] = NB.rms_norm_backward(da, saved["input_layernorm"])
    return dx + dh, g


def decoder_forward(h, positions, masks, layers, norm, *, cfg: TextConfig):  # [B, T, D] -> [B, T, D]
    """models.gemma.decoder without a cache; masks {"full", "sliding"} additive [B, 1, T, T]."""
    cos, sin = nn.rope_angles(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, E] each, shared by every layer
    fwd = gemma2_layer_forward if cfg.is_gemma2 else gemma_layer_forward
    saved = []
    for j, params in enumerate(layers):
        h, s = fwd(h, cos, sin, masks["sliding"] if cfg.is_sliding(j) else masks["full"], **params, cfg=cfg)
        saved.append(s)
    y, s_norm = NB.rms_norm_forward(h, **norm, eps=cfg.rms_norm_eps)
    return y, {"layers": saved, "norm": s_norm, "gemma2": cfg.is_gemma2}


def decoder_backward(dy, saved):  # [B, T, D] -> [B, T, D] (d embedded inputs), {"layers": [...], "norm": ...}
    dh, g_norm = NB.rms_norm_backward(dy, saved["norm"])
    bwd = gemma2_layer_backward if saved["gemma2"] else gemma_layer_backward
    layers = []
    for s in reversed(saved["layers"]):
        dh, g = bwd(dh, s)
        layers.append(g)
    return dh, {"layers": layers[::-1], "norm": g_norm}
