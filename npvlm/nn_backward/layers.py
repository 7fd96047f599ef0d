"""Hand-written backward passes: the dense, normalisation and attention layers (vector-Jacobian products) of npvlm.nn, llm.c style.

Each forward `f` of nn.py gets a pair here:

    y, saved = f_forward(x, **params)      the same values as nn.f (nn.py stays the reference)
    dx, grads = f_backward(dy, saved)      grads named like the parameters: {"weight": dW, "bias": db}

An op without parameters returns only its input gradient(s); an op with several array inputs
(attention) returns them as a tuple in the forward's order. `saved` is a dict holding only what the
backward reads; each docstring states what that costs per call. An input kept "by reference" costs
nothing new while the caller holds it anyway (a parameter, the pixels); an activation kept so is the
memory a training step pays for it. Gradients come out in the dtype of what they are gradients of;
the arithmetic is float32 (no silent float64). Shape letters as in nn.py.
References: karpathy/llm.c `train_gpt2.c` (layernorm/attention/crossentropy backward), the chain
rule per op; Gemma 2's soft-caps d(c tanh(x/c))/dx = 1 - tanh^2(x/c).
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .. import nn
from ..contrastive import l2_normalize_backward, l2_normalize_forward  # noqa: F401 (re-exported: L2 norm lives there)

ONE_HOT_BUDGET = 1 << 24  # most one-hot entries (16 Mi floats, 64 MiB) a scatter-add builds at once


def _rows(a, n):  # [..., n] -> [rows, n]
    return array_namespace(a).reshape(a, (-1, n))


def add_grads(a, b):
    """Sum two gradient trees of one parameter tree (a tied weight used twice, two micro-batches)."""
    if isinstance(a, dict):
        return {k: add_grads(a[k], b[k]) for k in a}
    return a + b


# --- dense layers -------------------------------------------------------------------------------

def linear_forward(x, weight, bias=None):  # [..., in], [out, in], [out] -> [..., out]
    """Saves x (by reference: in*itemsize bytes per row, the activation) and the weight (by reference, free)."""
    return nn.linear(x, weight, bias), {"x": x, "weight": weight, "has_bias": bias is not None}


def linear_backward(dy, saved):  # [..., out] -> [..., in], {weight [out, in], bias [out]}
    xp = array_namespace(dy)
    x, w = saved["x"], saved["weight"]
    dy2 = _rows(dy, w.shape[0])  # [rows, out]: every leading axis is a batch axis
    grads = {"weight": xp.matrix_transpose(dy2) @ _rows(x, w.shape[1])}  # dW = dy^T x, summed over rows
    if saved["has_bias"]:
        grads["bias"] = xp.sum(dy2, axis=0)  # db = sum of dy over every broadcast (leading) axis
    return dy @ w, grads  # dx = dy W


def gelu_tanh_forward(x):  # [...] -> [...]
    """Saves x by reference: itemsize bytes per element."""
    return nn.gelu_tanh(x), {"x": x}


def gelu_tanh_backward(dy, saved):  # [...] -> [...]
    xp = array_namespace(dy)
    x = saved["x"]
    c = math.sqrt(2.0 / math.pi)
    t = xp.tanh(c * (x + 0.044715 * (x * x * x)))  # y = x/2 (1 + t)
    # dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * (x * x)))


def siglip_mlp_forward(x, fc1, fc2):  # [..., Dv] -> [..., Dv]
    """Saves x [.., D] (reference) and the pre-activation fc1(x) [.., F]: (D + F) * 4 bytes per row."""
    h, s1 = linear_forward(x, **fc1)  # [..., F]
    y, s2 = linear_forward(nn.gelu_tanh(h), **fc2)
    return y, {"fc1": s1, "h": h, "fc2": {**s2, "x": None}}  # gelu(h) is recomputed, not kept


def siglip_mlp_backward(dy, saved):  # [..., Dv] -> [..., Dv], {fc1: ..., fc2: ...}
    h = saved["h"]
    da, g2 = linear_backward(dy, {**saved["fc2"], "x": nn.gelu_tanh(h)})  # recompute a = gelu(h)
    dx, g1 = linear_backward(gelu_tanh_backward(da, {"x": h}), saved["fc1"])
    return dx, {"fc1": g1, "fc2": g2}


def geglu_forward(x, gate_proj, up_proj, down_proj):  # [..., D] -> [..., D]
    """Saves x [.., D] (reference), gate(x) and up(x) [.., F]: (D + 2F) * 4 bytes per row."""
    g, sg = linear_forward(x, **gate_proj)  # [..., F]
    u, su = linear_forward(x, **up_proj)  # [..., F]
    y, sd = linear_forward(nn.gelu_tanh(g) * u, **down_proj)
    return y, {"gate_proj": sg, "up_proj": su, "down_proj": {**sd, "x": None}, "g": g, "u": u}


def geglu_backward(dy, saved):  # [..., D] -> [..., D], {gate_proj, up_proj, down_proj}
    g, u = saved["g"], saved["u"]
    a = nn.gelu_tanh(g)
    dh, gd = linear_backward(dy, {**saved["down_proj"], "x": a * u})  # h = gelu(g) * u, recomputed
    dg = gelu_tanh_backward(dh * u, {"x": g})  # dh/dg = gelu'(g) u
    dx_g, gg = linear_backward(dg, saved["gate_proj"])
    dx_u, gu = linear_backward(dh * a, saved["up_proj"])  # dh/du = gelu(g)
    return dx_g + dx_u, {"gate_proj": gg, "up_proj": gu, "down_proj": gd}  # x feeds both branches: add


def _patches(pixels, P):  # [B, C, S, S] -> [B, N, C*P*P], nn.patch_embed's (c, kh, kw) order
    xp = array_namespace(pixels)
    B, C, Hs, Ws = pixels.shape
    x = xp.permute_dims(xp.reshape(pixels, (B, C, Hs // P, P, Ws // P, P)), (0, 2, 4, 1, 3, 5))
    return xp.reshape(x, (B, (Hs // P) * (Ws // P), C * P * P))


def patch_embed_forward(pixels, weight, bias):  # [B, C, S, S], [D, C, P, P], [D] -> [B, N, D]
    """Saves the pixels and weight by reference: nothing new (the patches are re-cut in the backward)."""
    return nn.patch_embed(pixels, weight, bias), {"pixels": pixels, "weight": weight}


def patch_embed_backward(dy, saved):  # [B, N, D] -> [B, C, S, S], {weight [D, C, P, P], bias [D]}
    xp = array_namespace(dy)
    pixels, w = saved["pixels"], saved["weight"]
    B, C, Hs, Ws = pixels.shape
    D, _, P, _ = w.shape
    w2 = xp.reshape(w, (D, C * P * P))
    dp, g = linear_backward(dy, {"x": _patches(pixels, P), "weight": w2, "has_bias": True})  # [B, N, C*P*P]
    dp = xp.reshape(dp, (B, Hs // P, Ws // P, C, P, P))
    dx = xp.reshape(xp.permute_dims(dp, (0, 3, 1, 4, 2, 5)), (B, C, Hs, Ws))  # the inverse of the cut's permute
    return dx, {"weight": xp.reshape(g["weight"], (D, C, P, P)), "bias": g["bias"]}


def position_add_forward(x, weight):  # [B, N, D], [N, D] -> [B, N, D]: SigLIP's learned position table
    """Saves nothing: the sum's Jacobian is the identity."""
    return x + weight, {}


