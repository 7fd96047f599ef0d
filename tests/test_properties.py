"""Properties the layers must have whatever the numbers, checked by hypothesis in every namespace.

No reference implementation here: each test states an identity (softmax rows sum to 1, RoPE is
a rotation, a causal mask hides the future, a cache changes nothing, ...) and checks it on drawn
shapes and values, with the tolerance (or exactness) justified next to the assertion.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from npvlm import nn
from npvlm.models.paligemma_config import TextConfig
from npvlm.models.gemma import self_attention
from npvlm.kv_cache import KVCache

if __package__:  # tests/ imported as a package (an __init__.py exists)
    from .helpers import attention_params, causal_allowed, randn
    from .namespaces import HYPOTHESIS, assert_close, each_namespace
else:  # pytest's default rootdir-less import: tests/ itself is on sys.path
    from helpers import attention_params, causal_allowed, randn
    from namespaces import HYPOTHESIS, assert_close, each_namespace

# --- strategies ---------------------------------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
batches = st.integers(1, 2)
head_dims = st.sampled_from([2, 4, 6, 8, 16, 64, 256])
max_positions = st.integers(0, 17).map(lambda e: 2**e)  # RoPE positions up to 131072


@st.composite
def head_layouts(draw):
    """(H query heads, K kv heads): MHA, GQA or MQA."""
    K, G = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return K * G, K


# --- helpers ------------------------------------------------------------------------------------

# --- softmax ------------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(shape=shapes, axis_pick=st.integers(0, 2), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       masked=st.floats(0.0, 0.9), seed=seeds)
def test_softmax_rows_are_distributions(ns, shape, axis_pick, scale, masked, seed):
    rng = np.random.default_rng(seed)
    axis = -1 - (axis_pick % len(shape))
    x = randn(rng, *shape, scale=scale)
    x[rng.random(shape) < masked] = nn.MASK_MIN  # fully masked rows too: they must be uniform, not NaN
    p = ns.get(nn.softmax(ns.put(x), axis=axis))
    assert np.all(np.isfinite(p)) and np.all(p >= 0) and np.all(p <= 1)
    # A sum of <= 6 float32 probabilities, each rounded once (6e-8): within 1e-6 of 1.
    np.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=0, atol=1e-6)


@each_namespace
@HYPOTHESIS
@given(shape=shapes, axis_pick=st.integers(0, 2), shift=st.integers(-10_000, 10_000), per_row=st.booleans(),
       seed=seeds)
def test_softmax_is_shift_invariant(ns, shape, axis_pick, shift, per_row, seed):
    rng = np.random.default_rng(seed)
    axis = -1 - (axis_pick % len(shape))
    # Values on a 2**-10 grid in [-8, 8] and integer shifts below 2**14: x + c is exact in
    # float32 (<= 24 significant bits), and so is (x + c) - max(x + c) = x - max(x). The
    # max-subtracted softmax then sees bit-identical inputs, so the property holds exactly.
    x = (rng.integers(-8 * 1024, 8 * 1024, shape) / 1024).astype(np.float32)
    row_shape = tuple(1 if i == len(shape) + axis else n for i, n in enumerate(shape))
    c = rng.integers(-10_000, 10_001, row_shape) if per_row else np.full(row_shape, shift)
    p = ns.get(nn.softmax(ns.put(x), axis=axis))
    p_shifted = ns.get(nn.softmax(ns.put((x + c).astype(np.float32)), axis=axis))
    np.testing.assert_array_equal(p_shifted, p)


# --- RoPE ---------------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(B=batches, H=st.integers(1, 3), T=st.integers(1, 5), E=head_dims, max_pos=max_positions, seed=seeds)
def test_rope_preserves_norms(ns, B, H, T, E, max_pos, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, B, H, T, E)
    cos, sin = nn.rope_angles(ns.put(rng.integers(0, max_pos + 1, (B, T))), E)
    y = ns.get(nn.rope(ns.put(x), cos, sin))
    # Each pair (x_i, x_{i+E/2}) is rotated by one angle, so its own length is kept, hence the
    # vector's. Two products and a sum per element (~2 roundings) and cos^2 + sin^2 = 1 to
    # ~1e-7, whatever the angle's own rounding: rtol 1e-5 on pair lengths, atol 1e-6 for tiny pairs.
    half = E // 2
    pair_norm = lambda a: np.hypot(a[..., :half], a[..., half:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)


@each_namespace
@HYPOTHESIS
@given(E=head_dims, max_pos=max_positions, p=st.floats(0, 1), p2=st.floats(0, 1), d=st.floats(0, 1),
       q_after_k=st.booleans(), seed=seeds)
def test_rope_scores_depend_only_on_the_offset(ns, E, max_pos, p, p2, d, q_after_k, seed):
    rng = np.random.default_rng(seed)
    p, p2, d = int(p * max_pos), int(p2 * max_pos), int(d * max_pos)
    # Two (query, key) position pairs with the same offset: (p, p + d) and (p2, p2 + d).
    pairs = np.array([[p, p + d], [p2, p2 + d]])
    if q_after_k:  # a negative offset: the query sits after the key
        pairs = pairs[:, ::-1].copy()
    q, k = randn(rng, E), randn(rng, E)
    x = np.broadcast_to(np.stack([q, k])[None, None], (2, 1, 2, E)).copy()  # [pair, head, (q, k), E]
    cos, sin = nn.rope_angles(ns.put(pairs), E)
    y = ns.get(nn.rope(ns.put(x), cos, sin))
    scores = (y[:, 0, 0, :].astype(np.float64) * y[:, 0, 1, :]).sum(-1)  # q'.k' for each pair
    # Exactly, q'.k' = sum over pairs of |q_i||k_i| cos(phi_i + (pk - pq) inv_freq_i). In float32
    # each angle pos * inv_freq is rounded (error <= pos * 2**-24), so the two offsets' angles may
    # differ by <= 4 * max_pos * 2**-24 = max_pos * 2**-22; by Cauchy-Schwarz the score moves by
    # <= |q||k| times that, plus ~1e-5 |q||k| for the products and sums.
    tol = float(np.linalg.norm(q) * np.linalg.norm(k)) * ((2 * max_pos) * 2.0**-22 + 1e-5)
    assert abs(scores[0] - scores[1]) <= tol, (scores, tol)


# --- attention: causality and the cache ---------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), E=st.sampled_from([2, 4, 8]), D=st.integers(1, 10), T=st.integers(2, 7),
       j_pick=st.floats(0, 1), softcap=st.none() | st.just(50.0), seed=seeds)
def test_causal_attention_never_looks_ahead(ns, B, heads, E, D, T, j_pick, softcap, seed):
    H, K = heads
    rng = np.random.default_rng(seed)
    j = min(int(j_pick * T), T - 1)
    cfg = TextConfig(model_type="gemma2" if softcap else "gemma", hidden_size=D, num_attention_heads=H,
                     num_key_value_heads=K, head_dim=E, query_pre_attn_scalar=E, attn_logit_softcapping=softcap)
    params = ns.put_tree(attention_params(rng, D, H, K, E))
    cos, sin = nn.rope_angles(ns.put(np.broadcast_to(np.arange(T), (B, T)).copy()), E)
    mask = nn.additive_mask(ns.put(causal_allowed(B, T)))
    x = randn(rng, B, T, D)
    x_changed = x.copy()
    x_changed[:, j] = randn(rng, B, D, scale=3.0)  # a different token j
    out = ns.get(self_attention(ns.put(x), cos, sin, mask, **params, cfg=cfg))
    out_changed = ns.get(self_attention(ns.put(x_changed), cos, sin, mask, **params, cfg=cfg))
    # Exact: a hidden score is s + MASK_MIN, whose exp underflows to exactly 0, so the changed
    # key and value enter earlier rows only as 0 * v. Any leak would show as a non-zero change.
    np.testing.assert_array_equal(out_changed[:, :j], out[:, :j])
    assert not np.allclose(out_changed[:, j], out[:, j]), "token j's own output should change (sanity)"


@each_namespace
@HYPOTHESIS
@given(B=batches, heads=head_layouts(), E=st.sampled_from([2, 4, 8]), D=st.integers(1, 10), T=st.integers(1, 8),
       prefill_pick=st.floats(0, 1), chunks=st.lists(st.integers(1, 3), min_size=8, max_size=8),
       spare=st.integers(0, 3), seed=seeds)
def test_prefill_then_cached_decode_equals_full_forward(ns, B, heads, E, D, T, prefill_pick, chunks, spare, seed):
    H, K = heads
    rng = np.random.default_rng(seed)
    P = max(1, int(prefill_pick * T))  # the prompt: 1..T tokens in one call
    cfg = TextConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=E)
    params = ns.put_tree(attention_params(rng, D, H, K, E))
    x = randn(rng, B, T, D)
    positions = np.broadcast_to(np.arange(T), (B, T)).copy()

    def run(start, stop, cache=None):
        cos, sin = nn.rope_angles(ns.put(positions[:, start:stop]), E)
        mask = nn.additive_mask(ns.put(causal_allowed(B, stop - start, start=start)))  # [B, 1, new, start + new]
        return ns.get(self_attention(ns.put(x[:, start:stop]), cos, sin, mask, **params, cfg=cfg, cache=cache,
                                     layer=1, at=start))

    full = run(0, T)
    cache = KVCache(params["q_proj"]["weight"], n_layers=2, batch=B, n_kv_heads=K, capacity=T + spare, head_dim=E)
    outs, t = [run(0, P, cache)], P
    for n in chunks:  # then decode the rest, a drawn 1..3 tokens per call
        if t >= T:
            break
        outs.append(run(t, min(T, t + n), cache))
        t = min(T, t + n)
    assert not np.any(ns.get(cache.k[0])), "layer 0 of the cache was written, though every call wrote layer 1"
    # Same arithmetic, only the matmul shapes differ (BLAS blocking); hidden keys add exactly 0.
    # Outputs are O(1): rtol 1e-5, atol 1e-6.
    assert_close(ns, ns.put(np.concatenate(outs, axis=1)), full, rtol=1e-5, atol=1e-6)


# --- normalisation ------------------------------------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), D=st.integers(1, 33),
       scale=st.sampled_from([1e-2, 1.0, 100.0]), offset=st.sampled_from([0.0, 1.0, 10.0]), seed=seeds)
def test_layer_norm_standardizes_before_the_affine(ns, lead, D, scale, offset, seed):
    rng = np.random.default_rng(seed)
    x = (randn(rng, *lead, D) * scale + offset * scale).astype(np.float32)
    y = ns.get(nn.layer_norm(ns.put(x), ns.put(np.ones(D, np.float32)), ns.put(np.zeros(D, np.float32)), eps=1e-6))
    x64 = x.astype(np.float64)
    var = x64.var(axis=-1)
    # Exactly: mean(y) = 0 and var(y) = var / (var + eps) (~1, less when var ~ eps). In float32 the
    # mean is off by <= D * 2**-24 * max|x| before it is subtracted, which moves y by that over
    # sqrt(var + eps); the variance likewise, squared. So per row:
    cond = np.abs(x64).max(axis=-1) / np.sqrt(var + 1e-6)  # max|x| / std: how much rounding is amplified
    np.testing.assert_array_less(np.abs(y.mean(axis=-1)), 2 * D * 2.0**-24 * (cond + 1) + 1e-7)
    np.testing.assert_array_less(np.abs(y.var(axis=-1) - var / (var + 1e-6)), 4 * D * 2.0**-24 * (cond + 1) ** 2 + 1e-7)


@each_namespace
@HYPOTHESIS
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       seed=seeds)
def test_batch_norm_eval_with_unit_stats_is_the_identity(ns, shape, scale, seed):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = randn(rng, *shape, scale=scale)
    ones, zeros = ns.put(np.ones(C, np.float32)), ns.put(np.zeros(C, np.float32))
    # eps = 0: (x - 0) / sqrt(1 + 0) * 1 + 0 is x exactly.
    y, mean, var = nn.batch_norm(ns.put(x), ones, zeros, zeros, ones, training=False, eps=0.0)
    np.testing.assert_array_equal(ns.get(y), x)
    np.testing.assert_array_equal(ns.get(mean), 0.0)  # eval leaves the running stats as they were
    np.testing.assert_array_equal(ns.get(var), 1.0)
    # Torch's default eps = 1e-5 divides by sqrt(1 + 1e-5): x shrinks by 5e-6 relative, within rtol 1e-5.
    y, _, _ = nn.batch_norm(ns.put(x), ones, zeros, zeros, ones, training=False)
    assert_close(ns, y, x, rtol=1e-5, atol=0)
