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
    np.testing.assert_array_equal(ns.get(y), ns.get(nn.layer_norm(ns.put(x), ns.put(w), ns.put(b))))  # nn.py's values
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
    np.testing.assert_array_equal(ns.get(y), ns.get(nn.rms_norm(ns.put(x), ns.put(w))))  # nn.py's values
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