def position_add_backward(dy, saved):  # [B, N, D] -> [B, N, D], {weight [N, D]}
    xp = array_namespace(dy)
    return dy, {"weight": xp.sum(dy, axis=0)}  # the table is broadcast over the batch: its gradient sums over it


# --- normalisation ------------------------------------------------------------------------------

def layer_norm_forward(x, weight, bias, eps=1e-6):  # [..., D], [D], [D] -> [..., D]
    """Saves x (reference), mean and std [.., 1] float32: 8 new bytes per row (+ D*itemsize for x)."""
    xp = array_namespace(x)
    h = xp.astype(x, xp.float32)
    mu = xp.mean(h, axis=-1, keepdims=True)
    std = xp.sqrt(xp.mean((h - mu) ** 2, axis=-1, keepdims=True) + eps)  # nn.layer_norm's expressions, in order
    y = xp.astype((h - mu) / std * weight + bias, x.dtype)
    return y, {"x": x, "mu": mu, "std": std, "weight": weight}


def layer_norm_backward(dy, saved):  # [..., D] -> [..., D], {weight [D], bias [D]}
    xp = array_namespace(dy)
    x, w = saved["x"], saved["weight"]
    D = w.shape[0]
    g = xp.astype(dy, xp.float32)
    xhat = (xp.astype(x, xp.float32) - saved["mu"]) / saved["std"]
    grads = {"weight": xp.astype(xp.sum(_rows(g * xhat, D), axis=0), w.dtype), "bias": xp.sum(_rows(g, D), axis=0)}
    dxhat = g * w
    # dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / std
    dx = (dxhat - xp.mean(dxhat, axis=-1, keepdims=True) - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True)) / saved["std"]
    return xp.astype(dx, x.dtype), grads


