"""A key/value cache allocated once and written in place.

Generation needs, for every decoder layer, the keys and values of every token seen so far.
Growing them by concatenation copies the whole cache at every token (quadratic work); here the
arrays are sized once for `image + prompt + max_new_tokens` and each step writes its new rows.
Keys are stored *after* RoPE, so a cached key never needs rotating again.

    cache.k[layer], cache.v[layer]     [B, K, capacity, E]
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .errors import GenerationError


class KVCache:
    def __init__(self, like, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int):
        """`like` is any array of the wanted namespace and dtype (a weight, say)."""
        xp = array_namespace(like)
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layers)]
        self.capacity = capacity
        self.nbytes = 2 * n_layers * batch * n_kv_heads * capacity * head_dim * (xp.finfo(like.dtype).bits // 8)

    def update(self, layer: int, k, v, start: int):  # k, v [B, K, T, E] -> all keys, values [B, K, start+T, E]
        """Write the T new rows at positions start..start+T and return the filled part of the cache."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise GenerationError(f"KV cache full: {end} tokens do not fit its capacity of {self.capacity}")
        self.k[layer][:, :, start:end, :] = k
        self.v[layer][:, :, start:end, :] = v
        return self.k[layer][:, :, :end, :], self.v[layer][:, :, :end, :]
