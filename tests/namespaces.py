"""The grid of array namespaces every layer test runs under, and the helpers to cross it.

    numpy             always
    array_api_strict  always: proves the layers use standard array-API operations only
    cupy              only where cupy imports and sees a CUDA device; elsewhere the param is
                      still listed, skipped with its reason (the GPU check script runs it)

A test takes `ns` (a `Namespace`) through `@each_namespace`, builds its inputs in NumPy on the
host, moves them with `ns.put` / `ns.put_tree`, and brings results back with `ns.get`. Torch
references run on `ns.torch_device`: CUDA when the namespace is cupy and torch sees a GPU,
else the CPU.

Hypothesis settings are a fixed, derandomized profile (`HYPOTHESIS`) so CI sees the same
examples every run; it is applied per test, not loaded globally, so other suites keep theirs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from npvlm.backends import get_backend

CUPY_SKIP_REASON = "cupy: no CUDA GPU / cupy not installed"

# The per-test hypothesis profile: few, small examples (2 shared CPU cores), always the same ones.
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=False,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    """True when cupy imports and reports at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError (no driver), ...
        return False


class Namespace:
    """One backend of the grid, created lazily (a skipped cupy param never touches cupy)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @functools.cached_property
    def backend(self):
        return get_backend(self.name)

    @property
    def xp(self):
        return self.backend.xp

    # --- host <-> namespace -------------------------------------------------------------------
    def put(self, a):
        """A host value (NumPy array, scalar, or nested list) -> an array of this namespace."""
        return self.backend.asarray(np.asarray(a))

    def put_tree(self, tree):
        """A nested dict of host arrays (a parameter tree) -> the same tree in this namespace."""
        if isinstance(tree, dict):
            return {k: self.put_tree(v) for k, v in tree.items()}
        return self.put(tree)

    def get(self, x) -> np.ndarray:
        """An array of this namespace -> a host NumPy array."""
        return np.asarray(self.backend.to_host(x))

    # --- the torch side of a comparison ---------------------------------------------------------
    @functools.cached_property
    def torch_device(self) -> str:
        import torch

        if self.name == "cupy" and torch.cuda.is_available():
            # float32 references must be float32: no TF32 in matmuls or cuDNN convolutions.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            return "cuda"
        return "cpu"

    def torch(self, a):
        """A host NumPy array -> a torch tensor on the device that matches this namespace."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(self.torch_device)


NAMESPACE_NAMES = ("numpy", "array_api_strict", "cupy")

NAMESPACES = [
    pytest.param(Namespace("numpy"), id="numpy"),
    pytest.param(Namespace("array_api_strict"), id="array_api_strict"),
    pytest.param(Namespace("cupy"), id="cupy",
                 marks=[pytest.mark.cupy, pytest.mark.skipif(not cupy_available(), reason=CUPY_SKIP_REASON)]),
]

# Decorate a test taking `ns` with this to run it once per namespace of the grid.
each_namespace = pytest.mark.parametrize("ns", NAMESPACES)


def each_namespace_marked(**marks_by_name):
    """Like `each_namespace`, with extra marks on some namespaces: `each_namespace_marked(cupy=mark)`."""
    params = [pytest.param(*p.values, id=p.id, marks=[*p.marks, *_as_list(marks_by_name.get(p.id, []))])
              for p in NAMESPACES]
    return pytest.mark.parametrize("ns", params)


def _as_list(marks):
    return list(marks) if isinstance(marks, (list, tuple)) else [marks]


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any device) -> a host NumPy array."""
    return t.detach().cpu().numpy()


def assert_close(ns: Namespace, got, want, *, rtol: float, atol: float, dtype=np.float32) -> None:
    """Compare a namespace array with a reference (torch tensor or NumPy array).

    Checks the dtype too (float32 in, float32 out: nothing may be silently widened) and the exact
    shape, then elementwise |got - want| <= atol + rtol * |want|.
    """
    g = ns.get(got)
    w = to_numpy(want) if hasattr(want, "detach") else np.asarray(want)
    assert g.dtype == dtype, f"dtype: expected {np.dtype(dtype)}, got {g.dtype}"
    assert g.shape == w.shape, f"shape: expected {w.shape}, got {g.shape}"
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# Backend names for the end-to-end tests (a whole model loaded on each); cupy as above.
MODEL_BACKENDS = [pytest.param(p.id, id=p.id, marks=p.marks) for p in NAMESPACES]
each_backend = pytest.mark.parametrize("backend", MODEL_BACKENDS)
