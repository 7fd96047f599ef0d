"""Every layer of npvlm.nn (and the SigLIP / Gemma attention blocks) against PyTorch and HF.

Hypothesis picks the shapes (batch, sequence, heads, head dim; odd sizes and 1s included) and a
seed; the values come from `np.random.default_rng(seed)`, times a drawn scale. Each test runs
under every namespace of the grid (tests/namespaces.py). All arithmetic is float32, and every
tolerance sits next to its assertion with the reason for its size. Orientation, float32:
one rounding is 2**-24 ~ 6e-8 relative, a length-n dot product accumulates at most ~n of them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers import GemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import (GemmaAttention, GemmaMLP, GemmaRMSNorm, GemmaRotaryEmbedding,
                                                      apply_rotary_pos_emb)
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipMLP

from npvlm import nn
from npvlm.models.paligemma_config import TextConfig
from npvlm.errors import GenerationError
from npvlm.models.gemma import self_attention
from npvlm.kv_cache import KVCache
from npvlm.models.siglip_vision import siglip_attention

if __package__:  # tests/ imported as a package (an __init__.py exists)
    from .helpers import attention_params, causal_allowed, randn
    from .namespaces import HYPOTHESIS, assert_close, each_namespace, each_namespace_marked, to_numpy
else:  # pytest's default rootdir-less import: tests/ itself is on sys.path
    from helpers import attention_params, causal_allowed, randn
    from namespaces import HYPOTHESIS, assert_close, each_namespace, each_namespace_marked, to_numpy

torch.set_grad_enabled(False)

# --- strategies ---------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)
lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)  # batch dims, maybe none
widths = st.integers(1, 17)  # feature sizes: 1, odd, even, prime
scales = st.sampled_from([1e-2, 1.0, 10.0])  # value magnitudes: tiny, unit, large
batches = st.integers(1, 2)
lengths = st.integers(1, 5)


@st.composite
def head_layouts(draw, max_heads_per_group=3):
    """(kind, H query heads, K kv heads): MHA (K = H), GQA (1 < K < H), MQA (K = 1)."""
    kind = draw(st.sampled_from(["mha", "gqa", "mqa"]))
    if kind == "mha":
        K = draw(st.integers(1, 3))
        return kind, K, K
    if kind == "mqa":
        return kind, draw(st.integers(1, 4)), 1
    K, G = draw(st.integers(2, 3)), draw(st.integers(2, max_heads_per_group))
    return kind, K * G, K


# --- helpers ------------------------------------------------------------------------------------

def linear_params(module: torch.nn.Linear) -> dict:
    """An HF Linear -> npvlm's keyword layout {"weight": [out, in], "bias": [out]} (host arrays)."""
    p = {"weight": to_numpy(module.weight)}
    if module.bias is not None:
        p["bias"] = to_numpy(module.bias)
    return p


def tiny_gemma_config(D, F_, H, K, E, theta=10000.0) -> GemmaConfig:
    return GemmaConfig(vocab_size=8, hidden_size=D, intermediate_size=F_, num_hidden_layers=1, num_attention_heads=H,
                       num_key_value_heads=K, head_dim=E, rope_theta=theta, hidden_act="gelu_pytorch_tanh",
                       attn_implementation="eager")


# --- dense layers -------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, n_in=widths, n_out=widths, bias=st.booleans(), scale=scales, seed=seeds)
def test_linear_matches_torch(ns, lead, n_in, n_out, bias, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, *lead, n_in, scale=scale), randn(rng, n_out, n_in)
    b = randn(rng, n_out) if bias else None
    got = nn.linear(ns.put(x), ns.put(w), None if b is None else ns.put(b))
    want = F.linear(ns.torch(x), ns.torch(w), None if b is None else ns.torch(b))
    # A dot product of <= 17 terms: <= 17 roundings of 6e-8 relative to sum|x*w| (<= ~17*scale),
    # and the two sides may sum in a different order: rtol 1e-5, atol 1e-5 * scale.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5 * scale)


@each_namespace
@HYPOTHESIS
@given(B=batches, C=st.integers(1, 3), P=st.integers(1, 4), gh=st.integers(1, 3), gw=st.integers(1, 3),
       D=st.integers(1, 6), seed=seeds)
