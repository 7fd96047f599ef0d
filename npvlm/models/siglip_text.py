"""The SigLIP text tower (HF `SiglipTextTransformer`).

ids [B, T] (T <= max_position_embeddings; padded to exactly that length, as in training)
  -> token_embedding + position_embedding[:T]       (no sqrt(D) scale, unlike Gemma)
  -> L pre-LayerNorm encoder blocks, NO causal mask (unlike CLIP): every token sees every token
     (optionally the pads are hidden as keys: `valid`)
  -> final_layer_norm -> the LAST position's state  (HF: `pooled_output = last_hidden_state[:, -1, :]`,
     which after max-length padding is a pad token; SPEC.md §13)
  -> head: Linear(Dt, projection_size) -> [B, Dp]

References: Zhai et al. 2023 "Sigmoid Loss for Language Image Pre-Training"; HF transformers
`modeling_siglip.py`; big_vision `models/proj/image_text/text_transformer.py`.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .siglip_config import SiglipTextConfig
from .siglip_vision import encoder_block
from ..nn import additive_mask, layer_norm, linear


def text_embeddings(ids, token_embedding, position_embedding):  # [B, T] int -> [B, T, Dt]
    xp = array_namespace(token_embedding["weight"])
    B, T = ids.shape
    e = xp.take(token_embedding["weight"], xp.reshape(ids, (B * T,)), axis=0)  # [B*T, Dt]
    return xp.reshape(e, (B, T, e.shape[-1])) + position_embedding["weight"][:T, :]  # + [T, Dt], position t at row t


def text_tower(ids, embeddings, encoder, final_layer_norm, head, *, cfg: SiglipTextConfig, valid=None):
    """[B, T] ids -> [B, Dp]: the pooled, projected (not yet normalised) text embedding; the keywords are the
    `text_model` subtree. `valid` (bool [B, T], optional) hides padding keys from every query, as HF does when
    given an attention_mask (transformers 5's tokenizer returns one); without it every token sees every token,
    as in training (big_vision) and HF `SiglipModel(input_ids=...)`."""
    x = text_embeddings(ids, **embeddings)  # [B, T, Dt]
    mask = None
    if valid is not None:
        xp = array_namespace(x)
        B, T = ids.shape
        mask = xp.broadcast_to(additive_mask(valid)[:, None, None, :], (B, 1, T, T))  # keys only, never causal
    for block in encoder["layers"]:
        x = encoder_block(x, **block, cfg=cfg, mask=mask)
    x = layer_norm(x, **final_layer_norm, eps=cfg.layer_norm_eps)
    return linear(x[:, -1, :], **head)  # [B, Dt] -> [B, Dp]
