"""GELU (tanh form) in one parallel pass, in numba: prefill's largest elementwise cost.

A prefill applies GELU to [T, 4D]-sized activations in every MLP of both towers (270 x 16384 floats a
text layer at 3B). NumPy's lean version (numpy_fast.gelu_tanh) makes eight passes over each block on
one core; this is one pass on every core, with the tanh written through one exponential:

    0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)),   u = sqrt(2/pi) (x + 0.044715 x^3)

(1 + tanh(u) = 2 / (1 + exp(-2u))). numba without Intel's SVML calls libm's expf one element at a
time, so the exponential is written out: exp(y) = 2^n e^r with n = round(y / ln 2) and
r = y - n ln 2 (ln 2 in two parts, so r is exact), e^r by its Taylor polynomial to degree 7
(|r| <= ln 2 / 2: truncation error < 5e-9), 2^n put straight into a float32's exponent bits. LLVM
vectorises all of it.

Numerics: within 5e-7 of nn.gelu_tanh's reference (absolute, for |x| up to 30; the two round
differently, and where 1 + tanh(u) cancels the reference is the less exact one). Where the reference's
tanh saturates to -1 (u < -9) the output is x * 0, as the reference's: -0.0, and NaN for -inf. NaN and
+inf propagate as in the reference. Measured on a 2-core Xeon (2 threads): 270 x 16384 in 0.85 ms
against 5.7 ms for numpy_fast.gelu_tanh.

Only prefill-sized inputs (PARALLEL_MIN floats or more) take it. A decode step's GELU is a few thousand
floats, and waking numba's threads for it would leave them spinning on the cores BLAS's next call needs
(where BLAS does the decode's GEMVs: `mid` float32 decoded at 78 ms a token that way, 40 without).

register_numba_elementwise() puts it behind nn.gelu_tanh for numpy arrays, where the backend loads numba
for a model (backends/numpy_backend.py pack_weights); anything else goes to numpy_fast.gelu_tanh.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import fast_ops
from . import numpy_fast
from .numba_kernels import _u32_as_f32

PARALLEL_MIN = 1 << 18  # floats (1 MiB): a prefill's GELU at 16+ tokens; decode's, up to 8 rows of 16384, stay in NumPy
_C = np.float32(math.sqrt(2.0 / math.pi))
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2's first 16 bits: n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = np.float32(1.428606765330187e-06)  # the rest of ln 2
_Y_MAX = np.float32(88.0)  # exp(88) < float32's largest; 2^n stays a normal number for y in [-87, 88]
_Y_MIN = np.float32(-87.0)
_Y_SAT = np.float32(18.0)  # past u = -9, float32's tanh(u) is -1 exactly (1 - |tanh| < 2^-25): the reference's 1 + tanh is 0


@njit(inline="always", fastmath={"contract"})
def _exp(y):  # float32 e^y for y in [_Y_MIN, _Y_MAX]: 2^n e^r, e^r by Horner's rule
    n = np.floor(y * _LOG2E + np.float32(0.5))  # the nearest integer to y / ln 2
    r = (y - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln 2 / 2
    p = np.float32(1.0 / 5040)
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _u32_as_f32(np.uint32(np.int32(n) + 127) << np.uint32(23))  # times 2^n, built from its exponent bits


@njit(parallel=True, cache=True, fastmath={"contract"})
def _gelu_tanh(x, out):  # flat float32 [n] -> out [n]
    for i in prange(x.size):
        v = x[i]
        u = _C * (v + np.float32(0.044715) * (v * v * v))
        y = min(max(np.float32(-2.0) * u, _Y_MIN), _Y_MAX)  # NaN u: NaN y, and v (NaN) carries it through
        g = v / (np.float32(1.0) + _exp(y))
        out[i] = v * np.float32(0.0) if y > _Y_SAT else g  # the reference's tanh(u) = -1 exactly: 0.5 v * 0


def gelu_tanh(x):  # [...] -> [...] float32, as nn.gelu_tanh (to 5e-7): one parallel pass
    if not (numpy_fast._lean(x) and x.size >= PARALLEL_MIN):
        return numpy_fast.gelu_tanh(x)
    out = np.empty_like(x)
    _gelu_tanh(x.reshape(-1), out.reshape(-1))
    return out


def register_numba_elementwise() -> None:
    """Make gelu_tanh above nn.gelu_tanh's for numpy arrays (it replaces numpy_fast's there)."""
    fast_ops.register("gelu_tanh", np.ndarray, gelu_tanh)
