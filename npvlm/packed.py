"""Weights kept resident in fewer bits than float32, and widened where they are used.

Decoding reads every weight once per token, so a decode step costs (bytes of weights) / (memory
bandwidth): a 16-bit weight halves that, an 8-bit one quarters it. The containers below hold the
narrow bits and stand in for a float32 [out, in] Linear weight; `nn.linear` widens them whole on
its reference path (`weight.widen()`, then the usual x @ W.T), and a backend registers a fused
kernel for each container type through the fast-op seam (`fast_ops.register("linear", Bf16Weight,
...)`, backends/numba_kernels.py) that widens a few rows at a time inside the matrix-vector
product, so the float32 copy never exists. The tied embedding table [V, D] is one of them too: the
head is a Linear over V rows (the largest single read of a decode step), and the embedding lookup
widens only the rows it looks up (`take_rows(ids)`).

    Bf16Weight(bits, widen)   bfloat16 as raw bits: uint16 [out, in]. A bfloat16 is the top half
                              of a float32, so widening is `(uint32(bits) << 16)` reinterpreted
                              as float32: exact, but a bit reinterpretation, which the array API
                              standard lacks. The backend that built the bits supplies `widen`
                              (for NumPy: backends/numba_kernels.py `widen_bf16`).
    Int8Weight(q, scale)      symmetric per-output-channel int8 (the LLM.int8() paper's "vector-
                              wise" absmax, without its outlier columns): q int8 [out, in],
                              scale float32 [out], W ~= q * scale[:, None], scale = max|W_row| / 127.
                              Widening is standard array-API arithmetic.

The quantizers (float32 -> these) need bit views too and live with the backend (numba_kernels.py
`to_bf16_bits`, `quantize_int8`). This module imports no array library.

References: Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (2019);
Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022).
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .errors import ShapeError


class PackedWeight:
    """A Linear weight [out, in] held in fewer bits; `widen()` gives the float32 [out, in] array."""

    kind = "packed"  # a short name for messages and benchmarks
    bits_per_weight = 0

    @property
    def shape(self) -> tuple:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def widen(self):
        """The float32 [out, in] weight this container stands for."""
        raise NotImplementedError

    def take_rows(self, ids):
        """widen()[ids] for ids [n] int: float32 [n, in], only those rows widened (an embedding lookup)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {tuple(self.shape)}>"


class Bf16Weight(PackedWeight):
    """bfloat16 weight as raw bits, uint16 [out, in]; `widen` (from the backend) maps bits -> float32."""

    kind = "bfloat16"
    bits_per_weight = 16

    def __init__(self, bits, widen):
        if bits.ndim != 2:
            raise ShapeError(f"Bf16Weight: expected bits [out, in], got {tuple(bits.shape)}")
        self.bits = bits  # [out, in] uint16
        self._widen = widen

    @property
    def shape(self) -> tuple:
        return tuple(self.bits.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.bits.shape[0] * self.bits.shape[1]

    def widen(self):  # -> [out, in] float32, exact
        return self._widen(self.bits)

    def take_rows(self, ids):  # [n] int -> [n, in] float32, exact
        return self._widen(array_namespace(self.bits).take(self.bits, ids, axis=0))


class Int8Weight(PackedWeight):
    """Per-output-channel symmetric int8: q int8 [out, in], scale float32 [out]; W ~= q * scale[:, None]."""

    kind = "int8"
    bits_per_weight = 8

    def __init__(self, q, scale):
        if q.ndim != 2 or tuple(scale.shape) != (q.shape[0],):
            raise ShapeError(f"Int8Weight: expected q [out, in] and scale [out], got {tuple(q.shape)} and {tuple(scale.shape)}")
        self.q = q  # [out, in] int8
        self.scale = scale  # [out] float32

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return self.q.shape[0] * self.q.shape[1] + 4 * self.q.shape[0]

    def widen(self):  # -> [out, in] float32: each q times its row's scale, rounded once
        xp = array_namespace(self.q)
        return xp.astype(self.q, xp.float32) * self.scale[:, None]

    def take_rows(self, ids):  # [n] int -> [n, in] float32, as widen()[ids]
        xp = array_namespace(self.q)
        return xp.astype(xp.take(self.q, ids, axis=0), xp.float32) * xp.take(self.scale, ids, axis=0)[:, None]
