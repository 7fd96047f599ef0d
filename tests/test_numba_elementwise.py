"""numba's one-pass GELU (backends/numba_elementwise.py) against nn.gelu_tanh's reference.

    values      within 5e-7 (absolute) of the reference over |x| <= 30 and scales from 0.01 to 10; its
                own exponential (Taylor to degree 7, 2^n from the exponent bits) is what is tested
    edges       NaN, +-inf, +-0, huge and tiny inputs give exactly the reference's outputs (-0.0 where
                the reference's tanh saturates, NaN for -inf), and no input is written
    fallback    decode-sized inputs, and anything but a C-contiguous float32 array, are
                numpy_fast.gelu_tanh's, bit for bit
    load        a model that loads numba (packed weights) puts it behind nn.gelu_tanh; a small float32
                model, which never imports numba, keeps numpy_fast's
"""

from __future__ import annotations

import numpy as np
import pytest

import npvlm
from hf_ref import write
from npvlm import fast_ops, nn
from npvlm.backends import numba_kernels, numpy_fast

pytestmark = pytest.mark.skipif(not numba_kernels.HAVE_NUMBA, reason="numba not installed (the optional npvlm[fast] extra)")
if numba_kernels.HAVE_NUMBA:
    from npvlm.backends import numba_elementwise

GELU_ABS = 5e-7  # |numba - reference|: two float32 roundings of the same function, one through exp, one through tanh


@pytest.fixture
def every_size(monkeypatch):
    monkeypatch.setattr(numba_elementwise, "PARALLEL_MIN", 1)  # the edge cases below are a few floats


def test_gelu_within_5e7_of_the_reference():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(300_001, dtype=np.float32) * s for s in (0.01, 1.0, 3.0, 10.0)]
                       + [np.linspace(-30, 30, 600_002, dtype=np.float32)]).reshape(-1, 6)  # [N, 6]: shape kept
    assert x.size >= numba_elementwise.PARALLEL_MIN
    before = x.copy()
    got = numba_elementwise.gelu_tanh(x)
    want = nn.gelu_tanh.reference(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.abs(got - want).max() <= GELU_ABS, float(np.abs(got - want).max())
    assert not np.array_equal(got, numpy_fast.gelu_tanh(x))  # it is numba's pass, not a fallback
    np.testing.assert_array_equal(x, before)


def test_gelu_edges_equal_the_reference(every_size):
    x = np.array([np.nan, np.inf, -np.inf, -100.0, 100.0, 0.0, -0.0, 1e20, -1e20, 1e-30, -1e-30, 3e38, -3e38, -9.0,
                  -20.0], dtype=np.float32)
    with np.errstate(all="ignore"):  # the reference overflows x^3 on the huge ones, as it should
        want = nn.gelu_tanh.reference(x)
    got = numba_elementwise.gelu_tanh(x)
    np.testing.assert_array_equal(got, want)  # NaN where it has NaN
    assert np.array_equal(np.signbit(got), np.signbit(want))  # -0.0 where the reference's tanh saturates


def test_gelu_leaves_decode_sizes_and_other_inputs_to_numpy_fast():
    x = np.random.default_rng(4).standard_normal((40, 30)).astype(np.float32)
    step = np.random.default_rng(5).standard_normal((8, 1, 16384)).astype(np.float32)  # a decode step, 8 rows
    for a in (step, x.T, x.astype(np.float64), x[:, ::2]):  # decode-sized, strided, float64, strided
        np.testing.assert_array_equal(numba_elementwise.gelu_tanh(a), numpy_fast.gelu_tanh(a))


def test_a_model_that_loads_numba_runs_gelu_through_it(tmp_path, restore_table):
    ckpt = write(tmp_path, seed=21, hidden=32, heads=4, kv_heads=1, head_dim=8, layers=2)
    numpy_fast.register_numpy_fast_ops(["gelu_tanh"])
    npvlm.load(ckpt)  # float32, a few hundred KiB: numba is not needed
    assert fast_ops.replacement("gelu_tanh", np.ndarray) is numpy_fast.gelu_tanh
    npvlm.load(ckpt, weights="bfloat16")  # packed weights load numba's kernels
    assert fast_ops.replacement("gelu_tanh", np.ndarray) is numba_elementwise.gelu_tanh