def rms_norm_forward(x, weight, eps=1e-6):  # [..., D], [D] -> [..., D]
    """Saves x (reference) and the rms [.., 1] float32: 4 new bytes per row (+ D*itemsize for x)."""
    xp = array_namespace(x)
    h = xp.astype(x, xp.float32)
    rms = xp.sqrt(xp.mean(h * h, axis=-1, keepdims=True) + eps)
    y = xp.astype(h / rms * (1.0 + xp.astype(weight, xp.float32)), x.dtype)  # Gemma's (1 + w) scale
    return y, {"x": x, "rms": rms, "weight": weight}


def rms_norm_backward(dy, saved):  # [..., D] -> [..., D], {weight [D]}
    xp = array_namespace(dy)
    x, w, rms = saved["x"], saved["weight"], saved["rms"]
    g = xp.astype(dy, xp.float32)
    xhat = xp.astype(x, xp.float32) / rms
    dw = xp.sum(_rows(g * xhat, w.shape[-1]), axis=0)  # d(1 + w)/dw = 1
    dxhat = g * (1.0 + xp.astype(w, xp.float32))
    dx = (dxhat - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True)) / rms  # dx = (dxhat - xhat mean(dxhat xhat)) / rms
    return xp.astype(dx, x.dtype), {"weight": xp.astype(dw, w.dtype)}


def batch_norm_forward(x, weight, bias, running_mean, running_var, *, training=False, momentum=0.1, eps=1e-5):
    """nn.batch_norm -> ((y, new_running_mean, new_running_var), saved); only y has a gradient.

    Saves x (reference), the batch mean and std [C]: 8 new bytes per channel.
    """
    xp = array_namespace(x)
    out = nn.batch_norm(x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = xp.mean(x, axis=axes) if training else running_mean
    var = xp.mean((x - _per_channel(mean, x.ndim)) ** 2, axis=axes) if training else running_var
    return out, {"x": x, "mean": mean, "std": xp.sqrt(var + eps), "weight": weight, "training": training}


def _per_channel(a, ndim):  # [C] -> [1, C, 1, ...]
    return array_namespace(a).reshape(a, (1, a.shape[0]) + (1,) * (ndim - 2))


def batch_norm_backward(dy, saved):  # [B, C, ...] -> [B, C, ...], {weight [C], bias [C]}
    xp = array_namespace(dy)
    x, w = saved["x"], saved["weight"]
    axes = tuple(i for i in range(x.ndim) if i != 1)
    std = _per_channel(saved["std"], x.ndim)
    xhat = (x - _per_channel(saved["mean"], x.ndim)) / std
    grads = {"weight": xp.sum(dy * xhat, axis=axes), "bias": xp.sum(dy, axis=axes)}
    dxhat = dy * _per_channel(w, x.ndim)
    if not saved["training"]:  # the running stats are constants
        return dxhat / std, grads
    # the batch statistics depend on x too: dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / std
    mean_dxhat, mean_dxhat_xhat = xp.mean(dxhat, axis=axes, keepdims=True), xp.mean(dxhat * xhat, axis=axes, keepdims=True)
    return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) / std, grads


# --- attention ----------------------------------------------------------------------------------

def softmax_forward(x, axis=-1):  # [...] -> [...] float32
    """Saves the output y (float32): 4 bytes per element."""
    y = nn.softmax(x, axis=axis)
    return y, {"y": y, "axis": axis, "dtype": x.dtype}


