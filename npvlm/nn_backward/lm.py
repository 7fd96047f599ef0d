"""Hand-written backward passes: the embedding lookup, the tied head, Gemma 2's soft-cap and the loss.

The same conventions as layers.py (`y, saved = f_forward(...)`, `dx, grads = f_backward(dy, saved)`).
The lookup's gradient is a scatter-add and the head's a matmul into the same [V, D] table: a tied
embedding adds the two (`add_grads`).
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .layers import ONE_HOT_BUDGET, _rows, linear_backward, linear_forward  # noqa: F401


# --- embeddings, head and loss ------------------------------------------------------------------

def embed_forward(ids, weight, scale=None):  # [...] int, [V, D] -> [..., D]
    """Gemma's lookup times sqrt(D) (rounded to the weight's dtype, as HF); scale=1.0 for a plain lookup.

    Saves the ids by reference (itemsize bytes per token) and the table by reference (free).
    """
    xp = array_namespace(weight)
    V, D = weight.shape
    s = xp.asarray(math.sqrt(D) if scale is None else scale, dtype=weight.dtype)
    e = xp.take(weight, xp.reshape(ids, (-1,)), axis=0) * s  # [n, D]
    return xp.reshape(e, tuple(ids.shape) + (D,)), {"ids": ids, "weight": weight, "scale": s}


def embed_backward(dy, saved):  # [..., D] -> {weight [V, D]}; the int ids have no gradient
    """Scatter-add of the rows of dy into the table, as one-hot^T @ dy in blocks of tokens.

    The array API has no scatter: a [n, V] one-hot matmul adds repeated ids (the same row picked twice
    gets both gradients) at n*V*D multiply-adds, what the tied head's own matmul costs; blocks keep the
    one-hot under ONE_HOT_BUDGET entries.
    """
    xp = array_namespace(dy)
    w = saved["weight"]
    V, D = w.shape
    ids, g = xp.reshape(saved["ids"], (-1,)), _rows(dy * saved["scale"], D)  # [n], [n, D]
    vocab = xp.arange(V, dtype=ids.dtype)
    rows = max(1, ONE_HOT_BUDGET // max(1, V))
    dw = xp.zeros((V, D), dtype=w.dtype)
    n = ids.shape[0]
    for a in range(0, n, rows):
        c = min(a + rows, n)
        hot = xp.astype(ids[a:c, None] == vocab[None, :], w.dtype)  # [rows, V]
        dw = dw + xp.matrix_transpose(hot) @ g[a:c, :]  # row v gets the sum of dy over tokens with id v
    return {"weight": dw}


def softcap_forward(x, cap):  # [...] -> [...]: Gemma 2's c * tanh(x / c)
    """Saves tanh(x / c): 4 bytes per element."""
    xp = array_namespace(x)
    t = xp.tanh(x / cap)
    return cap * t, {"t": t}


def softcap_backward(dy, saved):
    return dy * (1.0 - saved["t"] * saved["t"])


def lm_head_forward(h, weight, softcap=None):  # [..., D], [V, D] -> [..., V] float32: the tied head
    """Saves h (reference) and, with Gemma 2's final soft-cap, tanh(z / c) [.., V]: 4V bytes per row."""
    xp = array_namespace(h)
    z, sl = linear_forward(h, weight)
    z = xp.astype(z, xp.float32)
    if softcap is None:
        return z, {"linear": sl, "cap": None}
    y, sc = softcap_forward(z, softcap)
    return y, {"linear": sl, "cap": sc}


def lm_head_backward(dy, saved):  # [..., V] -> [..., D], {weight [V, D]}: add it to the lookup's with add_grads
    dz = dy if saved["cap"] is None else softcap_backward(dy, saved["cap"])
    return linear_backward(dz, saved["linear"])


def cross_entropy_forward(logits, labels, ignore_index=-100):  # [..., V] float32, [...] int -> scalar
    """Mean of -log softmax(logits)[label] over the counted tokens (labels == ignore_index left out), as HF.

    Shift first for next-token prediction (logits[:, :-1], labels[:, 1:]); no counted token gives 0.
    Saves logits and labels by reference and logsumexp [rows]: 4 new bytes per row.
    """
    xp = array_namespace(logits)
    V = logits.shape[-1]
    z, y = _rows(logits, V), xp.reshape(labels, (-1,))  # [n, V], [n]
    m = xp.max(z, axis=-1, keepdims=True)
    lse = m + xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True))  # [n, 1]
    hot = xp.astype(y[:, None] == xp.arange(V, dtype=y.dtype)[None, :], z.dtype)  # ignored rows: all zero
    valid = xp.astype(y != ignore_index, z.dtype)  # [n]
    count = xp.maximum(xp.sum(valid), 1.0)
    loss = xp.sum((lse[:, 0] - xp.sum(z * hot, axis=-1)) * valid) / count
    return loss, {"logits": logits, "labels": labels, "lse": lse, "valid": valid, "count": count}


def cross_entropy_backward(dloss, saved):  # scalar -> [..., V]
    xp = array_namespace(saved["lse"])
    logits = saved["logits"]
    V = logits.shape[-1]
    z, y = _rows(logits, V), xp.reshape(saved["labels"], (-1,))
    hot = xp.astype(y[:, None] == xp.arange(V, dtype=y.dtype)[None, :], z.dtype)
    # dz = (softmax(z) - onehot(label)) * counted / count
    dz = (xp.exp(z - saved["lse"]) - hot) * (saved["valid"][:, None] * (dloss / saved["count"]))
    return xp.reshape(dz, tuple(logits.shape))
