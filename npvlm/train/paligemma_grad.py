"""PaliGemma's fine-tuning loss and its gradient with respect to every parameter.

The loss is the one HF `PaliGemmaForConditionalGeneration` returns for
`processor(images, text=prefix, suffix=suffix)`: labels = input_ids with the prefix (token type 0:
image, <bos>, prompt, "\\n") and the padding set to -100, and the mean cross-entropy of
logits[:, :-1] against labels[:, 1:] over the counted tokens: the suffix tokens and the closing <eos>
(HF `loss_utils.ForCausalLMLoss` pads the labels by one and shifts; the same thing).

Batches are padded on the RIGHT with positions 1..T on every row, which is what HF computes when it is
given no position_ids (its positions ignore the attention mask), so a right-padded batch means the
same thing to both. Padding is masked as a key and counted by no label.

    pixels --vision_tower--> --projector--> feats [B, N, D] ─┐
    ids --embed * sqrt(D)--> [B, T, D] --write feats over <image>--> decoder --tied head--> logits --CE--> loss

The backward walks the same road back: the head's and the lookup's gradients of the tied
embed_tokens are added; the <image> positions send their gradient to the image features, not to the
lookup (the lookup's output there was overwritten).
References: HF `modeling_paligemma.py`, `processing_paligemma.py`, `loss/loss_utils.py`; Beyer et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import array_namespace

from .. import nn_backward as NB
from ..models.paligemma import merge_image_features, prefix_lm_masks
from ..models.paligemma_config import PaliGemmaConfig
from ..models.paligemma_inputs import check_length, check_vocab, prompt_ids
from .gemma_grad import decoder_backward, decoder_forward
from .siglip_grad import vision_tower_backward, vision_tower_forward

IGNORE = -100  # HF's ignore_index


@dataclass
class TrainBatch:
    """One right-padded training batch on the device: pixels [B, 3, S, S] float32, the rest [B, T]."""

    pixels: object
    ids: object  # int64 (padding = pad_token_id)
    positions: object  # int64, 1..T on every row (HF's default position_ids)
    valid: object  # bool, False on the right padding
    prefix: object  # bool, token type 0 and real: attended bidirectionally
    image_slot: object  # int64, 0..N-1 at <image> positions, -1 elsewhere
    labels: object  # int64, the ids on the suffix and its <eos>, -100 elsewhere (unshifted, as HF's processor)


def make_batch(tok, cfg: PaliGemmaConfig, xp, pixels, prefixes, suffixes) -> TrainBatch:
    """Tokenise (prefix, suffix) pairs as PaliGemmaProcessor does and lay them out right-padded."""
    seqs = [prompt_ids(tok, p, cfg.num_image_tokens, suffix=s) for p, s in zip(prefixes, suffixes)]
    T = max(len(ids) for ids, _ in seqs)
    check_length(cfg, T, 0)
    host = {k: [] for k in ("ids", "valid", "prefix", "image_slot", "labels")}
    for ids, types in seqs:
        pad = T - len(ids)
        slots = [0] * len(ids)
        count = 0
        for i, t in enumerate(ids):
            slots[i] = count if t == cfg.image_token_index else -1
            count += t == cfg.image_token_index
        host["ids"].append(list(ids) + [cfg.pad_token_id] * pad)
        host["valid"].append([True] * len(ids) + [False] * pad)
        host["prefix"].append([ty == 0 for ty in types] + [False] * pad)
        host["image_slot"].append(slots + [-1] * pad)
        host["labels"].append([t if ty == 1 else IGNORE for t, ty in zip(ids, types)] + [IGNORE] * pad)
    check_vocab(host["ids"], cfg.text.vocab_size)
    positions = [list(range(1, T + 1)) for _ in seqs]
    arr = lambda v, dt: xp.asarray(v, dtype=dt)  # noqa: E731
    return TrainBatch(pixels, arr(host["ids"], xp.int64), arr(positions, xp.int64), arr(host["valid"], xp.bool),
                      arr(host["prefix"], xp.bool), arr(host["image_slot"], xp.int64), arr(host["labels"], xp.int64))


def image_features_forward(pixels, params, *, cfg: PaliGemmaConfig):  # [B, 3, S, S] -> [B, N, D]
    v, s_vis = vision_tower_forward(pixels, **params["vision_tower"]["vision_model"], cfg=cfg.vision)  # [B, N, Dv]
    y, s_proj = NB.linear_forward(v, **params["multi_modal_projector"]["linear"])
    return y, {"vision": s_vis, "projector": s_proj}


def image_features_backward(dy, saved):  # [B, N, D] -> {"vision_tower": ..., "multi_modal_projector": ...}
    dv, g_proj = NB.linear_backward(dy, saved["projector"])
    return {"vision_tower": {"vision_model": vision_tower_backward(dv, saved["vision"])},
            "multi_modal_projector": {"linear": g_proj}}


def merge_image_features_backward(dh, image_slot, N):  # [B, T, D], [B, T] -> (d text embeddings, d feats [B, N, D])
    """The VJP of merge_image_features: <image> rows go to their feature row (a one-hot [B, N, T] matmul,
    the array API has no scatter); the text embeddings get zeros there."""
    xp = array_namespace(dh)
    is_img = (image_slot >= 0)[..., None]  # [B, T, 1]
    hot = xp.astype(image_slot[:, None, :] == xp.reshape(xp.arange(N, dtype=image_slot.dtype), (1, N, 1)), dh.dtype)
    return xp.where(is_img, xp.zeros_like(dh), dh), hot @ dh  # [B, T, D], [B, N, T] @ [B, T, D]


def loss_forward(params, batch: TrainBatch, *, cfg: PaliGemmaConfig):  # -> (loss scalar float32, saved)
    lm = params["language_model"]["model"]
    feats, s_img = image_features_forward(batch.pixels, params, cfg=cfg)  # [B, N, D]
    h, s_emb = NB.embed_forward(batch.ids, lm["embed_tokens"]["weight"])  # [B, T, D], times sqrt(D)
    h = merge_image_features(h, batch.image_slot, feats)
    masks = prefix_lm_masks(batch.valid, batch.prefix, 0, cfg=cfg)
    h, s_dec = decoder_forward(h, batch.positions, masks, lm["layers"], lm["norm"], cfg=cfg.text)
    logits, s_head = NB.lm_head_forward(h, lm["embed_tokens"]["weight"], softcap=cfg.text.final_logit_softcapping or None)
    loss, s_ce = NB.cross_entropy_forward(logits[:, :-1, :], batch.labels[:, 1:], ignore_index=IGNORE)  # token t predicts t+1
    return loss, {"img": s_img, "emb": s_emb, "dec": s_dec, "head": s_head, "ce": s_ce, "image_slot": batch.image_slot,
                  "N": feats.shape[1], "logits_shape": tuple(logits.shape)}


def loss_backward(saved, dloss: float = 1.0, *, vision: bool = True):  # -> grads shaped like params
    """vision=False: leave out the vision tower's and the projector's gradients (and their backward's work),
    for training that keeps them frozen."""
    dl = NB.cross_entropy_backward(dloss, saved["ce"])  # [B, T-1, V]
    xp = array_namespace(dl)
    B, T, V = saved["logits_shape"]
    dlogits = xp.concat([dl, xp.zeros((B, 1, V), dtype=dl.dtype)], axis=1)  # the last position predicts nothing
    dh, g_head = NB.lm_head_backward(dlogits, saved["head"])
    dh, g_dec = decoder_backward(dh, saved["dec"])
    dtext, dfeats = merge_image_features_backward(dh, saved["image_slot"], saved["N"])
    g_embed = NB.add_grads(NB.embed_backward(dtext, saved["emb"]), g_head)  # the tied table: lookup + head
    lm = {"embed_tokens": {"weight": g_embed["weight"]}, "layers": g_dec["layers"], "norm": g_dec["norm"]}
    towers = image_features_backward(dfeats, saved["img"]) if vision else {}
    return {**towers, "language_model": {"model": lm}}


def loss_and_grads(params, batch: TrainBatch, cfg: PaliGemmaConfig, *, vision: bool = True):
    """(HF's suffix loss, float32 scalar array; its gradient, a tree shaped like `params`; with vision=False
    only the language model's subtree, the vision tower and projector taken as frozen)."""
    loss, saved = loss_forward(params, batch, cfg=cfg)
    return loss, loss_backward(saved, vision=vision)
