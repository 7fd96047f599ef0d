"""Choosing the next token from the logits: greedy, or temperature, top-k and top-p sampling.

The choice is made on the device and only B integers come back: one host sync per token. Sampling
inverts the cumulative distribution with uniform draws from one host `random.Random(seed)`, so a
seed gives the same text on every backend.
"""

from __future__ import annotations

import math
import numbers

from array_api_compat import array_namespace

from ..errors import GenerationError, show


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def check_params(max_new_tokens, temperature, top_p, top_k, seed) -> None:
    """Refuse bad generation parameters with a GenerationError naming the parameter and the value."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {show(max_new_tokens, 40)}")
    if not _is_real(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0, got {show(temperature, 40)}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {show(top_p, 40)}")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {show(top_k, 40)}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise GenerationError(f"seed must be a non-negative integer, got {show(seed, 40)}")


def sample(logits, temperature: float, top_k: int, top_p: float, u):
    """logits [B, V] (any namespace) and B uniform draws u in [0, 1) -> next ids [B], on the device.

    As HF orders it: temperature, then top-k, then top-p (the smallest set of most likely tokens
    whose mass reaches top_p), then a draw by inverting the cumulative distribution with u.
    Only the B ids leave the device, never the V-wide distribution.
    """
    xp = array_namespace(logits)
    if temperature == 0.0:
        return xp.argmax(logits, axis=-1)
    B, V = logits.shape
    z = xp.astype(logits, xp.float64) / temperature
    order = xp.argsort(z, axis=-1, descending=True, stable=True)  # [B, V] token ids, most likely first
    z = xp.sort(z, axis=-1, descending=True)
    if 0 < top_k < V:
        z = xp.where(xp.arange(V) < top_k, z, xp.full_like(z, -math.inf))
    p = xp.exp(z - z[:, :1])
    p = p / xp.sum(p, axis=-1, keepdims=True)
    if top_p < 1.0:
        p = xp.where(xp.cumulative_sum(p, axis=-1) - p < top_p, p, xp.zeros_like(p))  # the first token always stays
    cdf = xp.cumulative_sum(p, axis=-1)  # [B, V], last column = the kept mass
    draw = xp.asarray([[x] for x in u], dtype=xp.float64) * cdf[:, -1:]
    rank = xp.minimum(xp.sum(xp.astype(cdf <= draw, xp.int64), axis=-1), V - 1)  # [B] position in `order`
    return xp.take(xp.reshape(order, (B * V,)), xp.arange(B) * V + rank, axis=0)
