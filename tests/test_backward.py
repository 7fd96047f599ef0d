"""Every hand-written backward of npvlm.nn_backward (and the contrastive losses' gradients) against torch autograd.

The check, llm.c's: run our forward, draw a random R shaped like its output, run our backward with
dy = R, and compare with torch's gradient of sum(out * R) for every input and parameter. Hypothesis
picks shapes and values (odd sizes and 1s included); every test runs under numpy and array_api_strict
(tests/namespaces.py). Tolerances: a gradient is a few float32 matmuls and reductions deep, so we
ask rtol 1e-5 elementwise plus an absolute floor scaled to the gradient's own magnitude (an element
that is a sum of cancelling terms carries the error of the terms, not of the result); where an op
needs more, the reason sits beside the assertion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import GemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipMLP

from npvlm import contrastive as C
from npvlm import nn
from npvlm import nn_backward as NB

if __package__:  # tests/ imported as a package (an __init__.py exists)
    from .namespaces import HYPOTHESIS, assert_close, each_namespace, to_numpy
else:  # pytest's default rootdir-less import: tests/ itself is on sys.path
    from namespaces import HYPOTHESIS, assert_close, each_namespace, to_numpy

seeds = st.integers(0, 2**32 - 1)
lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)  # batch dims, maybe none
widths = st.integers(1, 17)
scales = st.sampled_from([1e-2, 1.0, 10.0])


@st.composite
def head_layouts(draw):
    """(H query heads, K kv heads): MHA (K = H), GQA (1 < K < H), MQA (K = 1)."""
    kind = draw(st.sampled_from(["mha", "gqa", "mqa"]))
    if kind == "mha":
        K = draw(st.integers(1, 3))
        return K, K
    if kind == "mqa":
        return draw(st.integers(2, 4)), 1
    K, G = draw(st.integers(2, 3)), draw(st.integers(2, 3))
    return K * G, K


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def leaf(a):  # a host array -> a float32 torch leaf that collects its gradient
    return torch.tensor(np.ascontiguousarray(a)).requires_grad_(True)


def torch_vjp(fn, R, *leaves):
    """The gradients of sum(fn() * R) with respect to each leaf (zeros where it does not reach one)."""
    with torch.enable_grad():
        out = fn()
        (out * torch.from_numpy(R)).sum().backward()
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def assert_grad(ns, got, want, rtol=1e-5, floor=1e-5, mag=None):
    """|got - want| <= rtol |want| + floor * mag, mag the size of the terms summed: max|want| by default."""
    w = to_numpy(want) if hasattr(want, "detach") else np.asarray(want)
    mag = float(np.abs(w).max(initial=0.0)) if mag is None else mag
    assert_close(ns, got, w, rtol=rtol, atol=floor * max(mag, 1e-30))


def centred_scale(R, w, x, axes):
    """max|R w| / min std: the size of the terms a normalisation's dx centres away (they may cancel to ~0)."""
    std = np.sqrt(np.var(x.astype(np.float64), axis=axes) + 1e-6)
    return float(np.abs(R * w).max(initial=0.0) / std.min(initial=np.inf))


# --- dense layers -------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, n_in=widths, n_out=widths, bias=st.booleans(), scale=scales, seed=seeds)
def test_linear_backward(ns, lead, n_in, n_out, bias, scale, seed):
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, *lead, n_in, scale=scale), randn(rng, n_out, n_in), randn(rng, n_out)
    y, saved = NB.linear_forward(ns.put(x), ns.put(w), ns.put(b) if bias else None)
    R = randn(rng, *y.shape)
    dx, g = NB.linear_backward(ns.put(R), saved)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    want = torch_vjp(lambda: F.linear(tx, tw, tb if bias else None), R, tx, tw, tb)
    # dx, dW: one matmul of <= 17 (dx) or <= 9 (dW over the rows) terms; db a sum over the same
    # rows: every leading axis is a broadcast axis the bias gradient must sum over.
    assert_grad(ns, dx, want[0])
    assert_grad(ns, g["weight"], want[1])
    assert ("bias" in g) == bias
    if bias:
        assert_grad(ns, g["bias"], want[2])


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 2), Cc=st.integers(1, 3), P=st.integers(1, 4), gh=st.integers(1, 3), gw=st.integers(1, 3),
       D=st.integers(1, 6), seed=seeds)