def test_patch_embed_matches_conv2d(ns, B, C, P, gh, gw, D, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (B, C, gh * P, gw * P)).astype(np.float32)  # images live in [-1, 1]
    w, b = randn(rng, D, C, P, P), randn(rng, D)
    got = nn.patch_embed(ns.put(pixels), ns.put(w), ns.put(b))  # [B, N, D]
    want = F.conv2d(ns.torch(pixels), ns.torch(w), ns.torch(b), stride=P).flatten(2).transpose(1, 2)
    # A dot product over C*P*P <= 48 terms of |x| <= 1, |w| ~ 1: sums are O(7), 48 roundings
    # of 6e-8 relative to O(48) worst case ~ 1.4e-4, typically ~1e-5: rtol 1e-5, atol 5e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=5e-5)


@each_namespace
@HYPOTHESIS
@given(x=st.floats(-30, 30, allow_nan=False, width=32) | st.just(0.0), lead=lead_shapes, n=widths, scale=scales,
       seed=seeds)
def test_gelu_tanh_matches_torch(ns, x, lead, n, scale, seed):
    rng = np.random.default_rng(seed)
    v = randn(rng, *lead, n, scale=scale)
    v.flat[0] = x  # one drawn value, to reach the tails and exact zero too
    got = nn.gelu_tanh(ns.put(v))
    want = F.gelu(ns.torch(v), approximate="tanh")
    # Same formula on both sides; 1 + tanh(u) loses digits when tanh(u) ~ -1 (its ulp there is
    # 6e-8), and that error is multiplied by 0.5|x|: atol = 1e-7 * max|x| + 1e-7, rtol 1e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-7 * float(np.abs(v).max()) + 1e-7)


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=st.integers(1, 12), Fw=st.integers(1, 20), scale=st.sampled_from([0.1, 1.0, 3.0]),
       seed=seeds)
def test_siglip_mlp_matches_hf(ns, lead, D, Fw, scale, seed):
    torch.manual_seed(seed)
    mlp = SiglipMLP(SiglipVisionConfig(hidden_size=D, intermediate_size=Fw, hidden_act="gelu_pytorch_tanh")).eval()
    x = randn(np.random.default_rng(seed), *lead, D, scale=scale)
    params = {name: linear_params(getattr(mlp, name)) for name in ("fc1", "fc2")}
    got = nn.siglip_mlp(ns.put(x), **ns.put_tree(params))
    want = mlp.to(ns.torch_device)(ns.torch(x))
    # Two float32 matmuls of <= 20 terms (torch's default init keeps |w| <= 1/sqrt(in)) around
    # a GELU: each ~1e-6 relative, outputs O(scale): rtol 1e-5, atol 1e-5 * scale.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5 * scale)


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=st.integers(1, 12), Fw=st.integers(1, 20), scale=st.sampled_from([0.1, 1.0, 3.0]),
       seed=seeds)
def test_geglu_matches_hf_gemma_mlp(ns, lead, D, Fw, scale, seed):
    torch.manual_seed(seed)
    mlp = GemmaMLP(tiny_gemma_config(D, Fw, 1, 1, 2)).eval()
    x = randn(np.random.default_rng(seed), *lead, D, scale=scale)
    params = {name: linear_params(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")}
    got = nn.geglu(ns.put(x), **ns.put_tree(params))
    want = mlp.to(ns.torch_device)(ns.torch(x))
    # Three small matmuls and a GELU, product of two O(scale) terms: rtol 1e-5 and an absolute
    # floor scaled by the output size scale**2 (atol 1e-5 * max(scale, scale**2)).
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5 * max(scale, scale**2))


# --- normalisation ------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=widths, scale=scales, offset=st.sampled_from([0.0, 3.0]), seed=seeds)
def test_layer_norm_matches_torch(ns, lead, D, scale, offset, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, D, scale=scale) + np.float32(offset * scale)  # a shifted mean tests the two-pass variance
    w, b = randn(rng, D), randn(rng, D)
    got = nn.layer_norm(ns.put(x), ns.put(w), ns.put(b), eps=1e-6)
    want = F.layer_norm(ns.torch(x), (D,), ns.torch(w), ns.torch(b), eps=1e-6)
    # The normalized value is O(1) and the mean/variance are sums over <= 17 terms: a few 1e-7
    # relative each, so |y| ~ |w| * 3 gives atol 2e-5 and rtol 1e-5. (With tiny `scale` the
    # eps=1e-6 term dominates the variance on both sides alike.)
    assert_close(ns, got, want, rtol=1e-5, atol=2e-5)


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=widths, scale=scales, seed=seeds)
def test_rms_norm_matches_hf_gemma_rmsnorm(ns, lead, D, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, *lead, D, scale=scale), randn(rng, D, scale=0.5)
    norm = GemmaRMSNorm(D, eps=1e-6)
    norm.weight.copy_(torch.from_numpy(w))  # the stored offset: the scale applied is 1 + w
    got = nn.rms_norm(ns.put(x), ns.put(w), eps=1e-6)
    want = norm.to(ns.torch_device)(ns.torch(x))
    # Mean of <= 17 squares, a sqrt, a divide and a multiply by (1+w): ~1e-6 relative, outputs
    # O(|1+w| * 3): rtol 1e-5, atol 1e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5)


