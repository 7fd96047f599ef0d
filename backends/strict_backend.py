"""array_api_strict: a test-only namespace that allows nothing beyond the array API standard.

Code that runs here uses standard operations only, which is the CPU-side proof that it will run
under CuPy (or any other conforming library) too. It copies every weight, so keep it to tests.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from .base import Backend


class StrictBackend(Backend):
    name = "array_api_strict"

    def __init__(self):
        try:
            import array_api_strict
        except ImportError:
            raise BackendError("backend 'array_api_strict' needs: pip install array-api-strict") from None
        self._xp = array_api_strict

    @property
    def xp(self):
        return self._xp

    def asarray(self, a):
        return self._xp.asarray(np.ascontiguousarray(a))

    def to_host(self, x):
        return np.asarray(x)