def test_patch_embed_backward(ns, B, Cc, P, gh, gw, D, seed):
    rng = np.random.default_rng(seed)
    pix, w, b = rng.uniform(-1, 1, (B, Cc, gh * P, gw * P)).astype(np.float32), randn(rng, D, Cc, P, P), randn(rng, D)
    y, saved = NB.patch_embed_forward(ns.put(pix), ns.put(w), ns.put(b))
    R = randn(rng, *y.shape)
    dpix, g = NB.patch_embed_backward(ns.put(R), saved)
    tp, tw, tb = leaf(pix), leaf(w), leaf(b)
    want = torch_vjp(lambda: F.conv2d(tp, tw, tb, stride=P).flatten(2).transpose(1, 2), R, tp, tw, tb)
    # dW sums B*N <= 18 patch rows, dpixels is a <= 6-term sum: float32 dot products.
    assert_grad(ns, dpix, want[0])
    assert_grad(ns, g["weight"], want[1])
    assert_grad(ns, g["bias"], want[2])


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 4), N=st.integers(1, 5), D=st.integers(1, 6), seed=seeds)
def test_position_table_gradient_sums_over_the_batch(ns, B, N, D, seed):
    rng = np.random.default_rng(seed)
    x, table = randn(rng, B, N, D), randn(rng, N, D)
    y, saved = NB.position_add_forward(ns.put(x), ns.put(table))
    R = randn(rng, B, N, D)
    dx, g = NB.position_add_backward(ns.put(R), saved)
    tx, tt = leaf(x), leaf(table)
    want = torch_vjp(lambda: tx + tt, R, tx, tt)
    assert_close(ns, dx, want[0], rtol=0.0, atol=0.0)  # the identity: exact
    assert_grad(ns, g["weight"], want[1], rtol=1e-6, floor=1e-6)  # a sum of B <= 4 terms: a rounding or two


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, n=widths, scale=scales, seed=seeds)
def test_gelu_tanh_backward(ns, lead, n, scale, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, n, scale=scale)
    y, saved = NB.gelu_tanh_forward(ns.put(x))
    R = randn(rng, *y.shape)
    tx = leaf(x)
    (want,) = torch_vjp(lambda: F.gelu(tx, approximate="tanh"), R, tx)
    # the same derivative formula, elementwise: a few roundings; near the tails 1 - t^2 loses digits
    # relative to 1 (ulp 6e-8), times |x|*c ~ 10: a 1e-6 floor relative to max|dx|.
    assert_grad(ns, NB.gelu_tanh_backward(ns.put(R), saved), want, floor=1e-5)


def _module_vjp(module, x, R):
    tx = leaf(x)
    params = dict(module.named_parameters())
    grads = torch_vjp(lambda: module(tx), R, tx, *params.values())
    return grads[0], dict(zip(params, grads[1:]))


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=st.integers(1, 12), Fw=st.integers(1, 20), seed=seeds)
def test_siglip_mlp_backward(ns, lead, D, Fw, seed):
    torch.manual_seed(seed % 2**31)
    mlp = SiglipMLP(SiglipVisionConfig(hidden_size=D, intermediate_size=Fw, hidden_act="gelu_pytorch_tanh"))
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, D)
    params = {m: {k: to_numpy(v) for k, v in getattr(mlp, m).named_parameters()} for m in ("fc1", "fc2")}
    y, saved = NB.siglip_mlp_forward(ns.put(x), **ns.put_tree(params))
    R = randn(rng, *y.shape)
    dx, g = NB.siglip_mlp_backward(ns.put(R), saved)
    wdx, wg = _module_vjp(mlp, x, R)
    # two matmuls of <= 20 terms around a GELU: float32 rounding of each, ~1e-6 relative.
    assert_grad(ns, dx, wdx)
    for name, t in wg.items():
        m, p = name.split(".")
        assert_grad(ns, g[m][p], t)


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=st.integers(1, 12), Fw=st.integers(1, 20), seed=seeds)
def test_geglu_backward(ns, lead, D, Fw, seed):
    torch.manual_seed(seed % 2**31)
    cfg = GemmaConfig(vocab_size=8, hidden_size=D, intermediate_size=Fw, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=2, hidden_act="gelu_pytorch_tanh")
    mlp = GemmaMLP(cfg)
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, D)
    names = ("gate_proj", "up_proj", "down_proj")
    params = {m: {"weight": to_numpy(getattr(mlp, m).weight)} for m in names}  # Gemma's MLP has no biases
    y, saved = NB.geglu_forward(ns.put(x), **ns.put_tree(params))
    R = randn(rng, *y.shape)
    dx, g = NB.geglu_backward(ns.put(R), saved)
    wdx, wg = _module_vjp(mlp, x, R)
    # three matmuls and a GELU; dx adds the gate and up branches: float32 roundings, ~1e-6 relative.
    assert_grad(ns, dx, wdx)
    for m in names:
        assert_grad(ns, g[m]["weight"], wg[f"{m}.weight"])