@st.composite
def batch_norm_inputs(draw):
    """(shape [B, C, ...] for BatchNorm1d or 2d, the torch module class)."""
    kind = draw(st.sampled_from(["1d-flat", "1d-seq", "2d"]))
    B, C = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    if kind == "1d-flat":
        return (B, C), torch.nn.BatchNorm1d
    if kind == "1d-seq":
        return (B, C, draw(st.integers(1, 5))), torch.nn.BatchNorm1d
    return (B, C, draw(st.integers(1, 4)), draw(st.integers(1, 4))), torch.nn.BatchNorm2d


@each_namespace
@HYPOTHESIS
@given(spec=batch_norm_inputs(), training=st.booleans(), scale=scales, seed=seeds)
def test_batch_norm_matches_torch(ns, spec, training, scale, seed):
    shape, Module = spec
    C, n = shape[1], int(np.prod(shape)) // shape[1]
    assume(n > 1 or not training)  # torch (and npvlm) refuse a single value per channel when training
    rng = np.random.default_rng(seed)
    x = randn(rng, *shape, scale=scale) + np.float32(scale)
    w, b = randn(rng, C), randn(rng, C)
    rmean, rvar = randn(rng, C), rng.uniform(0.5, 2.0, C).astype(np.float32)

    bn = Module(C, eps=1e-5, momentum=0.1)
    for name, value in (("weight", w), ("bias", b), ("running_mean", rmean), ("running_var", rvar)):
        getattr(bn, name).copy_(torch.from_numpy(value))
    bn = bn.to(ns.torch_device).train(training)
    want_y = bn(ns.torch(x))  # updates bn.running_* in train mode

    y, new_mean, new_var = nn.batch_norm(ns.put(x), ns.put(w), ns.put(b), ns.put(rmean), ns.put(rvar),
                                         training=training, momentum=0.1, eps=1e-5)
    # Per-channel mean/variance over <= 80 values of magnitude ~ 2*scale: a few 1e-7 relative;
    # y is O(|w| * 3 + |b|) (training) or O(|x - mean| / sqrt(var)) (eval): rtol 1e-5, atol
    # 1e-5 * max(1, scale) (eval with a large `scale` has |y| ~ 10).
    assert_close(ns, y, want_y, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    # The running stats are O(1) + 0.1 * O(scale) (unbiased variance: 0.1 * O(scale**2)).
    assert_close(ns, new_mean, bn.running_mean, rtol=1e-5, atol=1e-6 * max(1.0, scale))
    assert_close(ns, new_var, bn.running_var, rtol=1e-5, atol=1e-6 * max(1.0, scale**2))


# --- softmax and RoPE ---------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), axis_pick=st.integers(0, 2),
       scale=st.sampled_from([1e-2, 1.0, 30.0]), masked=st.floats(0.0, 0.7), seed=seeds)
def test_softmax_matches_torch(ns, shape, axis_pick, scale, masked, seed):
    rng = np.random.default_rng(seed)
    axis = -1 - (axis_pick % len(shape))  # the last axis, or another one
    x = randn(rng, *shape, scale=scale)
    x[rng.random(shape) < masked] = nn.MASK_MIN  # masked entries, as attention produces them
    got = nn.softmax(ns.put(x), axis=axis)
    want = torch.softmax(ns.torch(x), dim=axis)
    # Probabilities in [0, 1]: exp differs by ~1 ulp between libraries, the sum by a few; a row
    # of only MASK_MIN is uniform on both sides. rtol 1e-5, atol 1e-6.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-6)


