"""The layers of PaliGemma, as pure functions over arrays of any array-API namespace.

No array library is imported here: each function asks its inputs for their namespace
(`xp = array_namespace(x)`), so the same code runs under NumPy, CuPy or array_api_strict.
Parameters arrive as keyword arguments named like the leaves of the HF checkpoint, in
PyTorch's layout (a Linear weight is [out, in] and y = x @ W.T + b), so the loaded tree is
the file: `linear(x, **params["q_proj"])`.

Shape legend
    B batch            T new tokens this call     S cached + new tokens (keys)
    D width            H query heads              K key/value heads (H % K == 0; K=1 is MQA)
    E head dim         F MLP width                V vocabulary
    C channels (3)     P patch side               N patches = (image side / P)^2

Numerics follow the references: statistics, softmax and RoPE angles in float32, the result cast
back to the input's dtype; scalars are Python floats so nothing is silently widened to float64.
Casts say `copy=False` (a float32 input is not copied to make it float32), and a shape check builds
its message only when it fails: the reference path of a decode step allocates nothing it does not use.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .errors import ShapeError
from .fast_ops import fast_path
from .packed import PackedWeight

MASK_MIN = -3.4028234663852886e38  # finfo(float32).min: a finite "minus infinity" (no NaN rows)
SCORE_BUDGET = 1 << 25  # most attention scores held at once (32 Mi floats, 128 MiB): queries go in blocks past it


def _shape_error(layer: str, what: str, got) -> ShapeError:
    """Built only when a check fails: a decode step formats no message strings."""
    return ShapeError(f"{layer}: expected {what}, got {got}")


# --- dense layers -------------------------------------------------------------------------------

@fast_path(on=1)  # dispatched on the weight: packed (16/8-bit) weights bring their own kernel
def linear(x, weight, bias=None):  # [..., in], [out, in], [out] -> [..., out]
    if isinstance(weight, PackedWeight):  # 16/8-bit weight without a kernel: widen it whole, then as float32
        weight = weight.widen()
    if not (weight.ndim == 2 and x.shape[-1] == weight.shape[1]):
        width = weight.shape[-1] if weight.ndim == 2 else "?"
        raise _shape_error("linear", f"x[..., {width}] for weight {tuple(weight.shape)}", tuple(x.shape))
    y = x @ weight.T
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise _shape_error("linear", f"bias of shape ({weight.shape[0]},)", tuple(bias.shape))
        y = y + bias
    return y


@fast_path
def gelu_tanh(x):  # [...] -> [...]; the tanh approximation both towers use (not exact erf)
    xp = array_namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def siglip_mlp(x, fc1, fc2):  # [..., Dv] -> [..., Dv]
    return linear(gelu_tanh(linear(x, **fc1)), **fc2)


def geglu(x, gate_proj, up_proj, down_proj):  # [..., D] -> [..., D]: down(gelu(gate(x)) * up(x))
    return linear(gelu_tanh(linear(x, **gate_proj)) * linear(x, **up_proj), **down_proj)


def patch_embed(pixels, weight, bias):  # [B, C, S, S], [D, C, P, P], [D] -> [B, N, D]
    """A conv with stride = kernel = P, done as reshape + matmul (patches row-major, (c, kh, kw) order)."""
    xp = array_namespace(pixels)
    if not (pixels.ndim == 4 and weight.ndim == 4 and pixels.shape[1] == weight.shape[1]):
        raise _shape_error("patch_embed", f"pixels [B, {weight.shape[1]}, S, S]", tuple(pixels.shape))
    B, C, Hs, Ws = pixels.shape
    D, _, P, P2 = weight.shape
    if not (P == P2 and tuple(bias.shape) == (D,)):
        raise _shape_error("patch_embed", f"a square kernel [D, C, P, P] and bias [{D}]",
                           (tuple(weight.shape), tuple(bias.shape)))
    if not (Hs % P == 0 and Ws % P == 0):
        raise _shape_error("patch_embed", f"an image side divisible by the patch size {P}", (Hs, Ws))
    gh, gw = Hs // P, Ws // P
    x = xp.reshape(pixels, (B, C, gh, P, gw, P))
    x = xp.permute_dims(x, (0, 2, 4, 1, 3, 5))  # [B, gh, gw, C, P, P]
    x = xp.reshape(x, (B, gh * gw, C * P * P))  # [B, N, C*P*P]
    return linear(x, xp.reshape(weight, (D, C * P * P)), bias)


# --- normalisation ------------------------------------------------------------------------------

@fast_path
def layer_norm(x, weight, bias, eps=1e-6):  # [..., D], [D], [D] -> [..., D]
    xp = array_namespace(x)
    if not (weight.ndim == 1 and tuple(bias.shape) == tuple(weight.shape) and x.shape[-1] == weight.shape[0]):
        raise _shape_error("layer_norm", f"x[..., D], weight [D], bias [D] with D = {weight.shape[-1]}",
                           (tuple(x.shape), tuple(weight.shape), tuple(bias.shape)))
    h = xp.astype(x, xp.float32, copy=False)
    mu = xp.mean(h, axis=-1, keepdims=True)
    var = xp.mean((h - mu) ** 2, axis=-1, keepdims=True)  # biased, as the paper and torch
    y = (h - mu) / xp.sqrt(var + eps) * weight + bias
    return xp.astype(y, x.dtype, copy=False)


@fast_path
def rms_norm(x, weight, eps=1e-6):  # [..., D], [D] -> [..., D]
    """Gemma's RMSNorm: float32 statistics, scale (1 + w) (w is stored as an offset), cast back last."""
    xp = array_namespace(x)
    if not (x.shape[-1] == weight.shape[-1]):
        raise _shape_error("rms_norm", f"x[..., {weight.shape[-1]}]", tuple(x.shape))
    h = xp.astype(x, xp.float32, copy=False)
    h = h / xp.sqrt(xp.mean(h * h, axis=-1, keepdims=True) + eps)
    return xp.astype(h * (1.0 + xp.astype(weight, xp.float32, copy=False)), x.dtype, copy=False)