# --- normalisation ------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=st.integers(2, 17), scale=st.sampled_from([0.1, 1.0, 10.0]), seed=seeds)
def test_layer_norm_backward(ns, lead, D, scale, seed):
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, *lead, D, scale=scale) + np.float32(scale), randn(rng, D), randn(rng, D)
    y, saved = NB.layer_norm_forward(ns.put(x), ns.put(w), ns.put(b))
    np.testing.assert_array_equal(ns.get(y), ns.get(nn.layer_norm.reference(ns.put(x), ns.put(w), ns.put(b))))  # nn.py's reference values
    R = randn(rng, *y.shape)
    dx, g = NB.layer_norm_backward(ns.put(R), saved)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    want = torch_vjp(lambda: F.layer_norm(tx, (D,), tw, tb, eps=1e-6), R, tx, tw, tb)
    # dx = (dxhat - mean - xhat mean) / std subtracts terms of size |dy w| / std that can cancel to
    # ~0 (D = 2 cancels exactly but for eps): the error is float32's on those terms, so the floor
    # is 1e-5 of their size, not of dx's.
    assert_grad(ns, dx, want[0], mag=centred_scale(R, w, x, -1))
    assert_grad(ns, g["weight"], want[1])
    assert_grad(ns, g["bias"], want[2])


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, D=widths, scale=scales, seed=seeds)
def test_rms_norm_backward_with_its_one_plus_w_scale(ns, lead, D, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, *lead, D, scale=scale), randn(rng, D, scale=0.5)
    y, saved = NB.rms_norm_forward(ns.put(x), ns.put(w))
    np.testing.assert_array_equal(ns.get(y), ns.get(nn.rms_norm.reference(ns.put(x), ns.put(w))))  # nn.py's reference values
    R = randn(rng, *y.shape)
    dx, g = NB.rms_norm_backward(ns.put(R), saved)
    norm = GemmaRMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))  # the stored offset: HF applies 1 + w
    wdx, wg = _module_vjp(norm, x, R)
    # dx = (dxhat - xhat mean(dxhat xhat)) / rms removes a radial part that can cancel dxhat: the floor
    # is 1e-5 of the terms' size |dy (1 + w)| / rms, as for layer norm.
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1) + 1e-6).min(initial=np.inf)
    assert_grad(ns, dx, wdx, mag=float(np.abs(R * (1 + w)).max(initial=0.0) / rms))
    assert_grad(ns, g["weight"], wg["weight"])


@st.composite
def batch_norm_shapes(draw):
    kind = draw(st.sampled_from(["1d-flat", "1d-seq", "2d"]))
    B, Cc = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if kind == "1d-flat":
        return (max(B, 2), Cc)  # training needs more than one value per channel
    if kind == "1d-seq":
        return (B, Cc, draw(st.integers(2, 5)))
    return (B, Cc, draw(st.integers(1, 3)), draw(st.integers(2, 3)))


@each_namespace
@HYPOTHESIS
@given(shape=batch_norm_shapes(), training=st.booleans(), seed=seeds)
def test_batch_norm_backward(ns, shape, training, seed):
    rng = np.random.default_rng(seed)
    Cc = shape[1]
    x, w, b = randn(rng, *shape) + np.float32(2.0), randn(rng, Cc), randn(rng, Cc)
    rm, rv = randn(rng, Cc), rng.uniform(0.5, 2.0, Cc).astype(np.float32)
    (y, _, _), saved = NB.batch_norm_forward(*map(ns.put, (x, w, b, rm, rv)), training=training)
    R = randn(rng, *shape)
    dx, g = NB.batch_norm_backward(ns.put(R), saved)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    want = torch_vjp(lambda: F.batch_norm(tx, torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()), tw, tb,
                                          training=training, eps=1e-5), R, tx, tw, tb)
    # training: dx is centred over the batch axes like layer norm's over D, so the floor is 1e-5 of
    # the centred terms' size; eval: dx = dy w / std elementwise, within that too.
    axes = tuple(i for i in range(x.ndim) if i != 1)
    std = np.sqrt((np.var(x.astype(np.float64), axis=axes) if training else rv.astype(np.float64)) + 1e-5)
    assert_grad(ns, dx, want[0], mag=float(np.abs(R).max() * np.abs(w).max() / std.min()))
    assert_grad(ns, g["weight"], want[1])
    assert_grad(ns, g["bias"], want[2])


# --- attention ----------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), axis_pick=st.integers(0, 2),
       scale=scales, seed=seeds)
