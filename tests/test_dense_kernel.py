"""numba's float32 decode loop (backends/numba_kernels.dense_linear) against the reference `x @ W.T`.

    kernel      equals float32 `x @ W.T` up to summation order (and FMA rounding) for 1-8 rows of x,
                sizes that are no multiple of anything, with and without bias, [B, T, in] inputs
    fallback    prefill rows, other dtypes, strided weights and bad shapes go to the reference
                unchanged (bit for bit, or its ShapeError)
    load        a float32 model of DENSE_KERNEL_BYTES or more registers it where the loop out-reads BLAS on
                this CPU (measured once), a smaller one never (numba's import is not paid for a model that
                decodes from cache); with it, the decode steps run through the loop and greedy tokens equal
                HF's, and they run with one BLAS thread (the loop's threads stream the weights)
"""

from __future__ import annotations

import numpy as np
import pytest

import npvlm
from hf_ref import hf_generate, image, write
from npvlm import fast_ops, nn
from npvlm.backends import numba_kernels, numpy_backend
from npvlm.errors import ShapeError

pytestmark = pytest.mark.skipif(not numba_kernels.HAVE_NUMBA, reason="numba not installed (the optional npvlm[fast] extra)")
SUM_ORDER = 1e-5  # another summation order and FMA rounding: |diff| <= 1e-5 * sum_k |x_k w_k|
MIN_MARGIN = 1e-3  # as tests/test_generate.py: greedy tokens compared where the top-2 gap is far above float32 noise


def _case(n_out, n_in, rows, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_out, n_in), dtype=np.float32), rng.standard_normal((rows, n_in), dtype=np.float32),
            rng.standard_normal(n_out, dtype=np.float32))


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("shape", [(37, 53), (1030, 515), (3, 2100)])
def test_dense_linear_equals_float32_matmul(rows, shape):
    w, x, bias = _case(*shape, rows)
    for b in (None, bias):
        y = numba_kernels.dense_linear(x, w, b)
        ref = x @ w.T + (0.0 if b is None else b)
        bound = SUM_ORDER * (np.abs(x) @ np.abs(w).T + (0.0 if b is None else np.abs(b))) + 1e-30
        assert y.dtype == np.float32 and y.shape == ref.shape
        assert (np.abs(y - ref) <= bound).all(), float(np.max(np.abs(y - ref) / bound))


def test_dense_linear_keeps_leading_axes_and_memmapped_weights(tmp_path):
    w, x, bias = _case(40, 24, 6)
    path = tmp_path / "w.bin"
    w.tofile(path)
    wm = np.memmap(path, dtype=np.float32, mode="r", shape=w.shape)  # how a mapped checkpoint's weight arrives
    y = numba_kernels.dense_linear(x.reshape(2, 3, 24), wm, bias)
    assert y.shape == (2, 3, 40)
    np.testing.assert_allclose(y.reshape(6, 40), x @ w.T + bias, rtol=1e-5, atol=1e-5)  # summation order only


def test_dense_linear_leaves_everything_else_to_the_reference():
    w, x, bias = _case(30, 16, 9)
    ref = nn.linear.reference
    np.testing.assert_array_equal(numba_kernels.dense_linear(x, w, bias), ref(x, w, bias))  # 9 rows: prefill, BLAS
    wf = np.asfortranarray(w)  # strided rows: not the loop's layout
    np.testing.assert_array_equal(numba_kernels.dense_linear(x[:2], wf), ref(x[:2], wf))
    x64 = x[:2].astype(np.float64)
    assert numba_kernels.dense_linear(x64, w).dtype == ref(x64, w).dtype  # another dtype: the reference's promotion
    with pytest.raises(ShapeError):
        numba_kernels.dense_linear(x[:1, :15], w)  # wrong width: the reference's one-line error
    with pytest.raises(ShapeError):
        numba_kernels.dense_linear(x[:1], w, bias[:4])


def test_dense_linear_propagates_nan_and_inf():
    w, x, _ = _case(12, 16, 1)
    x[0, 3] = np.nan
    assert np.isnan(numba_kernels.dense_linear(x, w)).all()  # no fastmath nnan: NaN reaches every output
    w[5, :] = np.inf
    y = numba_kernels.dense_linear(np.ones((1, 16), dtype=np.float32), w)
    assert np.isposinf(y[0, 5]) and np.isfinite(np.delete(y[0], 5)).all()


def test_only_a_model_past_the_threshold_registers_the_loop(tmp_path, restore_table, monkeypatch):
    ckpt = write(tmp_path, seed=21, hidden=32, heads=4, kv_heads=1, head_dim=8, layers=2)
    for t in (np.ndarray, np.memmap):
        fast_ops._TABLE.get("linear", {}).pop(t, None)
    npvlm.load(ckpt)  # a few hundred KiB: BLAS from cache, numba not needed
    assert fast_ops.replacement("linear", np.ndarray) is None
    monkeypatch.setattr(numpy_backend, "DENSE_KERNEL_BYTES", 0)  # as if it were a DRAM-sized model
    monkeypatch.setattr(numba_kernels, "_DENSE_WINS", True)  # on a CPU where the loop out-reads BLAS
    model = npvlm.load(ckpt)
    assert fast_ops.replacement("linear", np.ndarray) is numba_kernels.dense_linear
    assert fast_ops.replacement("linear", np.memmap) is numba_kernels.dense_linear
    calls = []
    kernel = numba_kernels._gemv_f32
    monkeypatch.setattr(numba_kernels, "_gemv_f32", lambda *a: calls.append(a[1].shape) or kernel(*a))
    hf, margin = hf_generate(ckpt, [image(1), image(2)], ["caption en", "detect cat"], max_new_tokens=10)
    assert margin > MIN_MARGIN, f"near-tie {margin:.1e}"
    got = model.generate([image(1), image(2)], ["caption en", "detect cat"], max_new_tokens=10)  # 2 rows a step
    assert [g.token_ids for g in got] == hf
    assert len(calls) >= 9 * 2 * 4  # the decode steps ran through the loop: 9+ steps x 2 layers x 4+ Linears