def batch_norm(x, weight, bias, running_mean, running_var, *, training=False, momentum=0.1, eps=1e-5):
    """BatchNorm over axis 1 (channels) of [B, C, ...]: returns (y, new_running_mean, new_running_var).

    PaliGemma and SigLIP do not use it (both towers normalise per token: LayerNorm, RMSNorm); it is
    here because the design card names it, for readers comparing the three norms, and is tested
    against torch.nn.functional.batch_norm in both modes (tests/test_nn.py).

    Training normalises with the batch mean and *biased* variance, and moves the running stats
    towards the batch ones with `momentum`, using the *unbiased* variance, as torch does.
    Eval normalises with the running stats. Pure: the running stats are returned, not mutated.
    """
    xp = array_namespace(x)
    C = weight.shape[0]
    if not (x.ndim >= 2 and x.shape[1] == C):
        raise _shape_error("batch_norm", f"x[B, {C}, ...]", tuple(x.shape))
    for name, a in (("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if not (tuple(a.shape) == (C,)):
            raise _shape_error("batch_norm", f"{name} of shape ({C},)", tuple(a.shape))
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = (1, C) + (1,) * (x.ndim - 2)  # broadcast per channel
    if training:
        n = math.prod(x.shape[i] for i in axes)
        if not (n > 1):
            raise _shape_error("batch_norm", "more than one value per channel in training mode", tuple(x.shape))
        mean = xp.mean(x, axis=axes)
        var = xp.mean((x - xp.reshape(mean, shape)) ** 2, axis=axes)  # biased, for normalising
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * (var * (n / (n - 1)))  # unbiased
    else:
        mean, var, new_mean, new_var = running_mean, running_var, running_mean, running_var
    y = (x - xp.reshape(mean, shape)) / xp.sqrt(xp.reshape(var, shape) + eps)
    return y * xp.reshape(weight, shape) + xp.reshape(bias, shape), new_mean, new_var


# --- attention ----------------------------------------------------------------------------------

@fast_path
def softmax(x, axis=-1):  # [...] -> [...], float32, max-subtracted so exp never overflows
    xp = array_namespace(x)
    h = xp.astype(x, xp.float32, copy=False)
    e = xp.exp(h - xp.max(h, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def rope_angles(positions, head_dim, theta=10000.0):  # [B, T] int -> cos, sin [B, T, E] float32
    """RoPE in the split-half ("NeoX", rotate_half) convention, angles in float32 as HF computes them."""
    xp = array_namespace(positions)
    exponent = xp.astype(xp.arange(0, head_dim, 2), xp.float32) / head_dim  # [E/2], float32 as in HF
    inv_freq = 1.0 / xp.astype(theta ** xp.astype(exponent, xp.float64), xp.float32)  # pow rounded once, as torch's
    ang = xp.astype(positions, xp.float32)[..., None] * inv_freq  # [B, T, E/2]
    ang = xp.concat([ang, ang], axis=-1)  # [B, T, E]
    return xp.cos(ang), xp.sin(ang)


@fast_path
def rope(x, cos, sin):  # [B, H, T, E], [B, T, E], [B, T, E] -> [B, H, T, E]
    xp = array_namespace(x)
    if not (x.ndim == 4 and cos.ndim == 3 and tuple(cos.shape) == tuple(sin.shape) and cos.shape[0] in (1, x.shape[0])
            and x.shape[2:] == cos.shape[1:] and x.shape[-1] % 2 == 0):
        raise _shape_error("rope", "x [B, H, T, E] with cos and sin [B | 1, T, E], E even",
                           (tuple(x.shape), tuple(cos.shape), tuple(sin.shape)))
    half = x.shape[-1] // 2
    rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    cos, sin = xp.astype(cos[:, None, ...], x.dtype, copy=False), xp.astype(sin[:, None, ...], x.dtype, copy=False)
    return x * cos + rotated * sin


def split_heads(x, n_heads):  # [B, T, n*E] -> [B, n, T, E]
    xp = array_namespace(x)
    B, T, W = x.shape
    if not (W % n_heads == 0):
        raise _shape_error("split_heads", f"a width divisible by {n_heads} heads", tuple(x.shape))
    return xp.permute_dims(xp.reshape(x, (B, T, n_heads, W // n_heads)), (0, 2, 1, 3))


def merge_heads(x):  # [B, n, T, E] -> [B, T, n*E]
    xp = array_namespace(x)
    B, n, T, E = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B, T, n * E))


@fast_path
def attention(q, k, v, mask=None, *, scale, softcap=None):
    """Scaled dot-product attention for MHA, GQA and MQA.

    q [B, H, T, E], k and v [B, K, S, E], mask additive [B, 1, T, S] (0 = see, MASK_MIN = hidden)
    -> [B, H, T, E]: attention_probs(q, k, mask) @ v, query head h reading kv head h // (H / K).
    """
    xp = array_namespace(q)
    if not (q.ndim == 4):
        raise _shape_error("attention", "q [B, H, T, E]", tuple(q.shape))
    B, H, T, E = q.shape
    rows = max(1, SCORE_BUDGET // max(1, B * H * k.shape[2]))
    if T > rows:  # a long prefill (4k+ tokens at 896px): build the [T, S] scores a block of queries at a time
        cuts = [(i, min(i + rows, T)) for i in range(0, T, rows)]
        blocks = [attention(q[:, :, a:b, :], k, v, None if mask is None else mask[:, :, a:b, :], scale=scale,
                            softcap=softcap) for a, b in cuts]
        return xp.concat(blocks, axis=2)
    if not (k.shape == v.shape):
        raise _shape_error("attention", f"k and v [B={B}, K | {H}, S, E={E}]", (tuple(k.shape), tuple(v.shape)))
    K, S = k.shape[1], k.shape[2]
    p = xp.astype(_probs(xp, q, k, mask, scale, softcap), v.dtype, copy=False)  # [B, H, T, S]
    o = xp.reshape(p, (B, K, (H // K) * T, S)) @ v  # [B, K, G*T, E]
    return xp.reshape(o, (B, H, T, E))


def attention_probs(q, k, mask=None, *, scale, softcap=None):  # -> float32 [B, H, T, S]
    """softmax(mask + softcap(scale * q k^T)): the weights `attention` puts on each key.

    The kv heads are never copied: the H / K query heads of a group are stacked along T and share
    one matmul. Gemma 2's soft-cap s = c * tanh(s / c) comes after the scale and before the mask.
    """
    return _probs(array_namespace(q), q, k, mask, scale, softcap)


def _probs(xp, q, k, mask, scale, softcap):  # attention_probs, the namespace given (attention's hot path)
    B, H, T, E = q.shape
    if not (k.ndim == 4 and k.shape[0] == B and k.shape[-1] == E and H % k.shape[1] == 0):
        raise _shape_error("attention", f"k and v [B={B}, K | {H}, S, E={E}]", tuple(k.shape))
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = xp.reshape(q, (B, K, G * T, E))  # heads of a group share their kv head
    s = (qg @ xp.permute_dims(k, (0, 1, 3, 2))) * scale  # [B, K, G*T, S]
    s = xp.astype(s, xp.float32, copy=False)
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    s = xp.reshape(s, (B, K, G, T, S))
    if mask is not None:
        if not (mask.ndim == 4 and mask.shape[0] in (1, B) and mask.shape[1] == 1 and mask.shape[-2:] == (T, S)):
            raise _shape_error("attention", f"mask [{B} | 1, 1, {T}, {S}]", tuple(mask.shape))
        s = s + mask[:, :, None, :, :]  # [B, 1, 1, T, S]
    return xp.reshape(softmax(s, axis=-1), (B, H, T, S))


def additive_mask(allowed):  # bool [...] -> float32 [...]: 0 where allowed, MASK_MIN elsewhere
    xp = array_namespace(allowed)
    return xp.where(allowed, xp.asarray(0.0, dtype=xp.float32), xp.asarray(MASK_MIN, dtype=xp.float32))
