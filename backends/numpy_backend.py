"""NumPy on the CPU: the reference backend."""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

from .base import Backend


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