def test_softmax_backward(ns, shape, axis_pick, scale, seed):
    rng = np.random.default_rng(seed)
    x, axis = randn(rng, *shape, scale=scale), axis_pick % len(shape) - len(shape)
    y, saved = NB.softmax_forward(ns.put(x), axis=axis)
    R = randn(rng, *shape)
    tx = leaf(x)
    (want,) = torch_vjp(lambda: torch.softmax(tx, dim=axis), R, tx)
    # y (dy - <dy, y>): a <= 5-term dot product, errors of 1e-7 relative to max|y dy| <= max|dy|.
    assert_grad(ns, NB.softmax_backward(ns.put(R), saved), want, mag=float(np.abs(R).max()))


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 2), T=st.integers(1, 4), n=st.integers(1, 3), E=st.integers(1, 4), seed=seeds)
def test_split_and_merge_heads_backward_are_each_others_inverse(ns, B, T, n, E, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, B, T, n * E)
    y, saved = NB.split_heads_forward(ns.put(x), n)
    R = randn(rng, *y.shape)
    tx = leaf(x)
    (want,) = torch_vjp(lambda: tx.view(B, T, n, E).transpose(1, 2), R, tx)
    assert_close(ns, NB.split_heads_backward(ns.put(R), saved), want, rtol=0.0, atol=0.0)  # a permutation: exact
    z, saved = NB.merge_heads_forward(y)
    R2 = randn(rng, B, T, n * E)
    assert_close(ns, NB.merge_heads_backward(ns.put(R2), saved), torch.from_numpy(R2).view(B, T, n, E).transpose(1, 2),
                 rtol=0.0, atol=0.0)


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), half=st.integers(1, 4),
       theta=st.sampled_from([10000.0, 1e6]), seed=seeds)
def test_rope_backward_is_the_inverse_rotation(ns, B, H, T, half, theta, seed):
    rng = np.random.default_rng(seed)
    E = 2 * half
    x, pos = randn(rng, B, H, T, E), rng.integers(0, 5000, (B, T))
    cos, sin = nn.rope_angles(ns.put(pos), E, theta)
    y, saved = NB.rope_forward(ns.put(x), cos, sin)
    R = randn(rng, *y.shape)
    tx, tc, ts = leaf(x), torch.from_numpy(ns.get(cos)), torch.from_numpy(ns.get(sin))
    (want,) = torch_vjp(lambda: apply_rotary_pos_emb(tx, tx, tc, ts)[0], R, tx)  # HF's rotate_half RoPE
    # a 2-term sum per element of cos/sin products: two roundings, ~1e-7 relative to max|dy|.
    assert_grad(ns, NB.rope_backward(ns.put(R), saved), want, mag=float(np.abs(R).max()))


def masks(kind, B, T, S, rng):
    """bool [B, 1, T, S] of a kind: causal, prefix-LM, sliding window, dead keys (never seen) or rows seeing nothing."""
    t, s = np.arange(T)[:, None] + (S - T), np.arange(S)[None, :]  # queries are the last T positions
    if kind == "causal":
        allowed = s <= t
    elif kind == "prefix":  # PaliGemma: image + prompt (the prefix) see each other, the suffix is causal
        allowed = (s <= t) | (s < rng.integers(1, S + 1))
    elif kind == "window":  # Gemma 2's local layers: the last w keys
        allowed = (s <= t) & (t - s < rng.integers(1, S + 1))
    elif kind == "dead_keys":  # some keys no query sees: their dk, dv must be exactly 0
        allowed = np.broadcast_to(rng.random(S) < 0.5, (T, S))
    else:  # "dead_rows": a query that sees no key (a padded row): uniform weights, as torch does with the same mask
        allowed = (s <= t) & (rng.random((T, 1)) < 0.6)
    return np.broadcast_to(allowed, (B, 1, T, S)).copy()


def torch_attention(q, k, v, mask, scale, softcap):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # query head h reads kv head h // G
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 2), heads=head_layouts(), T=st.integers(1, 5), extra=st.integers(0, 3), E=st.integers(1, 6),
       mask_kind=st.sampled_from(["none", "causal", "prefix", "window", "dead_keys", "dead_rows"]),
       softcap=st.sampled_from([None, 50.0, 2.0]), seed=seeds)
