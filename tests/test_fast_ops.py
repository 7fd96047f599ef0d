"""Every registered fast op against its reference, on every backend that registered one.

A backend may replace a reference op of npvlm.nn / npvlm.kv_cache for its array type
(`npvlm.fast_ops.register`). The contract (npvlm/fast_ops.py): the replacement returns what the
reference returns, to the tolerance stated per op below, with the same dtype and shape, and never
writes into its inputs, except write_columns, whose result replaces the cache it is given, so it
may update that cache in place (its result is compared, and its other inputs must stay unchanged).

The grid is built from `npvlm.fast_ops.registered()` after every backend that imports here has
run its registrations, so a newly registered op is covered by name; an op registered with no input
builder below fails (add the builder with the op's shapes) rather than go unchecked.
"""

from __future__ import annotations

import numpy as np
import pytest

import npvlm.kv_cache  # noqa: F401  (defines write_columns' reference)
import npvlm.nn  # noqa: F401  (defines the layer ops' references)
import npvlm.generation.sampling  # noqa: F401  (defines top_candidates' reference)
from npvlm import fast_ops
from npvlm.backends import get_backend

CASES = 3  # random input sets per (op, backend)


def _backends_by_type() -> dict:
    """{array type: backend} for each backend that imports here (importing registers its fast ops)."""
    out = {}
    for name in ("numpy", "array_api_strict", "cupy"):
        try:
            be = get_backend(name)
            out[type(be.asarray(np.zeros(1, dtype=np.float32)))] = be
        except Exception:  # cupy without a GPU (or not installed): its replacements cannot run here
            continue
    return out


BY_TYPE = _backends_by_type()


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def lead(rng):  # a random leading shape, maybe none
    return tuple(int(n) for n in rng.integers(1, 4, size=rng.integers(0, 3)))


# op name -> (rng -> (args, kwargs), rtol, atol); tolerances: the replacement may order float32 sums
# differently (a fused or blocked kernel), a few ulps of O(1) results; writes and selections are exact.
def _write_columns(rng):
    B, K, C, E = (int(n) for n in rng.integers(1, 5, size=4))
    cols = rng.integers(0, C, size=B).astype(np.int64)  # rows at different columns
    return (randn(rng, B, K, C, E), randn(rng, B, K, 1, E), cols), {}


def _gelu_tanh(rng):
    return (randn(rng, *lead(rng), int(rng.integers(1, 20)), scale=3.0),), {}


def _rms_norm(rng):
    D = int(rng.integers(1, 20))
    return (randn(rng, *lead(rng), D, scale=2.0), randn(rng, D, scale=0.5)), {"eps": 1e-6}


def _layer_norm(rng):
    D = int(rng.integers(1, 20))
    return (randn(rng, *lead(rng), D, scale=2.0) + np.float32(1.5), randn(rng, D), randn(rng, D)), {"eps": 1e-6}


def _softmax(rng):
    shape = tuple(int(n) for n in rng.integers(1, 7, size=rng.integers(1, 4)))
    return (randn(rng, *shape, scale=10.0),), {"axis": int(rng.integers(-len(shape), len(shape)))}


def _top_candidates(rng):  # ties (rounded logits), -inf (masked tokens), k from 1 to V
    B, V = int(rng.integers(1, 4)), int(rng.choice([7, 64, 3000]))
    z = np.round(rng.normal(0, 3, (B, V)), int(rng.integers(0, 3)))  # 0-2 decimals: many exact ties
    z[rng.random((B, V)) < 0.05] = -np.inf
    return (z,), {"k": int(rng.integers(1, V + 1))}


BUILDERS = {
    "top_candidates": (_top_candidates, 0.0, 0.0),  # ids: exact
    "write_columns": (_write_columns, 0.0, 0.0),
    "gelu_tanh": (_gelu_tanh, 1e-5, 1e-6),
    "rms_norm": (_rms_norm, 1e-5, 1e-6),
    "layer_norm": (_layer_norm, 1e-5, 1e-6),
    "softmax": (_softmax, 1e-5, 1e-7),
}
MAY_WRITE_FIRST = {"write_columns"}  # ops whose contract lets them update their first argument in place

GRID = [(name, t) for name, types in sorted(fast_ops.registered().items()) for t in types]


def test_the_grid_is_not_empty():
    assert ("write_columns", np.ndarray) in GRID  # the numpy backend's in-place cache write


@pytest.mark.parametrize("name,array_type", GRID, ids=[f"{n}-{t.__module__}.{t.__name__}" for n, t in GRID])
def test_replacement_equals_reference(name, array_type):
    assert name in BUILDERS, f"fast op {name!r} is registered but tests/test_fast_ops.py has no input builder for it"
    if array_type not in BY_TYPE:
        pytest.skip(f"no backend here makes {array_type.__module__}.{array_type.__name__} arrays (cupy needs a GPU)")
    be = BY_TYPE[array_type]
    build, rtol, atol = BUILDERS[name]
    impl, ref = fast_ops.replacement(name, array_type), fast_ops.reference(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    for case in range(CASES):
        args, kwargs = build(rng)
        host = [np.array(a, copy=True) for a in args]
        dev = [be.asarray(np.array(a, copy=True)) for a in args]
        want = be.to_host(ref(*[be.asarray(np.array(a, copy=True)) for a in args], **kwargs))
        got_dev = impl(*dev, **kwargs)
        assert type(got_dev) is array_type, (name, type(got_dev))
        got = be.to_host(got_dev)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{name} case {case}")
        for i, (a, before) in enumerate(zip(dev, host)):
            if i == 0 and name in MAY_WRITE_FIRST:
                continue
            np.testing.assert_array_equal(be.to_host(a), before, err_msg=f"{name} wrote into its argument {i}")
