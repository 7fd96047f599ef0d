"""Choosing the next token from the logits: greedy, or temperature, top-k and top-p sampling.

The choice is made on the device and only B integers come back: one host sync per token. Sampling
inverts the cumulative distribution with uniform draws from one host `random.Random(seed)`, so a
seed gives the same text on every backend.

Only the candidates are sorted: `top_candidates(z, k)` (a fast-op seam, npvlm/fast_ops.py) gives the k
most likely ids in order, ties by index. Its reference is the full stable sort of the vocabulary; the
NumPy backend partitions first (np.argpartition, then a stable sort of k ids), so at V = 257 216 a
top-k draw sorts k values, not V. Top-p alone partially sorts the first TOP_P_BLOCK and sorts the whole
vocabulary only when that block's mass is below top_p. Everything after the candidates is the same
arithmetic on either path, so both give identical ids.
"""

from __future__ import annotations

import math
import numbers

from array_api_compat import array_namespace

from ..errors import GenerationError, show
from ..fast_ops import fast_path

TOP_P_BLOCK = 1024  # top-p without top-k: candidates tried first (the nucleus is almost always far smaller)


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


@fast_path
def top_candidates(z, k: int):  # [B, V] float, 1 <= k <= V -> [B, k] int64 ids, most likely first
    """The k largest entries of each row, in descending order, ties broken by the lower index (a stable sort)."""
    xp = array_namespace(z)
    return xp.argsort(z, axis=-1, descending=True, stable=True)[:, :k]


def _gather(z, ids):  # [B, V], [B, k] ids -> [B, k] values z[b, ids[b, j]]
    xp = array_namespace(z)
    B, V = z.shape
    flat = xp.reshape(ids + xp.reshape(xp.arange(B, dtype=ids.dtype) * V, (B, 1)), (-1,))
    return xp.reshape(xp.take(xp.reshape(z, (-1,)), flat, axis=0), ids.shape)


def sample(logits, temperature: float, top_k: int, top_p: float, u):
    """logits [B, V] (any namespace) and B uniform draws u in [0, 1) -> next ids [B], on the device.

    As HF orders it: temperature, then top-k, then top-p (the smallest set of most likely tokens
    whose mass reaches top_p), then a draw by inverting the cumulative distribution, in order of
    likelihood, with u. Only the B ids leave the device, never the V-wide distribution.
    """
    xp = array_namespace(logits)
    if temperature == 0.0:
        return xp.argmax(logits, axis=-1)
    B, V = logits.shape
    z = xp.astype(logits, xp.float64) / temperature
    zmax = xp.max(z, axis=-1, keepdims=True)  # [B, 1]
    if 0 < top_k < V:  # the distribution renormalised over the k candidates
        ids = top_candidates(z, top_k)  # [B, k]
        p = xp.exp(_gather(z, ids) - zmax)
        p = p / xp.sum(p, axis=-1, keepdims=True)
    else:  # over the whole vocabulary; with top-p, try the first block of candidates
        total = xp.sum(xp.exp(z - zmax), axis=-1, keepdims=True)  # [B, 1]
        k = TOP_P_BLOCK if top_p < 1.0 and V > TOP_P_BLOCK else V
        ids = top_candidates(z, k)
        p = xp.exp(_gather(z, ids) - zmax) / total
        if k < V and bool(xp.any(xp.cumulative_sum(p, axis=-1)[:, -1] < top_p)):  # nucleus past the block
            ids = top_candidates(z, V)
            p = xp.exp(_gather(z, ids) - zmax) / total
    k = ids.shape[1]
    if top_p < 1.0:  # tokens past the block have at least the block's mass before them: never kept
        p = xp.where(xp.cumulative_sum(p, axis=-1) - p < top_p, p, xp.zeros_like(p))  # the first token always stays
    cdf = xp.cumulative_sum(p, axis=-1)  # [B, k], last column = the kept mass
    draw = xp.asarray([[x] for x in u], dtype=xp.float64) * cdf[:, -1:]
    rank = xp.minimum(xp.sum(xp.astype(cdf <= draw, xp.int64), axis=-1), k - 1)  # [B] position among the candidates
    return xp.take(xp.reshape(ids, (B * k,)), xp.arange(B) * k + rank, axis=0)
