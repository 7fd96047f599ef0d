"""The small interface every backend implements."""

from __future__ import annotations

import contextlib

import numpy as np


class Backend:
    """Where arrays live and how to reach them.

    name          a short name for messages ("numpy", "cupy", ...)
    xp            the array-API namespace of this backend's arrays
    asarray(a)    host NumPy array -> backend array (zero-copy where the backend allows)
    to_host(x)    backend array -> host NumPy array (waits for the device)
    synchronize() wait until queued device work is done (before reading a timer)
    peak_memory() bytes of device memory at peak, or None where the process RSS says it all
    decoding()    a context for one decode step: how its threads are to be shared out (a no-op but on numpy)
    """

    name = "base"

    @property
    def xp(self):
        raise NotImplementedError

    def asarray(self, a: np.ndarray):
        raise NotImplementedError

    def to_host(self, x) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def peak_memory(self) -> "int | None":
        return None

    def pack_weights(self, flat: dict, weights: str) -> dict:
        """{name: host array} -> the same with the Linear weights held as `weights` ("bfloat16" | "int8")."""
        if weights == "float32" and not any(isinstance(v, tuple) for v in flat.values()):
            return flat
        from ..errors import ConfigError

        raise ConfigError(f"weights={weights!r} needs the numpy backend (the {self.name} backend holds float32 weights)")

    def set_threads(self, n: int) -> None:
        """Limit the CPU threads of the BLAS library (no-op where irrelevant)."""

    def decoding(self):
        """Context manager around one decode step (generate's loop and the server's step use it)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<npvlm backend {self.name}>"