def test_attention_backward_mha_gqa_mqa_masks_softcap(ns, B, heads, T, extra, E, mask_kind, softcap, seed):
    rng = np.random.default_rng(seed)
    (H, K), S = heads, T + extra
    q, k, v = randn(rng, B, H, T, E), randn(rng, B, K, S, E), randn(rng, B, K, S, E)
    mask = None if mask_kind == "none" else nn.additive_mask(ns.put(masks(mask_kind, B, T, S, rng)))
    scale = E ** -0.5
    o, saved = NB.attention_forward(ns.put(q), ns.put(k), ns.put(v), mask, scale=scale, softcap=softcap)
    np.testing.assert_array_equal(ns.get(o), ns.get(nn.attention(ns.put(q), ns.put(k), ns.put(v), mask, scale=scale,
                                                                 softcap=softcap)))  # nn.py's values
    R = randn(rng, B, H, T, E)
    dq, dk, dv = NB.attention_backward(ns.put(R), saved)
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tm = None if mask is None else torch.from_numpy(ns.get(mask))
    want = torch_vjp(lambda: torch_attention(tq, tk, tv, tm, scale, softcap), R, tq, tk, tv)
    # Each gradient is two matmuls (<= 8 keys, <= 6 dims) and a softmax VJP; dk and dv also sum the
    # G <= 4 query heads sharing a kv head. float32: ~1e-6 relative to the largest entry.
    assert_grad(ns, dq, want[0])
    assert_grad(ns, dk, want[1])
    assert_grad(ns, dv, want[2])
    if mask_kind == "dead_keys":  # a key no query sees gets no gradient at all
        dead = ns.get(mask)[0, 0, 0] != 0.0  # [S]: the same hidden keys for every query row
        assert np.all(ns.get(dk)[:, :, dead, :] == 0.0) and np.all(ns.get(dv)[:, :, dead, :] == 0.0)


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(2, 4), T=st.integers(1, 4), E=st.integers(1, 4),
       seed=seeds)
def test_gqa_kv_gradient_is_the_sum_over_its_query_heads(ns, B, K, G, T, E, seed):
    """GQA's dk, dv = the MHA gradients of the G copies of each kv head, added."""
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, K * G, T, E), randn(rng, B, K, T, E), randn(rng, B, K, T, E)
    R = ns.put(randn(rng, B, K * G, T, E))
    _, saved = NB.attention_forward(ns.put(q), ns.put(k), ns.put(v), scale=1.0)
    _, dk, dv = NB.attention_backward(R, saved)
    rep = lambda a: np.repeat(a, G, axis=1)  # noqa: E731 (MHA with each kv head copied for its G query heads)
    _, saved = NB.attention_forward(ns.put(q), ns.put(rep(k)), ns.put(rep(v)), scale=1.0)
    _, dk_mha, dv_mha = NB.attention_backward(R, saved)
    for got, per_head in ((dk, dk_mha), (dv, dv_mha)):
        want = ns.get(per_head).reshape(B, K, G, T, E).sum(axis=2)
        # the same products, added in another order: a few roundings relative to the largest entry
        assert_grad(ns, got, want, rtol=1e-5, floor=1e-6)


# --- embeddings, head and loss ------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(V=st.integers(1, 6), D=st.integers(1, 5), B=st.integers(1, 2), T=st.integers(1, 9), block=st.integers(1, 4),
       scaled=st.booleans(), seed=seeds)
def test_embedding_scatter_add_adds_repeated_ids(ns, V, D, B, T, block, scaled, seed):
    from unittest import mock

    rng = np.random.default_rng(seed)
    w, ids = randn(rng, V, D), rng.integers(0, V, (B, T))  # T up to 9 > V: ids repeat
    y, saved = NB.embed_forward(ns.put(ids), ns.put(w), None if scaled else 1.0)
    s = np.float32(np.sqrt(D)) if scaled else np.float32(1.0)  # sqrt(D) rounded to float32 first, as HF
    np.testing.assert_array_equal(ns.get(y), w[ids] * s)
    R = randn(rng, B, T, D)
    with mock.patch.object(NB, "ONE_HOT_BUDGET", block * V):  # the one-hot built `block` tokens at a time
        g = NB.embed_backward(ns.put(R), saved)
    tw = leaf(w)
    (want,) = torch_vjp(lambda: F.embedding(torch.from_numpy(ids), tw) * torch.tensor(s), R, tw)
    # each row sums the <= 18 dy rows of its id (in another order than torch's index_add): roundings only
    assert_grad(ns, g["weight"], want, floor=1e-6)
    manual = np.zeros((V, D), np.float64)
    np.add.at(manual, ids.reshape(-1), R.reshape(-1, D).astype(np.float64) * s)  # the scatter-add spelled out
    np.testing.assert_allclose(ns.get(g["weight"]), manual, rtol=1e-5, atol=1e-5 * np.abs(manual).max(initial=1.0))


@each_namespace
@HYPOTHESIS
@given(V=st.integers(2, 7), D=st.integers(1, 5), T=st.integers(2, 8), softcap=st.sampled_from([None, 30.0, 3.0]),
       seed=seeds)
