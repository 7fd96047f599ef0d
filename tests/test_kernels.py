"""The packed weights, their kernels and the lean NumPy ops, each against its reference.

    bf16 packing   bit-identical to torch's `.to(torch.bfloat16)` (ties, NaN, Inf, subnormals);
                   widening exact
    int8 packing   per-row absmax / 127; every weight within half a step of q * scale
    packed_linear  (numba) equals float32 `x @ widen(W).T` up to summation order, decode and
                   prefill rows, sizes that are not multiples of the kernel's blocks; nn.linear
                   dispatches to it (weights passed by keyword too) and its reference path
                   without numba (`fast_ops.reference_only()`) gives the same numbers
    lean ops       every registered numpy replacement equals `op.reference` bit for bit: same dtype and
                   shape, inputs untouched
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from npvlm import fast_ops, nn
from npvlm.backends import numba_kernels, numpy_fast, packing
from npvlm.packed import Bf16Weight, Int8Weight

needs_numba = pytest.mark.skipif(not numba_kernels.HAVE_NUMBA, reason="numba not installed (the optional npvlm[fast] extra)")
SUM_ORDER = 1e-5  # float32 dot products in another summation order: |diff| <= 1e-5 * sum_k |x_k w_k|


@pytest.fixture
def registered():
    """Register the kernels and lean ops for one test, then restore the seam's table as it was."""
    saved = {name: dict(table) for name, table in fast_ops._TABLE.items()}
    numpy_fast.register_numpy_fast_ops()
    numba_kernels.register_numba_kernels()
    yield
    for name, table in fast_ops._TABLE.items():
        table.clear()
        table.update(saved.get(name, {}))


def _torch_bf16_bits(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# --- bf16 ---------------------------------------------------------------------------------------

def _special_bits() -> np.ndarray:
    """float32 bit patterns where rounding to bf16 is easy to get wrong."""
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16
    patterns = [hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi | 0xFFFF, hi]  # exact ties (both parities), either side
    patterns += [np.array([0, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
                           0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00001, 0xFFFFFFFF, 0x7FFFFFFF,  # NaNs, payloads
                           0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,  # largest finite: rounds to inf or not
                           0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80000001, 0x807F8000,  # subnormals
                           0x00800000, 0x3F808000, 0x3F818000], dtype=np.uint32)]
    patterns.append(rng.integers(0, 1 << 32, 200_000, dtype=np.uint32))  # anything at all
    return np.concatenate(patterns)


def test_bf16_rounding_is_torch_bit_for_bit():
    a = _special_bits().view(np.float32)
    np.testing.assert_array_equal(packing.to_bf16_bits(a), _torch_bf16_bits(a))  # exact: same bits, NaN -> 0xFFFF


def test_bf16_rounding_keeps_shape_and_blocks():
    a = np.random.default_rng(1).standard_normal((3, 70, 33), dtype=np.float32)
    packing.ROWS_PER_BLOCK_BYTES, before = 512, packing.ROWS_PER_BLOCK_BYTES  # many blocks of rows
    try:
        bits = packing.to_bf16_bits(a)
    finally:
        packing.ROWS_PER_BLOCK_BYTES = before
    assert bits.shape == a.shape and bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, _torch_bf16_bits(a))


def test_bf16_widening_is_exact():
    a = _special_bits().view(np.float32)
    bits = packing.to_bf16_bits(a)
    widened = packing.widen_bf16(bits)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened.view(np.uint32), expected.view(np.uint32))  # exact, bits compared (NaNs too)
    finite = np.isfinite(a) & (np.abs(a) < 3e38)
    same = packing.to_bf16_bits(widened[finite])
    np.testing.assert_array_equal(same, bits[finite])  # a widened bf16 rounds back to itself


# --- int8 ---------------------------------------------------------------------------------------

def test_int8_quantization_is_per_row_absmax():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 40), dtype=np.float32) * np.logspace(-3, 2, 9, dtype=np.float32)[:, None]
    w[4] = 0.0  # an all-zero row
    q, scale = packing.quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (9,)
    assert np.abs(q.astype(np.int32)).max() <= 127 and (np.abs(q).max(axis=1)[scale > 0] == 127).all()
    assert scale[4] == 0.0 and not q[4].any()
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-7)  # one float32 division
    deq = Int8Weight(q, scale).widen()
    assert (np.abs(deq - w) <= scale[:, None] * (0.5 + 1e-5)).all()  # round to nearest: half a step (+ rounding)
    with pytest.raises(ValueError):
        packing.quantize_int8(np.array([[1.0, np.nan]], dtype=np.float32))


def test_containers_describe_their_weight():
    w = np.ones((6, 5), dtype=np.float32)
    b, i = packing.bf16_weight(w), packing.int8_weight(w)
    assert b.shape == i.shape == (6, 5) and b.ndim == i.ndim == 2
    assert (b.nbytes, i.nbytes) == (60, 30 + 24)
    np.testing.assert_array_equal(b.widen(), w)  # 1.0 is exact in bf16
    np.testing.assert_array_equal(i.widen(), w)  # and in int8 (q = 127, scale = 1/127: one rounding, back to 1)