@each_namespace
@HYPOTHESIS
@given(B=batches, H=st.integers(1, 3), K=st.integers(1, 2), T=lengths,
       E=st.sampled_from([2, 4, 6, 10, 16, 32, 64, 128, 256]), max_pos_log2=st.integers(0, 17),
       theta=st.sampled_from([10000.0, 100.0]), seed=seeds)
def test_rope_matches_hf_at_arbitrary_positions(ns, B, H, K, T, E, max_pos_log2, theta, seed):
    rng = np.random.default_rng(seed)
    max_pos = 2**max_pos_log2
    positions = rng.integers(0, max_pos + 1, (B, T))  # unsorted, gapped, up to 131072
    q, k = randn(rng, B, H, T, E), randn(rng, B, K, T, E)
    rotary = GemmaRotaryEmbedding(tiny_gemma_config(4, 4, 1, 1, E, theta)).to(ns.torch_device)
    cos_hf, sin_hf = rotary(ns.torch(q), ns.torch(positions))  # [B, T, E] float32
    q_hf, k_hf = apply_rotary_pos_emb(ns.torch(q), ns.torch(k), cos_hf, sin_hf)

    cos, sin = nn.rope_angles(ns.put(positions), E, theta)
    # The angle pos * inv_freq is a float32 product: both sides round it (<= pos * 2**-24 each),
    # and inv_freq = theta**(-2i/E) itself may differ by 1 ulp (<= 2**-24 relative) between
    # NumPy's and torch's pow (it does for E >= 64). So the angles may differ by up to
    # 3 * pos * 2**-24 < max_pos * 2**-22; plus ~1e-6 for cos/sin themselves.
    angle_tol = max_pos * 2.0**-22 + 1e-6
    assert_close(ns, cos, cos_hf, rtol=0, atol=angle_tol)
    assert_close(ns, sin, sin_hf, rtol=0, atol=angle_tol)

    # The rotation alone, given the very same cos/sin: two products and a sum per element, 1e-6.
    cos_same, sin_same = ns.put(to_numpy(cos_hf)), ns.put(to_numpy(sin_hf))
    assert_close(ns, nn.rope(ns.put(q), cos_same, sin_same), q_hf, rtol=1e-6, atol=1e-6)
    assert_close(ns, nn.rope(ns.put(k), cos_same, sin_same), k_hf, rtol=1e-6, atol=1e-6)

    # Angles and rotation together: |x'_i| <= |x_i| + |x_{i+-E/2}|, each moved by <= angle_tol.
    atol = 2 * angle_tol * float(max(np.abs(q).max(), np.abs(k).max())) + 1e-6
    assert_close(ns, nn.rope(ns.put(q), cos, sin), q_hf, rtol=1e-6, atol=atol)
    assert_close(ns, nn.rope(ns.put(k), cos, sin), k_hf, rtol=1e-6, atol=atol)


# --- attention ----------------------------------------------------------------------------------