def test_tied_head_and_lookup_add_into_one_table(ns, V, D, T, softcap, seed):
    """ids -> embed * sqrt(D) -> linear A -> logits = softcap(h W^T) with one W: dW = lookup's + head's."""
    rng = np.random.default_rng(seed)
    w, a, ids = randn(rng, V, D, scale=0.5), randn(rng, D, D, scale=0.5), rng.integers(0, V, (1, T))
    e, se = NB.embed_forward(ns.put(ids), ns.put(w))
    h, sa = NB.linear_forward(e, ns.put(a))
    z, sh = NB.lm_head_forward(h, ns.put(w), softcap)
    R = randn(rng, 1, T, V)
    dh, gh = NB.lm_head_backward(ns.put(R), sh)
    de, ga = NB.linear_backward(dh, sa)
    g = NB.add_grads(NB.embed_backward(de, se), gh)
    tw, ta = leaf(w), leaf(a)

    def tied():
        z = F.linear(F.embedding(torch.from_numpy(ids), tw) * torch.tensor(np.float32(np.sqrt(D))), ta) @ tw.T
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    want = torch_vjp(tied, R, tw, ta)
    # both paths are <= 3 matmuls deep, the lookup's rows summed over repeated ids: float32 roundings
    assert_grad(ns, g["weight"], want[0])
    assert_grad(ns, ga["weight"], want[1])


@each_namespace
@HYPOTHESIS
@given(lead=lead_shapes, n=widths, cap=st.sampled_from([1.0, 30.0]), scale=scales, seed=seeds)
def test_final_logit_softcap_backward(ns, lead, n, cap, scale, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, *lead, n, scale=scale * cap)
    y, saved = NB.softcap_forward(ns.put(x), cap)
    R = randn(rng, *y.shape)
    tx = leaf(x)
    (want,) = torch_vjp(lambda: cap * torch.tanh(tx / cap), R, tx)
    # 1 - tanh^2: in saturation tanh^2 ~ 1 leaves 1 - t^2 with an absolute error ~1e-7: floor 1e-6 max|dy|
    assert_grad(ns, NB.softcap_backward(ns.put(R), saved), want, mag=float(np.abs(R).max(initial=0.0)), floor=1e-6)


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 3), T=st.integers(2, 6), V=st.integers(1, 9), scale=scales, p_ignore=st.sampled_from([0.0, 0.5]),
       seed=seeds)
