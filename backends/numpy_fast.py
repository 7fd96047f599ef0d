"""Lean float32 NumPy versions of nn's elementwise and row ops, registered for numpy.ndarray.

nn's reference ops are written once for every array-API namespace, so each step makes a fresh
full-size temporary (gelu_tanh makes eight) and each one round-trips to DRAM when the array is
larger than the cache. These do the same arithmetic in the same order, a block of rows at a time
(BLOCK_FLOATS per block, so the temporaries stay in L2/L3) with in-place ufuncs (`out=`), and never
write into their inputs. Anything that is not a C-contiguous float32 array (or a softmax over an
axis other than the last) goes to the reference unchanged.

    gelu_tanh   bit-identical to the reference (same ufuncs, same order; 0.5 * x is exact)
    softmax     bit-identical (same max, exp, sum and division per row)
    rms_norm    bit-identical: the squares into a block buffer, then np.mean's pairwise sum per row, as
    layer_norm  the reference (a row dot by np.einsum, tried first, summed in another order: on an AVX2
                EPYC that moved a bf16 test model's logits 3e-5 further from HF's, past the 1e-4 bar)

register_numpy_fast_ops() puts them behind `nn.<op>` through the fast-op seam (npvlm.fast_ops).
"""

from __future__ import annotations

import math

import numpy as np

from .. import fast_ops, nn

BLOCK_FLOATS = 1 << 17  # 128 Ki floats (512 KiB) per block: block + temporary ~ L2 (1 MiB/core here); smaller
#                        blocks lose more to per-call overhead than they gain (softmax's short rows most)
_C = math.sqrt(2.0 / math.pi)


def _lean(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim >= 1 and x.size > 0


def _row_blocks(rows: int, width: int):
    step = max(1, BLOCK_FLOATS // max(1, width))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def gelu_tanh(x):  # [...] -> [...] float32, as nn.gelu_tanh: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3)))
    if not _lean(x):
        return nn.gelu_tanh.reference(x)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    t = np.empty(min(BLOCK_FLOATS, flat.size), dtype=np.float32)
    for a in range(0, flat.size, BLOCK_FLOATS):
        xb, ob = flat[a:a + BLOCK_FLOATS], out[a:a + BLOCK_FLOATS]
        tb = t[: xb.size]
        np.multiply(xb, xb, out=tb)
        tb *= xb  # x^3, as (x * x) * x
        tb *= 0.044715
        tb += xb
        tb *= _C
        np.tanh(tb, out=tb)
        tb += 1.0
        np.multiply(xb, 0.5, out=ob)  # 0.5 * x first, as the reference
        ob *= tb
    return out.reshape(x.shape)


def softmax(x, axis=-1):  # [...] -> [...] float32, max-subtracted, over the last axis
    if not _lean(x) or axis not in (-1, x.ndim - 1):
        return nn.softmax.reference(x, axis=axis)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    for a, b in _row_blocks(*rows.shape):
        ob = out[a:b]
        np.subtract(rows[a:b], rows[a:b].max(axis=-1, keepdims=True), out=ob)
        np.exp(ob, out=ob)
        ob /= ob.sum(axis=-1, keepdims=True)
    return out.reshape(x.shape)


def rms_norm(x, weight, eps=1e-6):  # [..., D], [D] -> [..., D]: x / sqrt(mean(x^2) + eps) * (1 + w)
    if not (_lean(x) and isinstance(weight, np.ndarray) and weight.shape == x.shape[-1:]):
        return nn.rms_norm.reference(x, weight, eps)
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    out = np.empty_like(rows)
    scale = 1.0 + weight.astype(np.float32)  # [D]
    for a, b in _row_blocks(*rows.shape):
        xb, ob = rows[a:b], out[a:b]
        np.multiply(xb, xb, out=ob)  # squares, in the output block for now
        ms = ob.mean(axis=-1, keepdims=True)  # [rows, 1] mean of squares: np.mean's pairwise sum, as the reference
        np.divide(xb, np.sqrt(ms + eps), out=ob)
        ob *= scale
    return out.reshape(x.shape)


def layer_norm(x, weight, bias, eps=1e-6):  # [..., D], [D], [D] -> [..., D]: (x - mu) / sqrt(var + eps) * w + b
    if not (_lean(x) and isinstance(weight, np.ndarray) and isinstance(bias, np.ndarray)
            and weight.shape == x.shape[-1:] and bias.shape == x.shape[-1:]
            and weight.dtype == np.float32 and bias.dtype == np.float32):
        return nn.layer_norm.reference(x, weight, bias, eps)
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    out = np.empty_like(rows)
    blocks = _row_blocks(*rows.shape)
    t = np.empty((blocks[0][1], D), dtype=np.float32)  # squares of one block (the first is the largest)
    for a, b in blocks:
        xb, ob, tb = rows[a:b], out[a:b], t[: b - a]
        np.subtract(xb, xb.mean(axis=-1, keepdims=True), out=ob)  # centred
        np.multiply(ob, ob, out=tb)
        var = tb.mean(axis=-1, keepdims=True)  # [rows, 1] biased variance: np.mean's pairwise sum, as the reference
        ob /= np.sqrt(var + eps)
        ob *= weight
        ob += bias
    return out.reshape(x.shape)


def top_candidates(z, k):  # [B, V] float, k -> [B, k] int64: generation/sampling.py top_candidates, no full sort
    """np.argpartition finds the k-th largest value t; the candidates are every entry above t and the
    lowest-index entries equal to t, sorted by (value descending, index): the stable sort's first k ids."""
    if not (isinstance(z, np.ndarray) and z.ndim == 2 and 1 <= k < z.shape[1]) or np.isnan(z).any():
        from npvlm.generation.sampling import top_candidates as op

        return op.reference(z, k)
    B, V = z.shape
    out = np.empty((B, k), dtype=np.int64)
    for b in range(B):
        neg = -z[b]  # ascending in -z = descending in z; -0.0 == 0.0 as in the sort
        t = neg[np.argpartition(neg, k - 1)[k - 1]]  # the k-th smallest of -z
        above = np.flatnonzero(neg < t)
        ties = np.flatnonzero(neg == t)[: k - above.size]
        cand = np.concatenate([above, ties])
        out[b] = cand[np.lexsort((cand, neg[cand]))]  # by value, then by index
    return out


LEAN_OPS = {"top_candidates": top_candidates, "gelu_tanh": gelu_tanh, "softmax": softmax, "rms_norm": rms_norm, "layer_norm": layer_norm}


def register_numpy_fast_ops(names=None) -> list:
    """Register the lean ops (all, or those in `names`) for numpy.ndarray; returns the names registered."""
    chosen = list(LEAN_OPS) if names is None else list(names)
    for name in chosen:
        fast_ops.register(name, np.ndarray, LEAN_OPS[name])
    return chosen
