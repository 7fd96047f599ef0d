"""Contrastive image-text losses: CLIP's softmax (InfoNCE) and SigLIP's sigmoid.

Both score every image of a batch against every text: logits[i, j] = t * <x_i, y_j> (+ b), with
x and y L2-normalised embeddings and t = exp(t') a learned temperature. They differ in what they
ask of the [n, n] logit matrix:

    CLIP   (Radford et al. 2021): each row and each column is a softmax over n candidates whose
           right answer is the diagonal:  L = -1/(2n) sum_i [log softmax_row(i)_i + log softmax_col(i)_i]
    SigLIP (Zhai et al. 2023):    each pair is its own binary question, z_ij = +1 on the diagonal,
           -1 elsewhere:          L = -1/n sum_i sum_j log sigmoid(z_ij * (t <x_i, y_j> + b))

SigLIP needs no batch-wide normalisation (no softmax over the batch), which is what lets it scale
to huge batches split across devices; its bias b (init -10) offsets the n^2 - n negatives.
Functions take arrays of any array-API namespace. References: HF `modeling_clip.clip_loss`,
`modeling_siglip.SiglipModel.forward`; big_vision `trainers/proj/image_text/siglip.py`.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

from .errors import ShapeError


def l2_normalize(x, axis=-1, eps=1e-12):  # [..., D] -> [..., D] of unit length
    xp = array_namespace(x)
    return x / xp.maximum(xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True)), eps)


def l2_normalize_forward(x, axis=-1, eps=1e-12):  # [..., D] -> [..., D]; the same values as l2_normalize
    """Saves the output y and the (clamped) norm n [.., 1]: (D + 1) * 4 bytes per row."""
    xp = array_namespace(x)
    n = xp.maximum(xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True)), eps)
    y = x / n
    return y, {"y": y, "n": n, "axis": axis, "eps": eps}


def l2_normalize_backward(dy, saved):  # [..., D] -> [..., D]
    """dx = (dy - y <dy, y>) / |x| (the radial part of dy removed); below eps the norm is a constant: dx = dy / eps."""
    xp = array_namespace(dy)
    y, n = saved["y"], saved["n"]
    live = xp.astype(n > saved["eps"], dy.dtype)  # 0 where the clamp held the norm at eps (torch's clamp_min too)
    return (dy - y * (xp.sum(dy * y, axis=saved["axis"], keepdims=True) * live)) / n


def log_sigmoid(x):  # log(1 / (1 + e^-x)), stable for large |x|: min(x, 0) - log1p(e^-|x|)
    xp = array_namespace(x)
    return xp.minimum(x, 0.0) - xp.log1p(xp.exp(-xp.abs(x)))


def log_softmax(x, axis=-1):  # x - logsumexp(x), max-subtracted
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    return x - m - xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))


def pair_logits(image_embeds, text_embeds, logit_scale, logit_bias=0.0):  # [n, D], [m, D] -> [n, m]
    """t * cos(x_i, y_j) + b with t = exp(logit_scale): logits_per_image (its transpose is per text)."""
    if image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ShapeError(f"pair_logits: expected image and text embeddings of one width, got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    xp = array_namespace(image_embeds)
    x, y = l2_normalize(image_embeds), l2_normalize(text_embeds)
    return (x @ xp.matrix_transpose(y)) * xp.exp(logit_scale) + logit_bias


def _diagonal(n, xp, dtype):  # the identity as a float mask: the matching pairs
    i = xp.arange(n)
    return xp.astype(i[:, None] == i[None, :], dtype)


def clip_loss(logits):  # [n, n] logits_per_image -> scalar
    """Symmetric cross-entropy: image i must pick text i among n, and text i image i."""
    xp = array_namespace(logits)
    n = logits.shape[0]
    _square(logits, "clip_loss")
    eye = _diagonal(n, xp, logits.dtype)
    per_image = -xp.sum(log_softmax(logits, axis=1) * eye) / n
    per_text = -xp.sum(log_softmax(logits, axis=0) * eye) / n
    return (per_image + per_text) / 2.0


def siglip_loss(logits):  # [n, n] logits (with bias) -> scalar
    """Every pair a binary decision: sum over j of -log sigmoid(z_ij * logits_ij), averaged over i."""
    xp = array_namespace(logits)
    n = logits.shape[0]
    _square(logits, "siglip_loss")
    z = 2.0 * _diagonal(n, xp, logits.dtype) - 1.0  # +1 matching, -1 otherwise
    return -xp.sum(log_sigmoid(z * logits)) / n


def siglip_init():  # (logit_scale, logit_bias) as the paper starts them: t' = log 10, b = -10
    return math.log(10.0), -10.0


def _square(logits, name):
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ShapeError(f"{name}: expected square logits [n, n], got {tuple(logits.shape)}")


# --- losses with their gradients --------------------------------------------------------------------
# Both return (loss, grads) with grads named like what they are gradients of: {"image_embeds" [n, D],
# "text_embeds" [n, D] (the un-normalised embeddings), "logit_scale" (t', t = exp(t')), "logit_bias"}.
# The diagonal (matching) terms are written apart, as O(n D) dot products, so no [n, n] identity is built.

def _scalar(v, xp):  # a Python float or a 0-d array -> a 0-d float32 array
    return xp.asarray(v, dtype=xp.float32)


def clip_loss_and_grads(image_embeds, text_embeds, logit_scale):  # [n, D], [n, D], t' -> loss, grads
    """CLIP's symmetric InfoNCE and its gradients.

    logits L = t X Y^T;  loss = 1/(2n) [sum_i lse_row_i + sum_j lse_col_j] - 1/n sum_i L_ii
    dL/dL_ij = (softmax_row(L)_ij + softmax_col(L)_ij) / (2n) - delta_ij / n
    Peak memory: three [n, n] float32 matrices (the column softmax needs the whole matrix).
    """
    xp = array_namespace(image_embeds)
    n = image_embeds.shape[0]
    x, sx = l2_normalize_forward(image_embeds)
    y, sy = l2_normalize_forward(text_embeds)
    t = xp.exp(_scalar(logit_scale, xp))
    L = (x @ xp.matrix_transpose(y)) * t  # [n, n]
    mr, mc = xp.max(L, axis=1, keepdims=True), xp.max(L, axis=0, keepdims=True)  # [n, 1], [1, n]
    P = xp.exp(L - mr)  # row softmax, unnormalised
    sr = xp.sum(P, axis=1, keepdims=True)
    L -= mc  # in place: L is ours, and the column pass is its last use
    Q = xp.exp(L)
    del L
    sc = xp.sum(Q, axis=0, keepdims=True)
    diag = xp.sum(x * y, axis=-1) * t  # [n]: L_ii
    loss = (xp.sum(mr[:, 0] + xp.log(sr[:, 0])) + xp.sum(mc[0, :] + xp.log(sc[0, :]))) / (2.0 * n) - xp.sum(diag) / n
    P /= sr * (2.0 * n)
    Q /= sc * (2.0 * n)
    P += Q  # dL/dL_ij without the diagonal's -1/n
    del Q
    gx, gy = P @ y, xp.matrix_transpose(P) @ x  # [n, D]
    dt = xp.sum(x * gx) * t - xp.sum(diag) / n  # dL/dt' = sum_ij dL/dL_ij L_ij
    dx, dy = t * (gx - y / n), t * (gy - x / n)
    grads = {"image_embeds": l2_normalize_backward(dx, sx), "text_embeds": l2_normalize_backward(dy, sy),
             "logit_scale": dt}
    return loss, grads


def _sigmoid_block(x, y, t, b):  # [n, D], [c, D] normalised -> (sum softplus(L), sigmoid(L)) of L = t x y^T + b [n, c]
    xp = array_namespace(x)
    L = (x @ xp.matrix_transpose(y)) * t + b  # [n, c]
    e = xp.abs(L)
    e *= -1.0
    e = xp.exp(e)  # e^-|L|, shared by softplus and sigmoid, never overflows
    total = xp.sum(xp.maximum(L, 0.0)) + xp.sum(xp.log1p(e))  # softplus(L) = max(L, 0) + log1p(e^-|L|)
    S = xp.where(L < 0.0, e, 1.0)  # sigmoid(L) = {1 | e^L} / (1 + e^-|L|): no cancellation on either side
    del L
    e += 1.0
    S /= e
    return total, S


def siglip_loss_chunked(image_embeds, text_embeds, logit_scale, logit_bias, chunk):  # -> loss, grads
    """SigLIP's sigmoid loss and its gradients, the texts taken `chunk` at a time.

    Every pair is a negative (-log sigmoid(-L) = softplus(L)) except the diagonal, which instead adds
    -log sigmoid(L_ii) = softplus(L_ii) - L_ii:   loss = 1/n [sum_ij softplus(L_ij) - sum_i L_ii]
    dL/dL_ij = (sigmoid(L_ij) - delta_ij) / n.  No row or column normalisation, so each block of
    texts is independent: the paper's multi-device form (each device's texts passed round in turn)
    on one device. Peak memory ~ 3 n*chunk floats for the block plus O(n D); not n^2.
    """
    xp = array_namespace(image_embeds)
    n, D = image_embeds.shape
    x, sx = l2_normalize_forward(image_embeds)
    y, sy = l2_normalize_forward(text_embeds)
    t, b = xp.exp(_scalar(logit_scale, xp)), _scalar(logit_bias, xp)
    total, sum_s = xp.asarray(0.0, dtype=xp.float32), xp.asarray(0.0, dtype=xp.float32)
    gx, gy = xp.zeros((n, D), dtype=x.dtype), []
    for a in range(0, n, chunk):
        yc = y[a:min(a + chunk, n), :]  # [c, D]: the texts visiting this block
        part, S = _sigmoid_block(x, yc, t, b)  # [n, c]
        total, sum_s = total + part, sum_s + xp.sum(S)
        gx = gx + S @ yc  # sum_j sigmoid(L_ij) y_j, accumulated over the visiting chunks
        gy.append(xp.matrix_transpose(S) @ x)  # [c, D]: this chunk's texts are done
        del S
    gy = xp.concat(gy, axis=0)
    xy = xp.sum(x * y, axis=-1)  # [n]: <x_i, y_i>
    loss = (total - xp.sum(xy * t + b)) / n
    dt = t * (xp.sum(x * gx) - xp.sum(xy)) / n  # dL/dt' = sum_ij dL/dL_ij (L_ij - b)
    db = (sum_s - n) / n
    dx, dy = (t / n) * (gx - y), (t / n) * (gy - x)
    grads = {"image_embeds": l2_normalize_backward(dx, sx), "text_embeds": l2_normalize_backward(dy, sy),
             "logit_scale": dt, "logit_bias": db}
    return loss, grads


def siglip_loss_and_grads(image_embeds, text_embeds, logit_scale, logit_bias):  # [n, D] x2, t', b -> loss, grads
    """SigLIP's sigmoid loss and its gradients in one [n, n] block (peak ~3 n^2 floats)."""
    return siglip_loss_chunked(image_embeds, text_embeds, logit_scale, logit_bias, chunk=max(1, image_embeds.shape[0]))