def test_cross_entropy_over_counted_suffix_tokens(ns, B, T, V, scale, p_ignore, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, B, T, V, scale=scale)
    labels = np.where(rng.random((B, T)) < p_ignore, -100, rng.integers(0, V, (B, T)))
    labels[0, -1] = rng.integers(0, V)  # at least one counted token after the shift
    zs, ys = ns.put(logits)[:, :-1, :], ns.put(labels)[:, 1:]  # next-token: position t predicts label t + 1
    loss, saved = NB.cross_entropy_forward(zs, ys)
    r = float(rng.standard_normal())
    dz = NB.cross_entropy_backward(r, saved)
    tz = leaf(logits)
    with torch.enable_grad():
        tl = F.cross_entropy(tz[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
        (tl * r).backward()
    # logsumexp over <= 9 logits of size <= 10 and a mean: ~1e-6 relative
    assert_close(ns, loss, tl, rtol=1e-5, atol=1e-6 * max(1.0, scale))
    assert_grad(ns, dz, tz.grad[:, :-1])  # softmax - onehot, / count: elementwise roundings


@each_namespace
def test_cross_entropy_with_no_counted_token_is_zero_not_nan(ns):
    loss, saved = NB.cross_entropy_forward(ns.put(np.ones((2, 3), np.float32)), ns.put(np.array([-100, -100])))
    assert float(ns.get(loss)) == 0.0  # torch gives NaN (0 / 0); a step with nothing to learn should change nothing
    assert np.all(ns.get(NB.cross_entropy_backward(1.0, saved)) == 0.0)


@each_namespace
@HYPOTHESIS
@given(n=st.integers(1, 5), D=widths, scale=scales, zero_row=st.booleans(), seed=seeds)
def test_l2_normalize_backward(ns, n, D, scale, zero_row, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, n, D, scale=scale)
    if zero_row:
        x[0] = 0.0  # the norm clamped at eps: dx = dy / eps, as torch's clamp_min
    y, saved = NB.l2_normalize_forward(ns.put(x))
    np.testing.assert_array_equal(ns.get(y), ns.get(C.l2_normalize(ns.put(x))))  # contrastive's values
    R = randn(rng, n, D)
    tx = leaf(x)
    (want,) = torch_vjp(lambda: F.normalize(tx, dim=-1, eps=1e-12), R, tx)
    # (dy - y <dy, y>) / |x| per row: the radial part removed can cancel dy, so the floor is relative
    # to each row's |dy| / |x| (rows differ by 1e12 when one is clamped): checked row by row.
    norms = np.maximum(np.linalg.norm(x.astype(np.float64), axis=-1), 1e-12)
    got = ns.get(NB.l2_normalize_backward(ns.put(R), saved))
    for i in range(n):
        mag = float(np.abs(R[i]).max() / norms[i])
        np.testing.assert_allclose(got[i], to_numpy(want[i]), rtol=1e-5, atol=1e-5 * mag)
    assert got.dtype == np.float32


# --- contrastive losses -------------------------------------------------------------------------

def torch_contrastive(kind, img, txt, scale, bias):
    """Loss and its autograd gradients on HF's formulas (SiglipModel.forward, clip_loss)."""
    ti, tt = leaf(img), leaf(txt)
    ts, tb = (torch.tensor(float(v), dtype=torch.float32, requires_grad=True) for v in (scale, bias))  # 0-d leaves
    with torch.enable_grad():
        x, y = F.normalize(ti, dim=-1), F.normalize(tt, dim=-1)
        logits = x @ y.T * ts.exp()  # per image
        if kind == "siglip":
            z = 2 * torch.eye(len(img)) - 1
            loss = -F.logsigmoid(z * (logits + tb)).sum(dim=-1).mean()
        else:
            lab = torch.arange(len(img))
            loss = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        loss.backward()
    return loss, {"image_embeds": ti.grad, "text_embeds": tt.grad, "logit_scale": ts.grad,
                  "logit_bias": torch.zeros(()) if tb.grad is None else tb.grad}


contrastive_inputs = dict(n=st.integers(1, 9), d=st.integers(1, 17), scale=st.floats(-1.0, 5.0),
                          bias=st.floats(-12.0, 3.0), seed=st.integers(0, 2**16))


@each_namespace
@HYPOTHESIS
@given(**contrastive_inputs)
def test_clip_and_siglip_gradients_match_autograd(ns, n, d, scale, bias, seed):
    rng = np.random.default_rng(seed)
    img, txt = randn(rng, n, d, scale=3.0), randn(rng, n, d, scale=0.5)  # un-normalised, of different sizes
    for kind, got in (("siglip", C.siglip_loss_and_grads(ns.put(img), ns.put(txt), scale, bias)),
                      ("clip", C.clip_loss_and_grads(ns.put(img), ns.put(txt), scale))):
        want_loss, want = torch_contrastive(kind, img, txt, scale, bias)
        loss, grads = got
        # logits up to e^5 + 12 ~ 160: log-sigmoid / logsumexp of them keep ~1e-7 relative, summed over
        # n^2 <= 81 pairs: rtol 2e-5 as test_contrastive's loss check.
        assert_close(ns, loss, want_loss, rtol=2e-5, atol=2e-5)
        for name, emb in (("image_embeds", img), ("text_embeds", txt)):
            # t * (a sum over n <= 9 pairs of dL/dlogit <= 1/n each) through the L2 norm, whose radial
            # part removed may cancel it (d = 1: the true gradient is 0): the floor is 2e-5 of the terms'
            # size t / (n min|x|); rtol 1e-4 as t up to e^5 amplifies the logits' roundings.
            mag = max(float(np.abs(to_numpy(want[name])).max()),
                      np.exp(scale) / (n * float(np.linalg.norm(emb, axis=-1).min())))
            assert_grad(ns, grads[name], want[name], rtol=1e-4, floor=2e-5, mag=mag)
        for name in ("logit_scale",) + (("logit_bias",) if kind == "siglip" else ()):
            # sums over the n^2 <= 81 pairs of dL/dlogit (times the logit for t'): rtol 1e-4, floor 2e-5
            # of the largest term (|logit| <= e^5 + 12), as the sum may cancel to ~0.
            assert_grad(ns, grads[name], want[name], rtol=1e-4, floor=2e-5, mag=max(1.0, np.exp(scale)))


@each_namespace
@HYPOTHESIS
@given(chunk=st.integers(1, 10), **contrastive_inputs)
def test_chunked_siglip_equals_unchunked(ns, chunk, n, d, scale, bias, seed):
    rng = np.random.default_rng(seed)
    img, txt = ns.put(randn(rng, n, d)), ns.put(randn(rng, n, d))
    loss, grads = C.siglip_loss_and_grads(img, txt, scale, bias)
    loss_c, grads_c = C.siglip_loss_chunked(img, txt, scale, bias, chunk)
    # the same terms summed block by block instead of at once: a few roundings of the n^2 <= 81 terms
    assert_close(ns, loss_c, ns.get(loss), rtol=1e-5, atol=1e-6)
    logits = C.pair_logits(img, txt, ns.put(np.float32(scale)), bias)
    assert_close(ns, loss, ns.get(C.siglip_loss(logits)), rtol=2e-5, atol=2e-5)  # the forward-only loss, too
    for name, g in grads.items():
        assert_grad(ns, grads_c[name], ns.get(g), rtol=1e-5, floor=1e-5)  # block sums reordered: roundings


def test_chunked_siglip_peak_memory_grows_with_n_times_chunk():
    """numpy under tracemalloc: at n = 1024 the unchunked block is [n, n]; chunks of 64 hold [n, 64]."""
    import tracemalloc

    rng = np.random.default_rng(0)
    img, txt = randn(rng, 1024, 16), randn(rng, 1024, 16)
    peaks = {}
    for chunk in (1024, 64):
        tracemalloc.start()
        C.siglip_loss_chunked(img, txt, 2.3, -10.0, chunk)
        peaks[chunk] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    n2 = 1024 * 1024 * 4  # one [n, n] float32 matrix: 4 MiB
    assert peaks[1024] > 2 * n2  # the unchunked form holds more than two [n, n] matrices at its peak
    assert peaks[64] < n2 / 2  # the chunked one less than half of one (blocks [n, 64] = 1/16 of it, a few at once)


# --- float32 discipline -------------------------------------------------------------------------

def _arrays(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _arrays(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _arrays(v)
    elif hasattr(tree, "dtype") and hasattr(tree, "shape"):
        yield tree


@each_namespace
def test_no_float64_in_anything_saved_or_returned(ns):
    """Every forward's output and saved tensors and every backward's gradients are float32 (ids stay integer)."""
    xp, rng = ns.xp, np.random.default_rng(0)
    r = lambda *s: ns.put(randn(rng, *s))  # noqa: E731
    lin = lambda o, i: {"weight": r(o, i), "bias": r(o)}  # noqa: E731
    x, ids = r(2, 3, 4), ns.put(rng.integers(0, 5, (2, 3)))
    cos, sin = nn.rope_angles(ns.put(rng.integers(0, 9, (2, 3))), 4)
    mask = nn.additive_mask(ns.put(masks("prefix", 2, 3, 3, rng)))
    cases = [
        (NB.linear_forward, (x,), lin(5, 4), NB.linear_backward),
        (NB.gelu_tanh_forward, (x,), {}, NB.gelu_tanh_backward),
        (NB.siglip_mlp_forward, (x,), {"fc1": lin(6, 4), "fc2": lin(4, 6)}, NB.siglip_mlp_backward),
        (NB.geglu_forward, (x,), {k: {"weight": r(*s)} for k, s in
                                  (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6)))}, NB.geglu_backward),
        (NB.patch_embed_forward, (r(2, 3, 4, 4),), {"weight": r(5, 3, 2, 2), "bias": r(5)}, NB.patch_embed_backward),
        (NB.position_add_forward, (x,), {"weight": r(3, 4)}, NB.position_add_backward),
        (NB.layer_norm_forward, (x,), {"weight": r(4), "bias": r(4)}, NB.layer_norm_backward),
        (NB.rms_norm_forward, (x,), {"weight": r(4)}, NB.rms_norm_backward),
        (lambda *a, **k: (lambda o, s: (o[0], s))(*NB.batch_norm_forward(*a, **k, training=True)),
         (x, r(3), r(3), r(3), ns.put(np.ones(3, np.float32))), {}, NB.batch_norm_backward),
        (NB.softmax_forward, (x,), {}, NB.softmax_backward),
        (NB.split_heads_forward, (x, 2), {}, NB.split_heads_backward),
        (NB.merge_heads_forward, (r(2, 2, 3, 2),), {}, NB.merge_heads_backward),
        (NB.rope_forward, (r(2, 2, 3, 4), cos, sin), {}, NB.rope_backward),
        (NB.attention_forward, (r(2, 4, 3, 2), r(2, 2, 3, 2), r(2, 2, 3, 2), mask), {"scale": 0.7, "softcap": 5.0},
         NB.attention_backward),
        (NB.embed_forward, (ids, r(5, 4)), {}, NB.embed_backward),
        (NB.softcap_forward, (x, 3.0), {}, NB.softcap_backward),
        (NB.lm_head_forward, (x, r(7, 4), 30.0), {}, NB.lm_head_backward),
        (NB.cross_entropy_forward, (r(2, 3, 5), ids), {}, NB.cross_entropy_backward),
        (NB.l2_normalize_forward, (x,), {}, NB.l2_normalize_backward),
    ]
    for forward, args, params, backward in cases:
        y, saved = forward(*args, **params)
        grads = backward(xp.ones_like(y), saved)
        for a in (*_arrays(y), *_arrays(saved), *_arrays(grads)):
            ok = a.dtype == xp.float32 or xp.isdtype(a.dtype, "integral") or a.dtype == xp.bool
            assert ok, f"{forward.__name__}: a {a.dtype} array of shape {tuple(a.shape)}"
    img, txt = r(6, 4), r(6, 4)
    for loss, grads in (C.clip_loss_and_grads(img, txt, 2.3), C.siglip_loss_and_grads(img, txt, 2.3, -10.0),
                        C.siglip_loss_chunked(img, txt, 2.3, -10.0, 4)):
        assert all(a.dtype == xp.float32 for a in (loss, *_arrays(grads)))
