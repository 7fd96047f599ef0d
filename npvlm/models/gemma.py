"""The Gemma decoder: Gemma 1 for PaliGemma, Gemma 2 for PaliGemma 2, chosen by the config.

    ids [B, T] -> embed_tokens * sqrt(D) -> L decoder layers -> final RMSNorm -> h [B, T, D]
    logits = h @ embed_tokens.T (the head is tied to the embedding)

Gemma 1 layer:  x += attn(rms(x));               x += mlp(rms(x))
Gemma 2 layer:  x += rms(attn(rms(x)));          x += rms(mlp(rms(x)))
(so the checkpoint key `post_attention_layernorm` is the pre-MLP norm in Gemma 1 but the norm
of the attention *output* in Gemma 2), plus attention and final logit soft-caps,
`query_pre_attn_scalar` and a sliding window on every other layer.

References: Gemma Team 2024 ("Gemma", "Gemma 2"); Su et al. 2021 (RoPE); Shazeer 2020 (GLU
variants); Ainslie et al. 2023 (GQA); HF `modeling_gemma.py`, `modeling_gemma2.py`; big_vision
`models/ppp/gemma.py`; google/gemma_pytorch.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .paligemma_config import TextConfig
from ..packed import PackedWeight
from ..nn import attention, attention_probs, geglu, linear, merge_heads, rms_norm, rope, rope_angles, split_heads


def embed(ids, embed_tokens, *, cfg: TextConfig):  # [B, T] int, {weight [V, D]} -> [B, T, D]
    """Token embeddings times sqrt(D): the constant is rounded to the weight's dtype first, as HF does.
    A 16/8-bit table (npvlm/packed.py, `--weights`) widens only the B*T rows looked up."""
    xp = array_namespace(ids)
    B, T = ids.shape
    w, flat = embed_tokens["weight"], xp.reshape(ids, (B * T,))
    e = w.take_rows(flat) if isinstance(w, PackedWeight) else xp.take(w, flat, axis=0)  # [B*T, D]
    scale = xp.asarray(math.sqrt(cfg.hidden_size), dtype=e.dtype)
    return xp.reshape(e, (B, T, cfg.hidden_size)) * scale


def self_attention(x, cos, sin, mask, q_proj, k_proj, v_proj, o_proj, *, cfg: TextConfig, cache=None, layer=0, at=0,
                   probs_out=None, last_only=False):
    """[B, T, D] -> [B, T, D]; with a cache, the T new keys/values are written `at` (see KVCache.update)
    and the queries attend to what it returns. With a list `probs_out`, the attention weights of the
    last query are appended to it, float32 [B, H, 1, S] (recomputed from q and k: nothing is kept otherwise).
    last_only: keys and values of all T, but only the last position's query -> [B, 1, D]."""
    if last_only:  # the queries (and their RoPE angles, their mask row) of the last position alone
        xq, cq, sq, mask = x[:, -1:, :], cos[:, -1:, :], sin[:, -1:, :], None if mask is None else mask[:, :, -1:, :]
    else:
        xq, cq, sq = x, cos, sin
    q = rope(split_heads(linear(xq, **q_proj), cfg.num_attention_heads), cq, sq)  # [B, H, T, E] (T = 1: last_only)
    k = rope(split_heads(linear(x, **k_proj), cfg.num_key_value_heads), cos, sin)  # [B, K, T, E]
    v = split_heads(linear(x, **v_proj), cfg.num_key_value_heads)  # [B, K, T, E]
    if cache is not None:
        k, v = cache.update(layer, k, v, at)  # [B, K, S, E], keys cached after RoPE
    o = attention(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_logit_softcapping)  # [B, H, T, E]
    if probs_out is not None:
        last = None if mask is None else mask[:, :, -1:, :]
        probs_out.append(attention_probs(q[:, :, -1:, :], k, last, scale=cfg.attn_scale,
                                         softcap=cfg.attn_logit_softcapping))  # [B, H, 1, S]
    return linear(merge_heads(o), **o_proj)


def gemma_layer(x, cos, sin, mask, input_layernorm, self_attn, post_attention_layernorm, mlp, *, cfg: TextConfig,
                last_only=False, **ctx):  # [B, T, D] -> [B, T, D] ([B, 1, D]: last_only, see decoder)
    eps = cfg.rms_norm_eps
    a = self_attention(rms_norm(x, **input_layernorm, eps=eps), cos, sin, mask, **self_attn, cfg=cfg,
                       last_only=last_only, **ctx)
    x = (x[:, -1:, :] if last_only else x) + a
    return x + geglu(rms_norm(x, **post_attention_layernorm, eps=eps), **mlp)  # Gemma 1: the pre-MLP norm


def gemma2_layer(x, cos, sin, mask, input_layernorm, self_attn, post_attention_layernorm, pre_feedforward_layernorm,
                 mlp, post_feedforward_layernorm, *, cfg: TextConfig, last_only=False, **ctx):
    eps = cfg.rms_norm_eps
    a = self_attention(rms_norm(x, **input_layernorm, eps=eps), cos, sin, mask, **self_attn, cfg=cfg,
                       last_only=last_only, **ctx)
    x = (x[:, -1:, :] if last_only else x) + rms_norm(a, **post_attention_layernorm, eps=eps)  # the attn-output norm
    m = geglu(rms_norm(x, **pre_feedforward_layernorm, eps=eps), **mlp)
    return x + rms_norm(m, **post_feedforward_layernorm, eps=eps)


def decoder(h, positions, masks, layers, norm, *, cfg: TextConfig, cache=None, at=0, probs_out=None, last_only=False):
    """h [B, T, D] embedded inputs, positions [B, T], masks {"full", "sliding"} additive [B, 1, T, S] -> [B, T, D].
    `layers` and `norm` are the decoder's parameter subtrees (embed_tokens is read by embed and lm_head);
    `probs_out`: a list that gets each layer's last-query attention weights (see self_attention).
    last_only -> [B, 1, D], the last position's: the last layer still writes all T keys and values into the
    cache, but no other position's output is read by anything, so its queries, attention output, o_proj and
    MLP run for the last position alone (as llama.cpp does; on `mid` a tenth of the prefill's FLOPs)."""
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, E] each
    layer_fn = gemma2_layer if cfg.is_gemma2 else gemma_layer
    for j, params in enumerate(layers):
        mask = masks["sliding"] if cfg.is_sliding(j) else masks["full"]
        h = layer_fn(h, cos, sin, mask, **params, cfg=cfg, cache=cache, layer=j, at=at, probs_out=probs_out,
                     last_only=last_only and j == len(layers) - 1)
    return rms_norm(h, **norm, eps=cfg.rms_norm_eps)


def lm_head(h, embed_tokens, *, cfg: TextConfig):  # [B, T, D] -> [B, T, V] float32
    """Tied head: logits = h @ embed_tokens.T; Gemma 2 soft-caps them to (-c, c)."""
    xp = array_namespace(h)
    logits = xp.astype(linear(h, embed_tokens["weight"]), xp.float32)
    c = cfg.final_logit_softcapping
    return c * xp.tanh(logits / c) if c else logits
