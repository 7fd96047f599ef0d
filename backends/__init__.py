"""Pluggable array backends, installed as `npvlm.backends`.

Model code never imports an array library: it asks its inputs for their namespace
(`xp = array_namespace(x)`). Only the loader and the CLI pick a backend, by name, and the
backend says how to move host (NumPy) arrays onto its device and back, how to wait for the
device, and where it has a faster path than the array API standard gives.

    numpy             CPU, the reference; float32 weights memory-mapped from the checkpoint
    cupy              CUDA GPU through CuPy (pip install 'npvlm[cuda]')
    array_api_strict  test-only: proves the code uses standard array-API operations alone
"""

from __future__ import annotations

from ..errors import BackendError
from .base import Backend

BACKENDS = ("numpy", "cupy", "array_api_strict")


def get_backend(name: "str | Backend" = "numpy") -> Backend:
    """Return the backend called `name` (or `name` itself if it already is a Backend)."""
    if isinstance(name, Backend):
        return name
    if name == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "cupy":
        from .cupy_backend import CupyBackend

        return CupyBackend()
    if name in ("array_api_strict", "strict"):
        from .strict_backend import StrictBackend

        return StrictBackend()
    raise BackendError(f"unknown backend {name!r} (expected one of: {', '.join(BACKENDS)})")


__all__ = ["Backend", "BACKENDS", "get_backend"]
