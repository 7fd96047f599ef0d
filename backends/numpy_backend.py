"""NumPy on the CPU: the reference backend."""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

from ..fast_ops import register
from .base import Backend
from .numpy_fast import register_numpy_fast_ops


def write_columns_inplace(cache, new, cols):  # [B, K, C, E], [B, K, 1, E], [B] -> cache, written in place
    """kv_cache.write_columns without the copy: NumPy can scatter one column per row in place."""
    cache[np.arange(cache.shape[0]), :, np.asarray(cols), :] = new[:, :, 0, :]
    return cache


register("write_columns", np.ndarray, write_columns_inplace)
register_numpy_fast_ops()  # gelu_tanh, softmax, rms_norm, layer_norm: blocked, in place (numpy_fast.py)


class NumpyBackend(Backend):
    name = "numpy"

    @property
    def xp(self):
        return array_namespace(np.empty(0, dtype=np.float32))

    def asarray(self, a):
        return np.asarray(a)  # zero-copy: memory-mapped weights stay mapped

    def to_host(self, x):
        return np.asarray(x)

    def set_threads(self, n: int) -> None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # threadpoolctl is a dependency, but keep a working fallback
            return
        self._limits = threadpool_limits(limits=int(n), user_api="blas")
