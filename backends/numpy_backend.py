"""NumPy on the CPU: the reference backend."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
from array_api_compat import array_namespace

from ..fast_ops import register, replacement
from ..packed import Bf16Weight
from .base import Backend
from .numpy_fast import register_numpy_fast_ops


def write_columns_inplace(cache, new, cols):  # [B, K, C, E], [B, K, 1, E], [B] -> cache, written in place
    """kv_cache.write_columns without the copy: NumPy can scatter one column per row in place."""
    cache[np.arange(cache.shape[0]), :, np.asarray(cols), :] = new[:, :, 0, :]
    return cache


register("write_columns", np.ndarray, write_columns_inplace)
register_numpy_fast_ops()  # gelu_tanh, softmax, rms_norm, layer_norm: blocked, in place (numpy_fast.py)


SPIN_ROUNDS = "30000"  # numba's idle threads spin this many rounds before they sleep: see numba_environment
CALIBRATION_BYTES = 1 << 30  # of the model's decode weights timed both ways at load (4 passes each: 0.57 s on mid)
DENSE_KERNEL_BYTES = 64 << 20  # float32 weights from which decode streams from DRAM (twice a 32 MiB L3)


class NumpyBackend(Backend):
    name = "numpy"

    @property
    def xp(self):
        return array_namespace(np.empty(0, dtype=np.float32))

    def asarray(self, a):
        return np.asarray(a)  # zero-copy: memory-mapped weights stay mapped

    def to_host(self, x):
        return np.asarray(x)

    _threads = None  # set_threads(n), applied to numba too once it is imported
    _blas = None  # threadpoolctl's handle on the BLAS library, made once (0.2 ms), for decoding()

    def pack_weights(self, flat: dict, weights: str) -> dict:
        """Bf16Weight / Int8Weight for the Linear weights (packing.py), and the numba kernels that read them
        registered now, not at import: importing numba costs ~0.5 s, which a small model never pays. Without
        numba (the `fast` extra) nn.linear widens them on its reference path: same numbers, slower. A float32
        model of DENSE_KERNEL_BYTES or more gets numba's float32 decode loop too (dense_linear) where it
        out-reads BLAS on this CPU (measured once, numba_kernels.dense_beats_blas); a smaller one decodes
        from the cache, where BLAS is as fast and the import would cost more than it saves. Wherever numba is
        loaded, a prefill's GELU runs as one parallel pass too (numba_elementwise.py: within 5e-7 of the reference)."""
        from .packing import pack_weights

        out = pack_weights(flat, weights)
        if weights == "float32" and sum(getattr(v, "nbytes", 0) for v in out.values()) < DENSE_KERNEL_BYTES:
            return out  # decodes from the cache through BLAS: numba is not imported
        numba_environment()
        from . import numba_kernels

        if not numba_kernels.HAVE_NUMBA:
            return out
        from .numba_elementwise import register_numba_elementwise

        register_numba_elementwise()  # GELU in one parallel pass: prefill's largest elementwise cost
        if self._threads is not None:
            _numba_threads(self._threads)  # before the calibration, which times the loop on these threads
        dense = weights == "float32" and numba_kernels.dense_beats_blas(_decode_matrices(out))
        if weights != "float32" or dense:
            numba_kernels.register_numba_kernels(dense=dense)
        return out

    def decoding(self):
        """One BLAS thread while numba's kernels stream the weights. A decode step's Linear layers then run on
        numba's threads, and what BLAS still does (attention against the cache) is small; but OpenBLAS's idle
        threads spin for a while after each call, on the cores numba needs. Measured on this 2-core machine
        (3B shapes, int8): 248 ms a token with 2 BLAS threads in decode, 137 ms with 1. Prefill, outside this
        context, keeps every BLAS thread (its GEMMs need them)."""
        if not _numba_linear_registered():
            return contextlib.nullcontext()  # BLAS does the decode's work itself: it keeps its threads
        if NumpyBackend._blas is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # a dependency, but keep a working fallback
                return contextlib.nullcontext()
            NumpyBackend._blas = ThreadpoolController().select(user_api="blas")
        return NumpyBackend._blas.limit(limits=1)

    def set_threads(self, n: int) -> None:
        self._threads = int(n)
        if "numba" in sys.modules:  # numba keeps its own pool; never imported just for this
            _numba_threads(self._threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # threadpoolctl is a dependency, but keep a working fallback
            return
        self._limits = threadpool_limits(limits=int(n), user_api="blas")


def _numba_linear_registered() -> bool:
    """Whether numba's kernels are nn.linear's (packed weights always, float32 arrays where the loop won): read
    from the seam's table, the one record of it (tests that restore the table restore this too)."""
    kernels = sys.modules.get(__package__ + ".numba_kernels")
    return kernels is not None and any(replacement("linear", t) in (kernels.packed_linear, kernels.dense_linear)
                                       for t in (Bf16Weight, np.ndarray))


def _decode_matrices(flat: dict, limit: int = CALIBRATION_BYTES) -> list:
    """The text decoder's 2-D float32 weights, its layers' in the checkpoint's order and the tied head last, until
    `limit` bytes are reached: what a decode step reads, for numba_kernels.dense_beats_blas to time both ways on.
    The head goes last because the layers' shapes decide most of a step, and 3B's head alone is 2 GiB: timed
    first, it was all the measure saw (there the loop and BLAS read it alike, 70 against 72 ms, while the layers'
    weights read 8 % faster through the loop)."""
    names = [name for name, w in flat.items()
             if name.startswith("language_model.") and isinstance(w, np.ndarray) and w.ndim == 2
             and w.dtype == np.float32 and w.flags.c_contiguous]
    mats, total = [], 0
    for name in sorted(names, key=lambda n: "embed_tokens" in n):  # stable: the layers in order, the head last
        if total >= limit:
            break
        mats.append(flat[name])
        total += flat[name].nbytes
    return mats


def numba_environment() -> None:
    """How numba's kernels should run here, set before numba and its OpenMP library load (both read it once then),
    each setting only where the user has not made it:
    - numba's OpenMP threads wait between parallel calls. By default they spin for ~300k rounds (ms), on the cores a
      decode step's BLAS calls need: measured on 2 cores (mid preset, bf16), 423 ms a token with that, 38-72 ms with
      passive waiting. But a passive thread sleeps at once, and waking it costs a futex and an interrupt: 46 us a
      call on a 2-core KVM guest, ~57 calls a token (5 ms of mid's 28 ms in int8). So they spin briefly
      (GOMP_SPINCOUNT: 0.6 ms of CPU after a call there, longer than a step's gaps between its Linear layers), then
      sleep;
    - 512-bit vectors on AVX-512 CPUs (_prefer_wide_vectors)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_ROUNDS)
    _prefer_wide_vectors()


def _prefer_wide_vectors() -> None:
    """On an AVX-512 CPU, let LLVM vectorise numba's kernels with 512-bit registers. LLVM prefers 256-bit ones on
    Intel's AVX-512 cores (a clock-speed precaution for code that mixes in little vector work); the decode kernels
    are nothing but vector work. Done through NUMBA_CPU_FEATURES (the host's features, less `prefer-256-bit`), read
    once when numba is imported, and only when numba is not imported yet and the user has not set it."""
    if "NUMBA_CPU_FEATURES" in os.environ or "numba" in sys.modules:
        return
    try:
        from llvmlite import binding as llvm
    except ImportError:  # no numba either: nothing to compile
        return
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


def _numba_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
