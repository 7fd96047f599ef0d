"""SigLIP's contrastive loss and its gradient with respect to every parameter of a two-tower model.

The loss is the one HF `SiglipModel(input_ids=..., pixel_values=..., return_loss=True)` returns:

    x = normalize(map_head(vision_tower(pixels)))   y = normalize(text_tower(ids))      [B, D] each
    L = exp(t') x y^T + b                                                             [B, B]
    loss = -1/B sum_ij log sigmoid(z_ij L_ij),  z = 2 I - 1   (HF: labels 2 eye - 1, the row sums averaged)

or, with loss="clip", CLIP's symmetric softmax cross-entropy over the same logits (the bias cancels in a
softmax: its gradient is zero). Only the diagonal pairs match: a batch that repeats a text asks the model to
tell the repeats apart (tools/train_siglip_shapes.py builds its batches without repeats). The texts are
padded to the model's max length and the padding is attended to, as HF does given no attention_mask.

    pixels --vision_model_forward (siglip_grad)--> [B, D] --l2--┐
    ids --embed + pos--> encoder --LN of the last token--> head --l2--┴--> logits --loss

The final LayerNorm is taken on the last position only: it is per token, so the values are HF's, and
only that position reaches the head. References: HF `modeling_siglip.py` (SiglipModel.forward,
SiglipTextTransformer); Zhai et al. 2023, eq. 1; big_vision `trainers/proj/image_text/siglip.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import array_namespace

from .. import nn_backward as NB
from ..contrastive import clip_loss_and_grads, siglip_loss_and_grads
from ..errors import ConfigError
from ..models.siglip_config import SiglipConfig, SiglipTextConfig
from .siglip_grad import encoder_block_backward, encoder_block_forward, vision_model_backward, vision_model_forward

LOSSES = ("sigmoid", "clip")


@dataclass
class ContrastiveBatch:
    """One batch of (image, text) pairs on the device."""

    pixels: object  # float32 [B, 3, S, S]
    ids: object  # int64 [B, T], T = max_position_embeddings (max-length padding, as trained)


def make_batch(tok, xp, pixels, texts) -> ContrastiveBatch:
    """Tokenise `texts` as HF's SiglipTokenizer(padding="max_length", truncation=True) and pair them with `pixels`."""
    rows, _ = tok(list(texts))
    return ContrastiveBatch(pixels, xp.asarray(rows, dtype=xp.int64))


# --- the text tower ------------------------------------------------------------------------------

def text_tower_forward(ids, embeddings, encoder, final_layer_norm, head, *, cfg: SiglipTextConfig):  # -> [B, Dp]
    """models.siglip_text.text_tower (no padding mask), saving per block; the ids by reference."""
    T = ids.shape[1]
    x, s_tok = NB.embed_forward(ids, embeddings["token_embedding"]["weight"], scale=1.0)  # [B, T, Dt], no sqrt(D)
    x = x + embeddings["position_embedding"]["weight"][:T, :]
    blocks = []
    for block in encoder["layers"]:
        x, s = encoder_block_forward(x, **block, cfg=cfg)
        blocks.append(s)
    h, s_ln = NB.layer_norm_forward(x[:, -1, :], **final_layer_norm, eps=cfg.layer_norm_eps)  # [B, Dt]: the last token
    y, s_head = NB.linear_forward(h, **head)  # [B, Dp]
    return y, {"tok": s_tok, "blocks": blocks, "final_layer_norm": s_ln, "head": s_head,
               "shape": tuple(x.shape), "positions": embeddings["position_embedding"]["weight"].shape[0]}


def text_tower_backward(dy, saved):  # [B, Dp] -> grads shaped like the `text_model` subtree
    xp = array_namespace(dy)
    B, T, D = saved["shape"]
    dh, g_head = NB.linear_backward(dy, saved["head"])
    dlast, g_ln = NB.layer_norm_backward(dh, saved["final_layer_norm"])
    dx = xp.concat([xp.zeros((B, T - 1, D), dtype=dlast.dtype), dlast[:, None, :]], axis=1)  # only the last token was read
    layers = []
    for s in reversed(saved["blocks"]):
        dx, g = encoder_block_backward(dx, s)
        layers.append(g)
    dpos = xp.sum(dx, axis=0)  # [T, Dt]: the table is shared by the batch
    unused = saved["positions"] - T
    if unused:  # rows past T were not looked up
        dpos = xp.concat([dpos, xp.zeros((unused, D), dtype=dpos.dtype)], axis=0)
    embeddings = {"token_embedding": NB.embed_backward(dx, saved["tok"]), "position_embedding": {"weight": dpos}}
    return {"embeddings": embeddings, "encoder": {"layers": layers[::-1]}, "final_layer_norm": g_ln, "head": g_head}


# --- the loss --------------------------------------------------------------------------------------

def loss_forward(params, batch: ContrastiveBatch, *, cfg: SiglipConfig, loss: str = "sigmoid"):  # -> (loss, saved)
    """Both towers' forwards; the embeddings' gradient comes with the loss (contrastive.py computes both at once)."""
    if loss not in LOSSES:
        raise ConfigError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    img, s_img = vision_model_forward(batch.pixels, params["vision_model"], cfg=cfg.vision)  # [B, D]
    txt, s_txt = text_tower_forward(batch.ids, **params["text_model"], cfg=cfg.text)  # [B, D]
    scale, bias = params["logit_scale"], params["logit_bias"]  # [1] each
    if loss == "clip":  # the bias adds one constant to every logit: a softmax ignores it
        value, g = clip_loss_and_grads(img, txt, scale)
        g["logit_bias"] = bias * 0.0
    else:
        value, g = siglip_loss_and_grads(img, txt, scale, bias)
    return value, {"img": s_img, "txt": s_txt, "g": g}


def loss_backward(saved):  # -> grads shaped like params
    xp = array_namespace(saved["g"]["image_embeds"])
    g = saved["g"]
    return {"vision_model": vision_model_backward(g["image_embeds"], saved["img"]),
            "text_model": text_tower_backward(g["text_embeds"], saved["txt"]),
            "logit_scale": xp.reshape(g["logit_scale"], (1,)), "logit_bias": xp.reshape(g["logit_bias"], (1,))}


def loss_and_grads(params, batch: ContrastiveBatch, cfg: SiglipConfig, loss: str = "sigmoid"):
    """(HF's SigLIP loss, or CLIP's with loss="clip", a float32 scalar array; its gradient, a tree like `params`)."""
    value, saved = loss_forward(params, batch, cfg=cfg, loss=loss)
    return value, loss_backward(saved)
