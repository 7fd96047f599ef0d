"""The GPU kernels for packed weights (backends/cupy_kernels.py) against the NumPy reference. `-m cupy`.

    packed_linear  bf16 / int8 GEMV (<= 8 rows, the CUDA kernels) and blocked cuBLAS prefill equal the
                   float32 `x @ widen(W).T` computed by NumPy on the host, up to summation order, for
                   sizes that are not multiples of a warp or a block of rows; nn.linear dispatches to it;
                   NaN and infinity propagate
    containers     to_device keeps the bits; the embedding lookup (take_rows) is exact on the GPU
    whole model    a bf16 checkpoint on the cupy backend with weights="bfloat16" | "int8" gives the numpy
                   backend's logits and greedy tokens with the same weights

Everything here needs cupy and a CUDA GPU (tools/gpu_check.sh runs it there); elsewhere it is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

from namespaces import CUPY_SKIP_REASON, cupy_available
from npvlm import fast_ops, nn
from npvlm.backends import packing

pytestmark = [pytest.mark.cupy, pytest.mark.skipif(not cupy_available(), reason=CUPY_SKIP_REASON)]
SUM_ORDER = 1e-5  # float32 dot products in another order (and with FMA): |diff| <= 1e-5 * sum_k |x_k w_k|


@pytest.fixture
def gpu():
    """cupy and the kernels module, the kernels registered for this test only."""
    import cupy

    from npvlm.backends import cupy_kernels

    saved = {name: dict(table) for name, table in fast_ops._TABLE.items()}
    cupy_kernels.register_cupy_kernels()
    yield cupy, cupy_kernels
    for name, table in fast_ops._TABLE.items():
        table.clear()
        table.update(saved.get(name, {}))


def _case(out_features, in_features, rows, seed=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features), dtype=np.float32)
    x = rng.standard_normal((rows, in_features), dtype=np.float32)
    return w, x, rng.standard_normal(out_features, dtype=np.float32)


def _assert_sum_order(y, x, w_float, bias=None):  # y host float32; the reference computed here by NumPy
    ref = x @ w_float.T + (0.0 if bias is None else bias)
    bound = SUM_ORDER * (np.abs(x) @ np.abs(w_float).T + (0.0 if bias is None else np.abs(bias))) + 1e-30
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert (np.abs(y - ref) <= bound).all(), float(np.max(np.abs(y - ref) / bound))


@pytest.mark.parametrize("pack", [packing.bf16_weight, packing.int8_weight], ids=["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 300])  # GEMV kernels (<= 8 rows) and the blocked cuBLAS prefill
@pytest.mark.parametrize("shape", [(37, 53), (1030, 515), (5, 2100), (9, 31)])  # rows % 8, in % 32 != 0; in < 32
def test_gpu_packed_linear_equals_the_numpy_reference(gpu, pack, rows, shape):
    cupy, ck = gpu
    w, x, bias = _case(*shape, rows)
    host = pack(w)
    dev = ck.to_device(host)
    for b in (None, bias):
        y = ck.packed_linear(cupy.asarray(x), dev, None if b is None else cupy.asarray(b))
        _assert_sum_order(cupy.asnumpy(y), x, host.widen(), b)


def test_gpu_prefill_many_blocks(gpu, monkeypatch):
    cupy, ck = gpu
    monkeypatch.setattr(ck, "BLOCK_BYTES", 4 * 70 * 8)  # 8 rows per cuBLAS call: 38 blocks
    w, x, _ = _case(301, 70, 40)
    for host in (packing.bf16_weight(w), packing.int8_weight(w)):
        _assert_sum_order(cupy.asnumpy(ck.packed_linear(cupy.asarray(x), ck.to_device(host))), x, host.widen())


def test_nn_linear_dispatches_to_the_gpu_kernel_and_the_reference_agrees(gpu):
    cupy, ck = gpu
    w, x, bias = _case(70, 33, 6)
    x3 = cupy.asarray(x.reshape(2, 3, 33))  # [B, T, in]
    for host in (packing.bf16_weight(w), packing.int8_weight(w)):
        dev = ck.to_device(host)
        assert fast_ops.replacement("linear", type(dev)) is ck.packed_linear
        fast = nn.linear(x3, weight=dev, bias=cupy.asarray(bias))  # by keyword, as the model calls it
        assert fast.shape == (2, 3, 70) and fast.dtype == cupy.float32
        with fast_ops.reference_only():  # widen whole on the GPU, then x @ W.T
            slow = nn.linear(x3, weight=dev, bias=cupy.asarray(bias))
        np.testing.assert_array_equal(cupy.asnumpy(dev.widen()), host.widen())  # widening on the GPU is exact
        _assert_sum_order(cupy.asnumpy(fast).reshape(6, 70), x, host.widen(), bias)
        _assert_sum_order(cupy.asnumpy(slow).reshape(6, 70), x, host.widen(), bias)


def test_gpu_kernels_propagate_nan_and_inf(gpu):
    cupy, ck = gpu
    w, x, _ = _case(12, 16, 1)
    x[0, 3] = np.nan
    for host in (packing.bf16_weight(w), packing.int8_weight(w)):
        assert np.isnan(cupy.asnumpy(ck.packed_linear(cupy.asarray(x), ck.to_device(host)))).all()
    w[5, :] = np.inf
    y = cupy.asnumpy(ck.packed_linear(cupy.ones((1, 16), dtype=cupy.float32), ck.to_device(packing.bf16_weight(w))))
    assert np.isposinf(y[0, 5]) and np.isfinite(np.delete(y[0], 5)).all()


def test_gpu_embedding_rows_are_widened_exactly(gpu):
    cupy, ck = gpu
    w, _, _ = _case(500, 40, 1)
    ids = np.array([0, 7, 7, 499, 3])
    for host in (packing.bf16_weight(w), packing.int8_weight(w)):
        got = cupy.asnumpy(ck.to_device(host).take_rows(cupy.asarray(ids)))
        np.testing.assert_array_equal(got, host.take_rows(ids))  # the same widening, row by row: exact


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_a_bf16_checkpoint_on_the_gpu_gives_the_numpy_backends_logits_and_tokens(tmp_path, weights):
    import npvlm
    from hf_ref import image, write

    ckpt = write(tmp_path, seed=3, dtype="bfloat16", hidden=20, heads=4, kv_heads=2, head_dim=12, layers=3,
                 image_size=32, patch_size=8)
    cpu, dev = npvlm.load(ckpt, weights=weights), npvlm.load(ckpt, backend="cupy", weights=weights)
    table = dev.params["language_model"]["model"]["embed_tokens"]["weight"]
    assert type(table).__name__ == ("GpuBf16Weight" if weights == "bfloat16" else "GpuInt8Weight")
    ref, got = cpu.logits(image(0), "caption en"), dev.logits(image(0), "caption en")
    assert np.abs(got - ref).max() < 1e-4  # the same packed weights on both: summation order only
    want = cpu.generate(image(1), "caption en", max_new_tokens=8).token_ids
    assert dev.generate(image(1), "caption en", max_new_tokens=8).token_ids == want