def test_where_blas_reads_faster_a_large_model_keeps_blas(tmp_path, restore_table, monkeypatch):
    ckpt = write(tmp_path, seed=21, hidden=32, heads=4, kv_heads=1, head_dim=8, layers=2)
    for t in (np.ndarray, np.memmap):
        fast_ops._TABLE.get("linear", {}).pop(t, None)
    monkeypatch.setattr(numpy_backend, "DENSE_KERNEL_BYTES", 0)
    monkeypatch.setattr(numba_kernels, "_DENSE_WINS", False)  # a CPU where BLAS's sgemv streams faster
    npvlm.load(ckpt)
    assert fast_ops.replacement("linear", np.ndarray) is None


def test_the_calibration_measures_once_and_picks_blas_over_a_slower_loop(monkeypatch):
    """A loop made 20 ms slower a matrix than anything BLAS takes on 2 MiB loses; the answer is measured once."""
    import time

    monkeypatch.setattr(numba_kernels, "_DENSE_WINS", None)
    calls = []
    kernel = numba_kernels._gemv_f32
    monkeypatch.setattr(numba_kernels, "_gemv_f32",
                        lambda *a: calls.append(a[1].shape) or time.sleep(0.02) or kernel(*a))
    mats = [np.full((128, 4096), 0.5, dtype=np.float32) for _ in range(2)]  # 2 MiB each
    assert numba_kernels.dense_beats_blas(mats, rounds=2) is False
    assert len(calls) == 3 * 2  # warm-up + 2 rounds, over both matrices
    assert numba_kernels.dense_beats_blas(mats, rounds=2) is False and len(calls) == 6  # cached: not re-measured


def test_the_calibration_times_the_models_own_decode_weights(tmp_path, restore_table, monkeypatch):
    """Two fixed 32 MiB matrices fit a 480 MiB L3 in some runs and not others (the choice flipped from process to
    process there), so a large float32 model is timed on what its decode steps read: every 2-D float32 weight of
    the text decoder, the tied head included, and nothing of the vision tower (read once, in prefill)."""
    ckpt = write(tmp_path, seed=21, hidden=32, heads=4, kv_heads=1, head_dim=8, layers=2)
    monkeypatch.setattr(numpy_backend, "DENSE_KERNEL_BYTES", 0)
    monkeypatch.setattr(numba_kernels, "_DENSE_WINS", None)
    seen = []
    real = numba_kernels.dense_beats_blas
    monkeypatch.setattr(numba_kernels, "dense_beats_blas", lambda mats, **kw: seen.append(mats) or real(mats, **kw))
    model = npvlm.load(ckpt)
    lm = model.params["language_model"]["model"]
    want = [lm["embed_tokens"]["weight"]] + [w["weight"] for layer in lm["layers"]
                                              for block in (layer["self_attn"], layer["mlp"]) for w in block.values()]
    assert len(seen) == 1 and sorted(id(w) for w in seen[0]) == sorted(id(w) for w in want)
    assert numba_kernels._DENSE_WINS in (True, False)  # measured on them, once
    few = numpy_backend._decode_matrices({f"language_model.w{i}": np.zeros((4, 256), np.float32) for i in range(9)},
                                         limit=3 * 4096)
    assert len(few) == 3  # until `limit` bytes are reached (1 GiB by default: 0.57 s at load on `mid`)
    assert seen[0][-1] is lm["embed_tokens"]["weight"]  # the tied head last
    head_first = {"language_model.model.embed_tokens.weight": np.zeros((64, 256), np.float32),
                  **{f"language_model.model.layers.{i}.mlp.w": np.zeros((4, 256), np.float32) for i in range(4)}}
    picked = numpy_backend._decode_matrices(head_first, limit=3 * 4096)
    assert [w.shape for w in picked] == [(4, 256)] * 3  # the layers fill the budget; 3B's 2 GiB head would take it all


def test_decode_steps_run_on_one_blas_thread_beside_the_kernels(tmp_path, restore_table, monkeypatch):
    """OpenBLAS's idle threads spin after each call on the cores numba's kernels stream the weights with (3B int8
    here: 248 against 137 ms a token), so with the kernels registered a decode step gets one BLAS thread;
    prefill, whose GEMMs need them all, keeps every thread, and so does the caller afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from npvlm.generation import generate as gen

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    ckpt = write(tmp_path, seed=21, hidden=32, heads=4, kv_heads=1, head_dim=8, layers=2)
    model = npvlm.load(ckpt, weights="bfloat16")  # packed weights: numba's kernels registered
    seen = {"prefill": [], "decode": []}
    for name, key in (("prefill", "prefill"), ("decode_step", "decode")):
        fn = getattr(gen, name)
        monkeypatch.setattr(gen, name, lambda *a, _fn=fn, _k=key, **k: seen[_k].append(blas_threads()) or _fn(*a, **k))
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        model.generate(image(1), "caption en", max_new_tokens=6)
        after = blas_threads()
    assert before and all(n == 2 for n in before), f"this test needs a 2-thread BLAS, got {before}"
    assert seen["prefill"] == [before]
    assert len(seen["decode"]) >= 1 and all(t == [1] * len(before) for t in seen["decode"]), seen["decode"]
    assert after == before
