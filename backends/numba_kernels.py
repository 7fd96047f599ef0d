"""Fused widen-and-multiply kernels for packed (bf16 / int8) Linear weights, in numba.

A decode step multiplies a few activation rows by every weight, so its speed is the rate at which
weights stream from memory: bf16 halves the bytes of float32, int8 quarters them, provided the
widening happens in registers on the way to the multiply-add and the float32 copy never exists.

    packed_linear(x, weight, bias)   x [..., in] float32, weight Bf16Weight | Int8Weight [out, in]
        M = rows of x <= DECODE_ROWS   _gemv_*: one pass over the weight; threads share out the output
                                        rows (prange), each a plain dot product whose loop widens in
                                        registers (bf16: (uint32(bits) << 16) bit-cast to float32;
                                        int8: int -> float) and which LLVM vectorises (AVX2/AVX-512).
                                        One row at a time, not several: widening 4 or 8 rows in one loop
                                        ran 2-3x slower on an AVX2 EPYC, and on an AVX-512 Xeon gained
                                        0-6 % on 3B but lost 11-20 % on `mid` (see DENSE_ROWS).
                                        int8 takes a row in 512-byte segments, each asking the memory for
                                        the bytes 2 KiB ahead (SEGMENT_BYTES, PREFETCH_BYTES)
        M larger (prefill)             widen a block of rows (BLOCK_BYTES) into one reused
                                        float32 buffer and let BLAS (numpy matmul) multiply it, block
                                        after block: never a whole float32 copy of the weight
    dense_linear(x, w, bias)        the same one-pass loop for float32 weights in decode (nothing to widen),
                                        eight rows side by side (DENSE_ROWS), used where dense_beats_blas() measures it streaming the model's
                                        decode weights faster than the BLAS's sgemv (it depends on the CPU)
    register_numba_kernels(dense)   makes packed_linear the `linear` of both containers (fast_ops), and with
                                        dense=True dense_linear that of float32 numpy arrays

Numerics: float32 accumulation throughout. The decode kernels are compiled with
fastmath={"reassoc", "contract"} and nothing else: reassociation is what lets LLVM split a dot
product's sum into vector lanes (without it the loop stays scalar and reads at a quarter of the
bandwidth), contraction fuses each multiply and add into one FMA (one rounding instead of two, as
BLAS does; 1.5x faster here). They change the summation order and rounding only, so results equal
float32 `x @ widen(W).T` to ~1e-6 relative. No nnan/ninf/afn: NaN and infinity propagate as in NumPy.
int8 sums q * x per row, then multiplies once by the row's scale (the dequantized reference
rounds q * scale first: the two differ by float32 rounding only).

numba is optional (`npvlm[fast]`): without it `register_numba_kernels()` returns False and
`nn.linear` widens packed weights whole (same numbers, slower).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from npvlm import fast_ops
from npvlm.packed import Bf16Weight, Int8Weight

try:
    import numba
    from llvmlite import binding as llvm, ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # numba is the optional `fast` extra
    HAVE_NUMBA = False

DECODE_ROWS = 8  # at most this many activation rows take the one-pass kernel; more go to BLAS
ROWS = 512  # prefill blocks hold at least this many weight rows (32 MiB for 3B's 16384-wide rows; `mid`'s fit in
#            BLOCK_BYTES, so its buffer, counted in its peak RSS, stays 16 MiB)
CHUNK = 64  # weight rows a thread takes at a time: a preempted thread (shared CPUs) holds up little
DENSE_ROWS = 8  # float32 decode reads this many weight rows side by side (_gemv_f32). Their eight streams keep more
#                 lines in flight than one: over the 3B shapes' 10 GB of mapped float32 (2 threads, a Xeon with a
#                 480 MiB L3, median GB/s) 1 row a pass 23.3, 2 26.7, 4 28.0, 8 28.3, OpenBLAS's sgemv 25.8; over
#                 `mid`'s 1 GB 22.1 / 25.5 / 27.3 / 28.1 against 24.1
BF16_ROWS4_FROM_K = 2048  # bf16 decode reads four rows side by side where rows hold this many weights or more (a 4 KiB
#                          page), one row where shorter. Measured over mapped bf16 files (2 threads, ms a pass,
#                          one row / four): the 3B shapes' 5 GB 255 / 215 (every shape faster; 207 / 199 with the file
#                          freshly written, its page cache in large folios), `mid` [1024, 8192] 0.77 / 0.65, but
#                          `mid`'s 1024-wide rows 0.82 / 0.90 ([8192, 1024]) and 3.70 / 3.81 (the head). int8 keeps
#                          one row: four lost 40 % on 3B's 2048-wide rows (its prefetching segments do better)
BLOCK_BYTES = 1 << 24  # float32 bytes of widened weight per BLAS block in prefill: 16 MiB, and at least ROWS rows.
#                      Each BLAS call re-packs all of x, so blocks must hold many rows: 2 MiB blocks were 3-4x slower
#                      at M = 300, and at M = 270 a 3B down projection [2048, 16384] took 1.30x float32 BLAS's time in
#                      16 MiB blocks (256 rows), 1.11x in 32 MiB (512), 1.10x in 64 MiB (the rest is the widening)
SEGMENT_BYTES = 512  # int8 decode multiplies a row in segments of this many weights (bytes), and before each
PREFETCH_BYTES = 2048  # asks for the bytes this far ahead (llvm.prefetch). Its loop eats a cache line per 64
#                       weights, too slowly for the hardware prefetcher to keep enough lines in flight: on a 2-core
#                       Xeon (480 MiB L3) it streamed 7 GB/s a core from DRAM against 16 for float32. There, over
#                       1.5 GiB of weights on 2 threads (GB/s, before -> after): 8192 x 1024 14 -> 20,
#                       16384 x 2048 20 -> 22, 2048 x 16384 14 -> 21; 3B shapes decode 155 -> 131 ms a token
#                       (`tools/bench.py ab --preset 3b --dtype bfloat16 --weights int8`). Whole rows asked for at once
#                       did less on long rows (a 16 KiB burst), so did 1 KiB segments or asks 4 KiB ahead. The same
#                       for bf16 gained on anonymous copies but lost 10 % on 3B's memory-mapped file, and float32's
#                       loop already reads at BLAS's rate: both do without
_REDUCE = {"reassoc", "contract"}  # vector-lane sums and fused multiply-add only; see the module docstring

if HAVE_NUMBA:
    # the intrinsic is named after its pointer type: `ptr` since LLVM 15 (opaque pointers), `i8*` before
    _PREFETCH_NAME = "llvm.prefetch.p0" if llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @intrinsic
    def _u32_as_f32(typingctx, v):  # reinterpret a uint32 as float32 (LLVM bitcast, no conversion)
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _prefetch(typingctx, address):  # ask the cache for the line at `address` (an integer): a hint, never a fault
        def codegen(context, builder, signature, args):
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                _PREFETCH_NAME)
            builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])  # read, keep in every level, data
            return context.get_dummy_value()

        return types.void(types.uintp), codegen

    @njit(inline="always")
    def _bf16(b):  # uint16 bfloat16 bits -> float32, exact: they are a float32's top half
        return _u32_as_f32(np.uint32(b) << np.uint32(16))

    @njit(inline="always")
    def _prefetch_lines(address, nbytes):  # every 64-byte line of [address, address + nbytes)
        for line in range(0, nbytes, 64):
            _prefetch(numba.uintp(address + line))

    @njit(inline="always")
    def _dot_bf16(xm, wn):  # [K] f32, [K] u16 -> sum_k xm[k] * widen(wn[k]), inlined (and vectorised) in its kernel
        s = np.float32(0.0)
        for k in range(xm.shape[0]):  # vectorised: 16 widenings and one FMA per zmm register
            s += xm[k] * _bf16(wn[k])
        return s

    @njit(inline="always")
    def _dot_f32(xm, wn):  # [K] f32, [K] f32 -> sum_k xm[k] * wn[k], inlined (and vectorised) in its kernel
        s = np.float32(0.0)
        for k in range(xm.shape[0]):
            s += xm[k] * wn[k]
        return s

    @njit(parallel=True, cache=True, fastmath=_REDUCE)
    def _gemv_bf16(x, bits, out):  # [M, K] f32, [N, K] u16 -> out [M, N] f32
        for n in prange(bits.shape[0]):  # one output row per iteration: its K weights stream once
            for m in range(x.shape[0]):  # rows of x: the weight row (2K bytes) stays in L1 between them
                out[m, n] = _dot_bf16(x[m], bits[n])

    @njit(parallel=True, cache=True, fastmath=_REDUCE)
    def _gemv_bf16_rows4(x, bits, out):  # as _gemv_bf16, four rows side by side (rows of BF16_ROWS4_FROM_K or more)
        M, K = x.shape
        N = bits.shape[0]
        for p in prange((N + 3) // 4):  # four output rows per iteration: four streams through memory at once
            n = 4 * p
            if n + 4 <= N:
                w0, w1, w2, w3 = bits[n], bits[n + 1], bits[n + 2], bits[n + 3]
                for m in range(M):
                    xm = x[m]
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for k in range(K):
                        xk = xm[k]
                        s0 += xk * _bf16(w0[k])
                        s1 += xk * _bf16(w1[k])
                        s2 += xk * _bf16(w2[k])
                        s3 += xk * _bf16(w3[k])
                    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = s0, s1, s2, s3
            else:  # the last N % 4 rows, one at a time
                for r in range(n, N):
                    for m in range(M):
                        out[m, r] = _dot_bf16(x[m], bits[r])

    @njit(parallel=True, cache=True, fastmath=_REDUCE)
    def _gemv_int8(x, q, scale, out):  # [M, K] f32, [N, K] i8, [N] f32 -> out [M, N] f32
        M, K = x.shape
        ahead = q.ctypes.data + PREFETCH_BYTES  # q is C-contiguous: rows follow each other
        for n in prange(q.shape[0]):
            qn, sn = q[n], scale[n]
            for m in range(M):
                out[m, n] = 0.0
            for k0 in range(0, K, SEGMENT_BYTES):  # a row in segments, each asking for the bytes PREFETCH_BYTES on
                k1 = min(k0 + SEGMENT_BYTES, K)
                _prefetch_lines(ahead + n * K + k0, k1 - k0)
                for m in range(M):  # rows of x: the segment stays in L1 between them
                    xs, qs = x[m, k0:k1], qn[k0:k1]  # slices: indices from 0, so LLVM sees a plain loop
                    s = np.float32(0.0)
                    for k in range(k1 - k0):  # int8 -> int32 -> float32 in registers, then FMA
                        s += xs[k] * np.float32(qs[k])
                    out[m, n] += s
            for m in range(M):
                out[m, n] *= sn

    @njit(parallel=True, cache=True, fastmath=_REDUCE)
    def _gemv_f32(x, w, out):  # [M, K] f32, [N, K] f32 -> out [M, N] f32: DENSE_ROWS (8) rows a pass, nothing to widen
        M, K = x.shape
        N = w.shape[0]
        for p in prange((N + 7) // 8):  # eight output rows per iteration, read side by side: eight streams in flight
            n = 8 * p
            if n + 8 <= N:
                w0, w1, w2, w3, w4, w5, w6, w7 = w[n], w[n + 1], w[n + 2], w[n + 3], w[n + 4], w[n + 5], w[n + 6], w[n + 7]
                for m in range(M):
                    xm = x[m]
                    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
                    for k in range(K):  # vectorised: one x load, eight FMAs per 16 columns
                        xk = xm[k]
                        s0 += xk * w0[k]
                        s1 += xk * w1[k]
                        s2 += xk * w2[k]
                        s3 += xk * w3[k]
                        s4 += xk * w4[k]
                        s5 += xk * w5[k]
                        s6 += xk * w6[k]
                        s7 += xk * w7[k]
                    out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = s0, s1, s2, s3
                    out[m, n + 4], out[m, n + 5], out[m, n + 6], out[m, n + 7] = s4, s5, s6, s7
            else:  # the last N % 8 rows, one at a time
                for r in range(n, N):
                    for m in range(M):
                        out[m, r] = _dot_f32(x[m], w[r])

    @njit(parallel=True, cache=True)
    def _widen_bf16_rows(bits, a, b, buf):  # bits[a:b] -> buf[:b-a] float32, exact
        for r in prange(b - a):
            src, dst = bits[a + r], buf[r]
            for k in range(src.shape[0]):
                dst[k] = _bf16(src[k])

    @njit(parallel=True, cache=True)
    def _widen_int8_rows(q, scale, a, b, buf):  # q[a:b] * scale[a:b, None] -> buf[:b-a], as Int8Weight.widen
        for r in prange(b - a):
            src, dst, s = q[a + r], buf[r], scale[a + r]
            for k in range(src.shape[0]):
                dst[k] = np.float32(src[k]) * s


_BUFFERS = threading.local()  # each thread's widening buffer, kept between calls


def _widening_buffer(floats: int) -> np.ndarray:
    """`floats` float32s of this thread's widening buffer (BLOCK_BYTES, more for a longer block), kept from call to
    call: a fresh 16 MiB array a weight had the kernel fault in and zero every page again (a `mid` bf16 prefill's
    widening took 91 ms that way, 44 ms with this)."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or buf.size < floats:
        buf = _BUFFERS.buf = np.empty(max(floats, BLOCK_BYTES // 4), dtype=np.float32)
    return buf[:floats]


def _prefill(x2, weight, out):  # [M, K] f32, packed [N, K] -> out [M, N]: BLAS on widened blocks
    N, K = weight.shape
    rows = max(ROWS, BLOCK_BYTES // (4 * max(1, K)))
    buf = _widening_buffer(min(rows, N) * K).reshape(min(rows, N), K)
    for a in range(0, N, rows):
        b = min(a + rows, N)
        if isinstance(weight, Bf16Weight):
            _widen_bf16_rows(weight.bits, a, b, buf)
        else:
            _widen_int8_rows(weight.q, weight.scale, a, b, buf)
        np.matmul(x2, buf[: b - a].T, out=out[:, a:b])


def packed_linear(x, weight, bias=None):  # [..., in], packed [out, in], [out] -> [..., out] float32
    """nn.linear for a Bf16Weight / Int8Weight: one fused pass for decode, blocked BLAS for prefill."""
    N, K = weight.shape
    if x.dtype != np.float32 or x.shape[-1] != K:  # not this kernel's case: the reference widens (and checks shapes)
        return _reference_linear(x, weight, bias)
    x2 = np.ascontiguousarray(x.reshape(-1, K))  # [M, K]
    out = np.empty((x2.shape[0], N), dtype=np.float32)  # [M, N]
    if x2.shape[0] <= DECODE_ROWS:
        four = isinstance(weight, Bf16Weight) and K >= BF16_ROWS4_FROM_K
        with numba.parallel_chunksize(CHUNK // 4 if four else CHUNK):  # dynamic hand-out of CHUNK rows, not halves
            if four:
                _gemv_bf16_rows4(x2, np.ascontiguousarray(weight.bits), out)
            elif isinstance(weight, Bf16Weight):
                _gemv_bf16(x2, np.ascontiguousarray(weight.bits), out)
            else:
                _gemv_int8(x2, np.ascontiguousarray(weight.q), weight.scale, out)
    else:
        _prefill(x2, weight, out)
    if bias is not None:
        if tuple(bias.shape) != (N,):
            return _reference_linear(x, weight, bias)  # let the reference raise its ShapeError
        out += bias
    return out.reshape(x.shape[:-1] + (N,))


def dense_linear(x, weight, bias=None):  # [..., in], float32 [out, in], [out] -> [..., out]
    """nn.linear for float32 weights in decode (<= DECODE_ROWS rows of x): the one-pass loop above.
    Measured here it streams a DRAM-sized weight faster than OpenBLAS's sgemv; anything else
    (prefill, other dtypes, strided weights) is the reference's `x @ W.T`."""
    K = x.shape[-1]
    if not (isinstance(weight, np.ndarray) and weight.dtype == np.float32 and x.dtype == np.float32
            and weight.ndim == 2 and weight.shape[1] == K and weight.flags.c_contiguous and weight.size
            and 0 < x.size <= DECODE_ROWS * K and (bias is None or tuple(bias.shape) == weight.shape[:1])):
        return _reference_linear(x, weight, bias)
    x2 = np.ascontiguousarray(x.reshape(-1, K))  # [M, K]
    out = np.empty((x2.shape[0], weight.shape[0]), dtype=np.float32)  # [M, N]
    with numba.parallel_chunksize(CHUNK // DENSE_ROWS):  # iterations of DENSE_ROWS rows each
        _gemv_f32(x2, weight, out)
    if bias is not None:
        out += bias
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


_DENSE_WINS: "bool | None" = None  # dense_beats_blas()'s answer, measured once a process


def dense_beats_blas(mats, rounds: int = 3, margin: float = 0.95) -> bool:
    """Whether dense_linear streams float32 weights faster than BLAS's GEMV on this machine: both read the same
    matrices, taking turns, best of `rounds`; the loop must take at most `margin` of BLAS's time (5 % ahead: a
    tie keeps BLAS; on 3B the eight-row loop reads the layers 8-9 % faster, so 0.9 was too strict). `mats`: the
    model's own decode weights (2-D float32, C-contiguous), so the measure reads what decode reads, from where
    decode reads it: DRAM, or an L3 that holds them. Which wins depends on
    the CPU: measured, the loop out-read OpenBLAS's sgemv on an AVX-512 Xeon (89.6 against 124 ms a token on
    `mid`) and lost on an AVX2 EPYC (46 against 35 ms). Two fixed 32 MiB matrices misled on a host with a 480 MiB
    L3: they stayed in the cache, where BLAS is faster, in some runs and not others, and the choice flipped from
    process to process. Measured once a process, so the choice never changes under a running model."""
    global _DENSE_WINS
    if _DENSE_WINS is None:
        xs = {w.shape[1]: np.ones((1, w.shape[1]), dtype=np.float32) for w in mats}
        outs = {w.shape[0]: np.empty((1, w.shape[0]), dtype=np.float32) for w in mats}
        ways = {"loop": lambda w: _gemv_f32(xs[w.shape[1]], w, outs[w.shape[0]]),
                "blas": lambda w: np.matmul(xs[w.shape[1]], w.T, out=outs[w.shape[0]])}
        best = {k: float("inf") for k in ways}
        with numba.parallel_chunksize(CHUNK // DENSE_ROWS):
            for r in range(rounds + 1):  # round 0 warms up (pages touched, the loop compiled or loaded)
                for k, way in ways.items():
                    t = time.perf_counter()
                    for w in mats:
                        way(w)
                    if r:
                        best[k] = min(best[k], time.perf_counter() - t)
        _DENSE_WINS = best["loop"] <= margin * best["blas"]
    return _DENSE_WINS


def _reference_linear(x, weight, bias):
    from npvlm.nn import linear

    return linear.reference(x, weight, bias)


def register_numba_kernels(dense: bool = False) -> bool:
    """Make packed_linear the `linear` of Bf16Weight and Int8Weight (and with `dense`, dense_linear that of
    float32 numpy arrays); False (nothing done) without numba."""
    if not HAVE_NUMBA:
        return False
    for container in (Bf16Weight, Int8Weight):
        fast_ops.register("linear", container, packed_linear)
    if dense:
        for array_type in (np.ndarray, np.memmap):
            fast_ops.register("linear", array_type, dense_linear)
    return True