def softmax_backward(dy, saved):  # [...] -> [...]
    xp = array_namespace(dy)
    y = saved["y"]
    dx = y * (dy - xp.sum(dy * y, axis=saved["axis"], keepdims=True))  # dx = y (dy - <dy, y>)
    return xp.astype(dx, saved["dtype"])


def split_heads_forward(x, n_heads):  # [B, T, n*E] -> [B, n, T, E]; saves nothing
    return nn.split_heads(x, n_heads), {}


def split_heads_backward(dy, saved):  # [B, n, T, E] -> [B, T, n*E]: a permutation's VJP is its inverse
    return nn.merge_heads(dy)


def merge_heads_forward(x):  # [B, n, T, E] -> [B, T, n*E]; saves n
    return nn.merge_heads(x), {"n_heads": x.shape[1]}


def merge_heads_backward(dy, saved):  # [B, T, n*E] -> [B, n, T, E]
    return nn.split_heads(dy, saved["n_heads"])


def rope_forward(x, cos, sin):  # [B, H, T, E], [B|1, T, E] x2 -> [B, H, T, E]
    """Saves cos and sin by reference (computed once per step, shared by every layer): nothing new."""
    return nn.rope(x, cos, sin), {"cos": cos, "sin": sin}


def rope_backward(dy, saved):  # [B, H, T, E] -> [B, H, T, E]
    """A rotation's VJP is the inverse rotation: rotate by -angle, i.e. rope with -sin."""
    return nn.rope(dy, saved["cos"], -saved["sin"])


def attention_forward(q, k, v, mask=None, *, scale, softcap=None):
    """nn.attention's one-pass path, keeping the probabilities.

    q [B, H, T, E], k and v [B, K, S, E] (K | H), mask additive [B|1, 1, T, S] -> [B, H, T, E].
    Saves q, k, v (references: the activations) and p [B, H, T, S] float32: 4*S new bytes per query
    row per head. With a soft-cap the capped scores are recomputed from q and k in the backward (one
    more q k^T) rather than kept.
    """
    xp = array_namespace(q)
    B, H, T, E = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = xp.reshape(q, (B, K, G * T, E))  # the G query heads of a kv head stacked along rows
    s = xp.astype((qg @ xp.permute_dims(k, (0, 1, 3, 2))) * scale, xp.float32)  # [B, K, G*T, S]
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    s = xp.reshape(s, (B, K, G, T, S))
    if mask is not None:
        s = s + mask[:, :, None, :, :]
    p = xp.reshape(xp.astype(nn.softmax(s, axis=-1), v.dtype), (B, K, G * T, S))
    o = xp.reshape(p @ v, (B, H, T, E))
    return o, {"q": q, "k": k, "v": v, "p": p, "scale": scale, "softcap": softcap}


def attention_backward(do, saved):  # [B, H, T, E] -> (dq [B, H, T, E], dk [B, K, S, E], dv [B, K, S, E])
    xp = array_namespace(do)
    q, k, v, p = saved["q"], saved["k"], saved["v"], saved["p"]
    B, H, T, E = q.shape
    K = k.shape[1]
    G = H // K
    qg, dog = xp.reshape(q, (B, K, G * T, E)), xp.reshape(do, (B, K, G * T, E))
    dv = xp.matrix_transpose(p) @ dog  # [B, K, S, E]: the matmul over G*T rows sums the heads sharing v
    dp = dog @ xp.matrix_transpose(v)  # [B, K, G*T, S]
    ds = p * (dp - xp.sum(dp * p, axis=-1, keepdims=True))  # softmax VJP; the additive mask is a constant
    c = saved["softcap"]
    if c is not None:  # d(c tanh(s/c))/ds = 1 - tanh^2(s/c), s recomputed
        t = xp.tanh(xp.astype((qg @ xp.matrix_transpose(k)) * saved["scale"], xp.float32) / c)
        ds = ds * (1.0 - t * t)
    ds = ds * saved["scale"]
    dq = xp.reshape(ds @ k, (B, H, T, E))
    dk = xp.matrix_transpose(ds) @ qg  # [B, K, S, E]: summed over the G heads of the group
    return dq, dk, dv