# --- packed_linear --------------------------------------------------------------------------------

def _case(out_features, in_features, rows, seed=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features), dtype=np.float32)
    x = rng.standard_normal((rows, in_features), dtype=np.float32)
    bias = rng.standard_normal(out_features, dtype=np.float32)
    return w, x, bias


def _assert_sum_order(y, x, w_float, bias=None):
    ref = x @ w_float.T + (0.0 if bias is None else bias)
    bound = SUM_ORDER * (np.abs(x) @ np.abs(w_float).T + (0.0 if bias is None else np.abs(bias))) + 1e-30
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert (np.abs(y - ref) <= bound).all(), float(np.max(np.abs(y - ref) / bound))


@needs_numba
@pytest.mark.parametrize("pack", [packing.bf16_weight, packing.int8_weight], ids=["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 300])  # decode kernel (<= 8 rows) and the blocked BLAS prefill
@pytest.mark.parametrize("shape", [(37, 53), (1030, 515), (5, 2100), (1030, 2051)])  # out % 4 != 0, odd in, few rows;
#                                    in >= 2048: bf16's four-rows-a-pass kernel (BF16_ROWS4_FROM_K), with 1 and 2 rows left over
def test_packed_linear_equals_float32_matmul_of_widened(pack, rows, shape):
    w, x, bias = _case(*shape, rows)
    W = pack(w)
    _assert_sum_order(numba_kernels.packed_linear(x, W), x, W.widen())
    _assert_sum_order(numba_kernels.packed_linear(x, W, bias), x, W.widen(), bias)


@needs_numba
def test_packed_linear_prefill_many_blocks():
    w, x, _ = _case(301, 70, 40)
    before = numba_kernels.BLOCK_BYTES, numba_kernels.ROWS
    numba_kernels.BLOCK_BYTES, numba_kernels.ROWS = 4 * 70 * 8, 4  # 8 rows per BLAS block: 38 blocks
    try:
        for W in (packing.bf16_weight(w), packing.int8_weight(w)):
            _assert_sum_order(numba_kernels.packed_linear(x, W), x, W.widen())
    finally:
        numba_kernels.BLOCK_BYTES, numba_kernels.ROWS = before


@needs_numba
def test_nn_linear_dispatches_to_the_kernel_and_the_reference_agrees(registered):
    w, x, bias = _case(70, 33, 6)
    x3 = x.reshape(2, 3, 33)  # [B, T, in]
    for W in (packing.bf16_weight(w), packing.int8_weight(w)):
        assert fast_ops.replacement("linear", type(W)) is numba_kernels.packed_linear
        fast = nn.linear(x3, weight=W, bias=bias)  # by keyword, as the model calls it: linear(x, **params)
        assert fast.shape == (2, 3, 70) and fast.dtype == np.float32
        with fast_ops.reference_only():  # the path without numba: widen whole, then x @ W.T
            slow = nn.linear(x3, weight=W, bias=bias)
        np.testing.assert_array_equal(slow, x3 @ W.widen().T + bias)  # the reference is exactly that
        _assert_sum_order(fast.reshape(6, 70), x, W.widen(), bias)


@needs_numba
def test_packed_linear_propagates_nan_and_inf():
    w, x, _ = _case(12, 16, 1)
    x[0, 3] = np.nan
    for W in (packing.bf16_weight(w), packing.int8_weight(w)):
        assert np.isnan(numba_kernels.packed_linear(x, W)).all()  # no fastmath nnan: NaN reaches every output
    w[5, :] = np.inf
    y = numba_kernels.packed_linear(np.ones((1, 16), dtype=np.float32), packing.bf16_weight(w))
    assert np.isposinf(y[0, 5]) and np.isfinite(np.delete(y[0], 5)).all()


def test_reference_linear_widens_packed_weights():
    w, x, bias = _case(9, 7, 2)
    for W in (Bf16Weight(packing.to_bf16_bits(w), packing.widen_bf16), packing.int8_weight(w)):
        with fast_ops.reference_only():
            np.testing.assert_array_equal(nn.linear(x, W, bias), x @ W.widen().T + bias)  # exact: same ops


# --- lean numpy ops -------------------------------------------------------------------------------

def _lean_cases():
    rng = np.random.default_rng(4)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(3.0)  # noqa: E731
    for shape in [(7,), (1, 1, 16384), (2, 33, 129), (1, 300, 1152), (3, 1, 40000)]:
        yield "gelu_tanh", (r(*shape),), {}
        yield "softmax", (r(*shape),), {}
        yield "rms_norm", (r(*shape), r(shape[-1])), {"eps": 1e-6}
        yield "layer_norm", (r(*shape), r(shape[-1]), r(shape[-1])), {"eps": 1e-5}
    yield "softmax", (r(2, 5, 6),), {"axis": 1}  # not the last axis: the reference runs
    yield "gelu_tanh", (r(40, 30)[:, ::2],), {}  # not contiguous: the reference runs
    yield "rms_norm", (r(4, 64).astype(np.float64), r(64)), {}  # not float32: the reference runs


# Every lean op repeats the reference's ufuncs in its order, the norms' mean of squares included (np.mean's
# pairwise sum per row): bit-identical, so the logits do not move when the seam swaps them in.
@pytest.mark.parametrize("case", list(_lean_cases()), ids=lambda c: f"{c[0]}-{c[1][0].shape}-{c[1][0].dtype}")
def test_lean_op_equals_reference(case, registered):
    name, args, kwargs = case
    op = getattr(nn, name)
    assert fast_ops.replacement(name, np.ndarray) is numpy_fast.LEAN_OPS[name]
    before = [a.copy() for a in args]
    got = op(*args, **kwargs)  # through the seam: the lean op
    want = op.reference(*args, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # bit for bit (tolerance 0)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)  # inputs untouched


def test_without_numba_nothing_registers_and_linear_still_works(monkeypatch):
    saved = dict(fast_ops._TABLE["linear"])
    monkeypatch.setattr(numba_kernels, "HAVE_NUMBA", False)  # as if the npvlm[fast] extra were not installed
    try:
        fast_ops._TABLE["linear"].clear()
        assert numba_kernels.register_numba_kernels() is False
        assert fast_ops.replacement("linear", Bf16Weight) is None and fast_ops.replacement("linear", Int8Weight) is None
        w, x, bias = _case(10, 12, 3)
        W = packing.bf16_weight(w)
        np.testing.assert_array_equal(nn.linear(x, weight=W, bias=bias), x @ W.widen().T + bias)  # the reference path
    finally:
        fast_ops._TABLE["linear"].clear()
        fast_ops._TABLE["linear"].update(saved)


# ---------------------------------------------------------------------------------------------
# Sampling without a full sort: the numpy top_candidates gives the reference's ids, so sample() draws the same


@pytest.mark.parametrize("V", [50, 3000, 257216])
def test_sample_draws_the_same_ids_as_the_full_sort(V, registered):
    from npvlm.generation.sampling import TOP_P_BLOCK, sample, top_candidates

    assert fast_ops.replacement("top_candidates", np.ndarray) is not None  # registered (as the numpy backend does)
    rng = np.random.default_rng(V)
    settings = [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 40, 0.8), (1.0, 1, 1.0), (0.5, 0, 0.5), (2.0, V - 1, 0.95),
                (1.0, 0, 1.0), (3.0, 0, 0.99)]  # temperature, top_k, top_p: top-p alone at T=3 leaves the block
    for seed in range(6 if V < 10000 else 2):
        logits = rng.normal(0, 4, (3, V)).astype(np.float32)
        logits[0, : V // 3] = np.round(logits[0, : V // 3])  # exact ties among likely tokens
        for temperature, top_k, top_p in settings:
            u = [float(x) for x in rng.random(3)]
            fast = sample(logits, temperature, top_k, top_p, u)
            with fast_ops.reference_only():
                ref = sample(logits, temperature, top_k, top_p, u)
            assert fast.tolist() == ref.tolist(), (seed, temperature, top_k, top_p)
    z = np.zeros((2, V))  # every value tied: the lowest indices, in order
    assert top_candidates(z, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert TOP_P_BLOCK < 257216


# --- numba's build settings ---------------------------------------------------------------------

def _features(monkeypatch, host: str, numba_loaded: bool = False):
    """What _prefer_wide_vectors leaves in NUMBA_CPU_FEATURES for a host with these LLVM features."""
    import sys

    from llvmlite import binding as llvm

    from npvlm.backends import numpy_backend

    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: type("F", (), {"flatten": lambda self: host})())
    if numba_loaded:
        import numba

        monkeypatch.setitem(sys.modules, "numba", numba)
    else:
        monkeypatch.delitem(sys.modules, "numba", raising=False)
    numpy_backend._prefer_wide_vectors()
    return numpy_backend.os.environ.get("NUMBA_CPU_FEATURES")


@needs_numba
def test_avx512_hosts_get_512_bit_vectors_and_others_are_left_alone(monkeypatch):
    """LLVM prefers 256-bit vectors on Intel's AVX-512 cores; the decode kernels are all vector work, and with 512-bit
    ones bf16 decoded 10-17 % faster (mid, 3B: tools/bench.py ab). Only before numba loads, never over the user's."""
    assert _features(monkeypatch, "+avx2,+avx512f,+fma") == "+avx2,+avx512f,+fma,-prefer-256-bit"
    assert _features(monkeypatch, "+avx2,-avx512f,+fma") is None  # no AVX-512: LLVM's choice stands
    assert _features(monkeypatch, "+avx512f", numba_loaded=True) is None  # too late: numba read its config already
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+sse2")
    from npvlm.backends import numpy_backend

    numpy_backend._prefer_wide_vectors()
    assert numpy_backend.os.environ["NUMBA_CPU_FEATURES"] == "+sse2"  # the user's setting is kept
