"""A key/value cache allocated once and written in place.

Generation needs, for every decoder layer, the keys and values of every token seen so far.
Growing them by concatenation copies the whole cache at every token (quadratic work); here the
arrays are sized once for `image + prompt + max_new_tokens` and each step writes its new rows.
Keys are stored *after* RoPE, so a cached key never needs rotating again.

    cache.k[layer], cache.v[layer]     [B, K, C, E]   (C = capacity, in columns)

Two ways in. Prefill writes T columns from `start`, the same for every row, and attends to the
filled part. A decode step writes one column per row, at that row's own column `cols[b]`, and
attends to the cache at full capacity (a mask hides what is not there yet): no array changes
shape from step to step, which is what a CUDA graph needs, and rows may sit at different columns,
which is what a server that adds and drops requests needs.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .errors import GenerationError
from .fast_ops import fast_path


@fast_path
def write_columns(cache, new, cols):  # [B, K, C, E], [B, K, 1, E], [B] int -> [B, K, C, E]
    """Row b of `new` into column cols[b] of `cache`. The result replaces `cache`.

    The array API standard has no scatter, so the reference selects with a one-hot comparison
    and builds a new array (a full copy per call); backends register an in-place write."""
    xp = array_namespace(cache)
    B, _, C, _ = cache.shape
    hit = xp.reshape(xp.arange(C, dtype=cols.dtype), (1, 1, C, 1)) == xp.reshape(cols, (B, 1, 1, 1))  # [B, 1, C, 1]
    return xp.where(hit, xp.astype(new, cache.dtype), cache)


class KVCache:
    def __init__(self, like, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int):
        """`like` is any array of the wanted namespace and dtype (a weight, say)."""
        xp = array_namespace(like)
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layers)]
        self.capacity = capacity
        self.nbytes = 2 * n_layers * batch * n_kv_heads * capacity * head_dim * (xp.finfo(like.dtype).bits // 8)

    def update(self, layer: int, k, v, at):  # k, v [B, K, T, E] -> keys, values to attend to
        """Write the new keys and values and return what the queries attend to.

        at: an int `start` (prefill: T columns start..start+T-1 in every row; returns columns :start+T)
            or an int array [B] (a decode step, T = 1: row b at column at[b]; returns all C columns)."""
        if isinstance(at, int):
            end = at + k.shape[2]
            if end > self.capacity:
                raise GenerationError(f"KV cache full: {end} tokens do not fit its capacity of {self.capacity}")
            self.k[layer][:, :, at:end, :] = k
            self.v[layer][:, :, at:end, :] = v
            return self.k[layer][:, :, :end, :], self.v[layer][:, :, :end, :]
        self.k[layer] = write_columns(self.k[layer], k, at)
        self.v[layer] = write_columns(self.v[layer], v, at)
        return self.k[layer], self.v[layer]
