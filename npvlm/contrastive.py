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