def torch_attention_reference(q, k, v, mask, scale, softcap):
    """The plain formula, in torch: repeat kv, scale, soft-cap, mask, softmax, weight the values."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), T=lengths, S=st.integers(1, 6), E=st.integers(1, 16),
       use_mask=st.booleans(), softcap=st.none() | st.sampled_from([5.0, 50.0]),
       qk_scale=st.sampled_from([0.1, 1.0, 3.0]), seed=seeds)
def test_attention_matches_torch_sdpa(ns, B, heads, T, S, E, use_mask, softcap, qk_scale, seed):
    kind, H, K = heads
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, T, E, scale=qk_scale), randn(rng, B, K, S, E, scale=qk_scale), randn(rng, B, K, S, E)
    scale = float(E) ** -0.5
    mask = None
    if use_mask:
        allowed = rng.random((B, 1, T, S)) < 0.6
        allowed[..., rng.integers(0, S)] = True  # every query row sees at least one key
        mask = ns.get(nn.additive_mask(ns.put(allowed)))
    got = nn.attention(ns.put(q), ns.put(k), ns.put(v), None if mask is None else ns.put(mask), scale=scale,
                       softcap=softcap)
    tq, tk, tv = ns.torch(q), ns.torch(k), ns.torch(v)
    tmask = None if mask is None else ns.torch(mask)
    if softcap is None:  # torch's own kernel, its GQA broadcasting included
        want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, scale=scale, enable_gqa=(H != K))
    else:  # SDPA has no soft-cap: the plain formula
        want = torch_attention_reference(tq, tk, tv, tmask, scale, softcap)
    # Scores are <= 16-term dot products of magnitude <= qk_scale**2 * E * |z|^2 ~ 9 * sqrt(E) * 4,
    # accurate to ~1e-6 relative, i.e. <= ~1e-5 absolute; the softmax passes that on as a relative
    # error of the weights, and the output is a convex mix of unit-normal values: rtol 1e-5, atol 2e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=2e-5)


# The last, short query block must be sliced up to T, not past it: NumPy clips such a slice, but the
# array API leaves it unspecified and array_api_strict raises IndexError.
@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), T=st.integers(2, 9), S=st.integers(1, 6), E=st.integers(1, 8),
       rows_pick=st.floats(0, 1), use_mask=st.booleans(), softcap=st.none() | st.just(5.0), seed=seeds)
def test_attention_in_query_blocks_equals_one_pass(ns, B, heads, T, S, E, rows_pick, use_mask, softcap, seed):
    _, H, K = heads
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, T, E), randn(rng, B, K, S, E), randn(rng, B, K, S, E)
    mask = None
    if use_mask:
        allowed = rng.random((B, 1, T, S)) < 0.6
        allowed[..., 0] = True
        mask = nn.additive_mask(ns.put(allowed))
    args = dict(scale=float(E) ** -0.5, softcap=softcap)
    whole = nn.attention(ns.put(q), ns.put(k), ns.put(v), mask, **args)
    rows = 1 + int(rows_pick * (T - 2))  # 1..T-1 query rows per block: at least two blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn, "SCORE_BUDGET", B * H * S * rows)
        blocked = nn.attention(ns.put(q), ns.put(k), ns.put(v), mask, **args)
    # Each query row's arithmetic is the same in both; only the matmul shapes differ (BLAS
    # blocking), a few roundings on O(1) outputs: rtol 1e-6, atol 1e-6.
    assert_close(ns, blocked, ns.get(whole), rtol=1e-6, atol=1e-6)


@each_namespace
@HYPOTHESIS
@given(B=batches, heads=st.integers(1, 4), head_dim=st.integers(1, 8), N=st.integers(1, 6), seed=seeds)
def test_siglip_attention_matches_hf(ns, B, heads, head_dim, N, seed):
    torch.manual_seed(seed)
    D = heads * head_dim
    cfg = SiglipVisionConfig(hidden_size=D, intermediate_size=4, num_attention_heads=heads)
    cfg._attn_implementation = "eager"
    attn = SiglipAttention(cfg).eval().to(ns.torch_device)
    x = randn(np.random.default_rng(seed), B, N, D)
    params = {name: linear_params(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    got = siglip_attention(ns.put(x), **ns.put_tree(params), n_heads=heads)
    want, _ = attn(ns.torch(x))
    # Four small matmuls (<= 32 terms, |w| <= 1/sqrt(D)) and a softmax: ~1e-6 relative each,
    # outputs O(1): rtol 1e-5, atol 1e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5)


@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), E=st.sampled_from([2, 4, 6, 8]), D=st.integers(2, 12), T=lengths,
       start=st.integers(0, 40), seed=seeds)
def test_gemma_self_attention_matches_hf(ns, B, heads, E, D, T, start, seed):
    _, H, K = heads  # head_dim E is drawn independently of D / H, as in Gemma (256 != 2048 / 8)
    torch.manual_seed(seed)
    hf_cfg = tiny_gemma_config(D, 4, H, K, E)
    attn = GemmaAttention(hf_cfg, layer_idx=0).eval().to(ns.torch_device)
    rotary = GemmaRotaryEmbedding(hf_cfg).to(ns.torch_device)
    x = randn(np.random.default_rng(seed), B, T, D)
    positions = np.broadcast_to(start + np.arange(T), (B, T)).copy()
    cos, sin = rotary(ns.torch(x), ns.torch(positions))
    allowed = causal_allowed(B, T)
    hf_mask = ns.torch(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
    want, _ = attn(ns.torch(x), position_embeddings=(cos, sin), attention_mask=hf_mask)

    cfg = TextConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=E)
    params = {name: linear_params(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    # Both sides get the same cos/sin (rope_angles is compared with HF's on its own above), so
    # this tolerance is the per-op one.
    got = self_attention(ns.put(x), ns.put(to_numpy(cos)), ns.put(to_numpy(sin)), nn.additive_mask(ns.put(allowed)),
                         **ns.put_tree(params), cfg=cfg)
    # Four small matmuls (<= 32 terms, |w| <= 1/sqrt(in)), RoPE and a softmax: rtol 1e-5, atol 1e-5.
    assert_close(ns, got, want, rtol=1e-5, atol=1e-5)


# --- KV cache -----------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), E=st.sampled_from([2, 4, 8]), D=st.integers(1, 10), T=st.integers(1, 6),
       spare=st.integers(0, 3), start=st.integers(0, 30), seed=seeds)
def test_kv_cache_token_by_token_equals_one_causal_pass(ns, B, heads, E, D, T, spare, start, seed):
    _, H, K = heads
    rng = np.random.default_rng(seed)
    cfg = TextConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=E)
    params = ns.put_tree(attention_params(rng, D, H, K, E))
    x = randn(rng, B, T, D)
    positions = np.broadcast_to(start + np.arange(T), (B, T)).copy()  # rope positions; cache rows are 0..T-1

    cos, sin = nn.rope_angles(ns.put(positions), E)
    full = self_attention(ns.put(x), cos, sin, nn.additive_mask(ns.put(causal_allowed(B, T))), **params, cfg=cfg)

    C = T + spare
    for fixed_shape in (False, True):  # columns by a host int (prefill's way) or by a [B] array (decode_step's way)
        cache = KVCache(params["q_proj"]["weight"], n_layers=1, batch=B, n_kv_heads=K, capacity=C, head_dim=E)
        steps = []
        for t in range(T):  # one token at a time; it sees the t cached keys and itself
            cos_t, sin_t = nn.rope_angles(ns.put(positions[:, t:t + 1]), E)
            if fixed_shape:  # attend to all C columns, the ones past t masked
                at = ns.put(np.full((B,), t, dtype=np.int64))
                mask_t = nn.additive_mask(ns.put(np.broadcast_to(np.arange(C) <= t, (B, 1, 1, C)).copy()))
            else:
                at, mask_t = t, nn.additive_mask(ns.put(np.ones((B, 1, 1, t + 1), dtype=bool)))
            steps.append(ns.get(self_attention(ns.put(x[:, t:t + 1]), cos_t, sin_t, mask_t, **params, cfg=cfg,
                                               cache=cache, layer=0, at=at)))
        assert float(np.abs(ns.get(cache.k[0])[:, :, T:, :]).max(initial=0.0)) == 0.0  # columns past T never written
        # The same arithmetic on both paths, only the matmul shapes (and so BLAS blocking) differ;
        # the masked keys contribute exactly 0. Outputs O(1): rtol 1e-5, atol 1e-6.
        assert_close(ns, ns.put(np.concatenate(steps, axis=1)), ns.get(full), rtol=1e-5, atol=1e-6)


@each_namespace
def test_kv_cache_writes_each_row_at_its_own_column(ns):
    """A decode step's write: row b's new key lands in column cols[b] and nowhere else (rows of a running
    batch may sit at different columns). Exact: a write copies values."""
    rng = np.random.default_rng(0)
    B, K, C, E = 3, 2, 5, 4
    cache = KVCache(ns.put(np.zeros((1,), np.float32)), n_layers=1, batch=B, n_kv_heads=K, capacity=C, head_dim=E)
    new = randn(rng, B, K, 1, E)
    cols = np.array([0, 3, 4])
    k, _ = cache.update(0, ns.put(new), ns.put(new), ns.put(cols))
    want = np.zeros((B, K, C, E), np.float32)
    want[np.arange(B), :, cols, :] = new[:, :, 0, :]
    assert k.shape == (B, K, C, E)
    np.testing.assert_array_equal(ns.get(k), want)
    np.testing.assert_array_equal(ns.get(cache.k[0]), want)


@each_namespace
def test_kv_cache_refuses_to_overflow(ns):
    like = ns.put(np.zeros((1,), np.float32))
    cache = KVCache(like, n_layers=1, batch=1, n_kv_heads=1, capacity=2, head_dim=2)
    kv = ns.put(np.ones((1, 1, 2, 2), np.float32))
    cache.update(0, kv, kv, 0)
    with pytest.raises(GenerationError, match="capacity of 2"):
        cache.update(0, ns.put(np.ones((1, 1, 1, 2), np.float32)), ns.put(np.ones((1, 1, 1, 2), np.float32)), 2)
