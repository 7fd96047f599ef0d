"""Input builders shared by the layer tests (tests/test_nn.py, tests/test_properties.py), one meaning each.

    randn(rng, *shape, scale=)            float32 normal draws
    causal_allowed(B, T, start=0, S=None) bool [B, 1, T, S]: new query t sits at absolute position start + t
                                          and may see keys 0..start+t; S (the key count) defaults to start + T,
                                          the keys a cache holds after writing the T new ones
    attention_params(rng, D, H, K, E)     Gemma-style q/k/v/o projections (host arrays, no bias)
"""

from __future__ import annotations

import numpy as np


def randn(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def causal_allowed(B, T, start=0, S=None) -> np.ndarray:
    """bool [B, 1, T, S]: query t (absolute position start + t) may see keys 0..start+t; S defaults to start + T."""
    S = start + T if S is None else S
    allowed = np.arange(S)[None, :] <= (start + np.arange(T))[:, None]
    return np.broadcast_to(allowed, (B, 1, T, S)).copy()


def attention_params(rng, D, H, K, E) -> dict:
    """Gemma-style q/k/v/o projections (no bias) on the host, scaled so activations stay O(1)."""
    return {"q_proj": {"weight": randn(rng, H * E, D, scale=D**-0.5)},
            "k_proj": {"weight": randn(rng, K * E, D, scale=D**-0.5)},
            "v_proj": {"weight": randn(rng, K * E, D, scale=D**-0.5)},
            "o_proj": {"weight": randn(rng, D, H * E, scale=(H * E) ** -0.5)}}
