"""CuPy on a CUDA GPU. CuPy is imported only when this backend is chosen."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from .base import Backend


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self):
        try:
            import cupy
        except ImportError:
            raise BackendError("backend 'cupy' needs CuPy: pip install 'npvlm[cuda]' (or cupy-cuda12x / cupy-cuda13x)") from None
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDARuntimeError: no driver, no device
            raise BackendError(f"backend 'cupy': no usable CUDA GPU ({type(e).__name__}: {e})") from None
        if n < 1:
            raise BackendError("backend 'cupy': CuPy found no CUDA GPU")
        self._cp = cupy
        from ..fast_ops import register

        register("write_columns", cupy.ndarray, _write_columns_inplace)

    @property
    def xp(self):
        from array_api_compat import array_namespace

        return array_namespace(self._cp.empty(0, dtype=self._cp.float32))

    def asarray(self, a):
        return self._cp.asarray(np.ascontiguousarray(a))

    def to_host(self, x):
        return self._cp.asnumpy(x)

    def pack_weights(self, flat: dict, weights: str) -> dict:
        """The Linear weights and the tied embedding as GPU bf16 / int8 containers (backends/cupy_kernels.py), packed
        on the host first (packing.py: a bf16 file's bits as they are, int8 quantized a block of rows at a time), each
        copied to the GPU once; the fused GEMV kernels registered. The rest stays host arrays for `asarray`."""
        from .packing import pack_weights

        if weights == "float32" and not any(isinstance(v, tuple) for v in flat.values()):
            return flat
        from ..packed import PackedWeight
        from .cupy_kernels import register_cupy_kernels, to_device

        register_cupy_kernels()
        return {k: to_device(v) if isinstance(v, PackedWeight) else v for k, v in pack_weights(flat, weights).items()}

    def synchronize(self):
        self._cp.cuda.get_current_stream().synchronize()

    def peak_memory(self):
        # CuPy's pool keeps freed blocks for reuse, so what it holds is its high-water mark
        return int(self._cp.get_default_memory_pool().total_bytes())


def _write_columns_inplace(cache, new, cols):  # as numpy_backend.write_columns_inplace, on the GPU
    import cupy

    cache[cupy.arange(cache.shape[0]), :, cols, :] = new[:, :, 0, :]
    return cache
