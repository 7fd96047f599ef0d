"""Fused widen-and-multiply for packed (bf16 / int8) Linear weights on a CUDA GPU, in CuPy.

The GPU twin of numba_kernels.py. A decode step is a matrix-vector product per weight, bound by the
rate weights stream from HBM: bf16 halves the bytes of float32, int8 quarters them, provided each
weight is widened in a register on its way to the multiply-add.

    packed_linear(x, weight, bias)   x [..., in] float32 (cupy), weight GpuBf16Weight | GpuInt8Weight
        M = rows of x <= DECODE_ROWS   gemv_bf16 / gemv_int8 (CUDA C below, compiled by NVRTC on first
                                        use): one warp per output row; its 32 lanes stride along the row
                                        (consecutive lanes read consecutive weights: whole 32-byte sectors),
                                        widen each weight and multiply it into the M accumulators, then the
                                        warp sums its lanes with shuffles (no shared memory, no block sync)
        M larger (prefill)             widen a block of rows (BLOCK_BYTES) into float32 and multiply with
                                        cuBLAS (cupy.matmul, float32 compute): never a whole float32 copy
    to_device(w)                    a host Bf16Weight / Int8Weight (npvlm/packed.py) -> its GPU container
    register_cupy_kernels()         makes packed_linear the `linear` of the GPU containers (fast_ops)

The GPU containers are subclasses of the host ones so that the fast-op seam (which looks up the exact
type) sends each to its own kernel; the reference path (`weight.widen()` in nn.linear) and the
embedding lookup (`take_rows`) work on them unchanged.

Numerics: float32 accumulation, summation order (and FMA contraction) differ from NumPy's, as cuBLAS's
do; int8 sums q * x per row, then multiplies once by the row's scale, as the numba kernel does.
"""

from __future__ import annotations

from npvlm import fast_ops
from npvlm.packed import Bf16Weight, Int8Weight

DECODE_ROWS = 8  # at most this many activation rows take the GEMV kernels (MAX_M in the CUDA source)
WARPS_PER_BLOCK = 8  # output rows per thread block (one warp each)
BLOCK_BYTES = 1 << 28  # float32 bytes of widened weight per cuBLAS call in prefill: 256 MiB

SOURCE = r"""
#define MAX_M 8

// out[m, n] = sum_k x[m, k] * w[n, k] for m < M: one warp per output row n, blockDim = (32, rows per block).
// bf16 bits are the top half of a float32: widening is a shift and a bit cast, exact.
extern "C" __global__ void gemv_bf16(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                     float* __restrict__ out, const int M, const int N, const int K) {
    const int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;  // n is the same for the whole warp: it leaves together
    const unsigned short* row = w + (long long)n * K;
    float acc[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.0f;
    for (int k = threadIdx.x; k < K; k += 32) {
        const float wk = __uint_as_float(((unsigned int)row[k]) << 16);
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
            if (m < M) acc[m] += x[(long long)m * K + k] * wk;
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {  // M is the same for every lane: the shuffles see the whole warp
            float v = acc[m];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (threadIdx.x == 0) out[(long long)m * N + n] = v;
        }
    }
}

// The same for int8 weights: out[m, n] = scale[n] * sum_k x[m, k] * q[n, k].
extern "C" __global__ void gemv_int8(const float* __restrict__ x, const signed char* __restrict__ q,
                                     const float* __restrict__ scale, float* __restrict__ out,
                                     const int M, const int N, const int K) {
    const int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    const signed char* row = q + (long long)n * K;
    float acc[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.0f;
    for (int k = threadIdx.x; k < K; k += 32) {
        const float wk = (float)row[k];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
            if (m < M) acc[m] += x[(long long)m * K + k] * wk;
    }
    const float s = scale[n];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {
            float v = acc[m];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (threadIdx.x == 0) out[(long long)m * N + n] = v * s;
        }
    }
}
"""

_MODULE = {}  # the compiled RawModule, made on first use (cupy imported only then)


def _kernel(name: str):
    import cupy

    if "module" not in _MODULE:
        _MODULE["module"] = cupy.RawModule(code=SOURCE, options=("--std=c++11",))
    return _MODULE["module"].get_function(name)


def widen_bf16(bits):  # cupy uint16 [...] -> float32 [...], exact
    import cupy

    return (bits.astype(cupy.uint32) << 16).view(cupy.float32)


class GpuBf16Weight(Bf16Weight):
    """Bf16Weight whose bits live on the GPU (cupy uint16 [out, in])."""


class GpuInt8Weight(Int8Weight):
    """Int8Weight whose q and scale live on the GPU (cupy int8 [out, in], float32 [out])."""


def to_device(w):
    """A host Bf16Weight / Int8Weight -> the same weight on the GPU (copied once; C-contiguous)."""
    import cupy

    if isinstance(w, Bf16Weight):
        return GpuBf16Weight(cupy.ascontiguousarray(cupy.asarray(w.bits)), widen_bf16)
    return GpuInt8Weight(cupy.ascontiguousarray(cupy.asarray(w.q)), cupy.ascontiguousarray(cupy.asarray(w.scale)))


def _widen_rows(weight, a: int, b: int):  # rows a:b of the weight -> float32 [b - a, in]
    if isinstance(weight, Bf16Weight):
        return widen_bf16(weight.bits[a:b])
    import cupy

    return weight.q[a:b].astype(cupy.float32) * weight.scale[a:b, None]


def packed_linear(x, weight, bias=None):  # [..., in], GPU packed [out, in], [out] -> [..., out] float32
    """nn.linear for GpuBf16Weight / GpuInt8Weight: the GEMV kernels for decode, blocked cuBLAS for prefill."""
    import cupy
    import numpy as np

    N, K = weight.shape
    if x.dtype != cupy.float32 or x.shape[-1] != K or (bias is not None and tuple(bias.shape) != (N,)):
        from npvlm.nn import linear  # not this kernel's case: the reference widens, checks and raises

        return linear.reference(x, weight, bias)
    x2 = cupy.ascontiguousarray(x.reshape(-1, K))  # [M, K]
    M = x2.shape[0]
    out = cupy.empty((M, N), dtype=cupy.float32)  # [M, N]
    if 0 < M <= DECODE_ROWS:
        grid, block = ((N + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,), (32, WARPS_PER_BLOCK)
        dims = (np.int32(M), np.int32(N), np.int32(K))
        if isinstance(weight, Bf16Weight):
            _kernel("gemv_bf16")(grid, block, (x2, weight.bits, out) + dims)
        else:
            _kernel("gemv_int8")(grid, block, (x2, weight.q, weight.scale, out) + dims)
    else:
        rows = max(1, BLOCK_BYTES // (4 * max(1, K)))
        for a in range(0, N, rows):
            b = min(a + rows, N)
            out[:, a:b] = x2 @ _widen_rows(weight, a, b).T
    if bias is not None:
        out += bias
    return out.reshape(x.shape[:-1] + (N,))


def register_cupy_kernels() -> None:
    """Make packed_linear the `linear` of the GPU containers."""
    for container in (GpuBf16Weight, GpuInt8Weight):
        fast_ops.register("linear", container, packed_linear)
