"""PaliGemma: a SigLIP image encoder, one linear projector and a Gemma decoder.

    image [B, 3, S, S] --SigLIP--> [B, N, Dv] --projector--> [B, N, D]  (image features)
    text  "<image>"*N <bos> prompt "\\n" [suffix <eos>]  --embed * sqrt(D)--> [B, L, D]
    the N <image> slots are overwritten, in order, by the image features
    --Gemma (prefix-LM mask)--> h [B, L, D] --tied head--> logits [B, L, V]

The attention mask is a *prefix-LM* mask: image, prompt and "\\n" (token type 0) see each other
in both directions; the suffix and every generated token (type 1) are causal and see the whole
prefix. Positions are 1-indexed, as HF PaliGemma counts them (RoPE depends only on offsets).

Matches HF transformers 5.x: only text embeddings are scaled by sqrt(D) and image features enter
as the projector emits them (transformers 4.x divided them by sqrt(D) and then scaled the whole
sequence, equal up to rounding; SPEC.md §5 describes that older form).

References: Beyer et al. 2024 "PaliGemma: A versatile 3B VLM for transfer"; Steiner et al. 2024
"PaliGemma 2"; HF `modeling_paligemma.py`; big_vision `models/proj/paligemma/paligemma.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import array_namespace

from .paligemma_config import PaliGemmaConfig
from ..kv_cache import KVCache
from .gemma import decoder, embed, lm_head
from ..nn import additive_mask, linear
from .siglip_vision import vision_tower


def image_features(pixels, params, *, cfg: PaliGemmaConfig):  # [B, 3, S, S] -> [B, N, D]
    v = vision_tower(pixels, **params["vision_tower"]["vision_model"], cfg=cfg.vision)  # [B, N, Dv]
    return linear(v, **params["multi_modal_projector"]["linear"])  # [B, N, D]


def merge_image_features(h, image_slot, feats):  # [B, T, D], [B, T] int (-1 = text), [B, N, D] -> [B, T, D]
    """Write image feature row `image_slot[b, t]` of image b over each <image> position."""
    xp = array_namespace(h)
    B, T, D = h.shape
    N = feats.shape[1]
    rows = xp.reshape(xp.arange(B, dtype=image_slot.dtype), (B, 1)) * N + xp.where(image_slot >= 0, image_slot, 0)
    picked = xp.take(xp.reshape(feats, (B * N, D)), xp.reshape(rows, (B * T,)), axis=0)  # [B*T, D]
    return xp.where((image_slot >= 0)[..., None], xp.astype(xp.reshape(picked, (B, T, D)), h.dtype), h)


def prefix_lm_masks(valid, prefix, start: int, *, cfg: PaliGemmaConfig):
    """Additive masks [B, 1, T, S] for the queries at start..S-1 over all S keys.

    valid [B, S] bool: real tokens (False on left padding); prefix [B, S] bool: token type 0.
    allowed(q, k) = valid[k] and (k <= q or (prefix[q] and prefix[k])); on Gemma 2's sliding
    layers the causal part is also limited to the last `sliding_window` keys (k > q - W), as HF does.
    """
    xp = array_namespace(valid)
    S = valid.shape[1]
    qi = xp.reshape(xp.arange(start, S), (S - start, 1))  # [T, 1]
    ki = xp.reshape(xp.arange(S), (1, S))  # [1, S]
    causal = ki <= qi  # [T, S]
    bidir = prefix[:, start:, None] & prefix[:, None, :]  # [B, T, S]
    keys = valid[:, None, :]  # [B, 1, S]
    full = additive_mask(((causal[None, ...] | bidir) & keys)[:, None, ...])
    W = cfg.text.sliding_window
    if not (cfg.text.is_gemma2 and W):
        return {"full": full, "sliding": full}
    local = causal & (ki > qi - W)
    return {"full": full, "sliding": additive_mask(((local[None, ...] | bidir) & keys)[:, None, ...])}


def forward(params, ids, positions, masks, *, cfg: PaliGemmaConfig, image_slot=None, feats=None, cache=None, at=0,
            last_only=False, probs_out=None):
    """One decoder pass: ids [B, T], positions [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).
    `probs_out`: a list that gets each layer's attention weights of the last query [B, H, 1, S]."""
    lm = params["language_model"]["model"]
    h = embed(ids, lm["embed_tokens"], cfg=cfg.text)  # [B, T, D]
    if feats is not None:
        h = merge_image_features(h, image_slot, feats)
    h = decoder(h, positions, masks, lm["layers"], lm["norm"], cfg=cfg.text, cache=cache, at=at,
                probs_out=probs_out, last_only=last_only)  # [B, T, D]; [B, 1, D] with last_only
    if last_only:
        h = h[:, -1:, :]  # generation needs the next-token logits only: skips most of the V-wide head (and, in
        #                   the decoder, the last layer's work for the other positions)
    return lm_head(h, lm["embed_tokens"], cfg=cfg.text)


# --- generation: one prefill, then one fixed-shape decode step per token ------------------------

@dataclass
class DecodeState:
    """Everything a decode step reads, in arrays whose shapes never change from step to step.

    ids [B, 1] the token each row feeds          positions [B, 1] its RoPE position (1-indexed)
    cols [B] the cache column it is written to    key_valid [B, C] columns that may be attended:
    real prompt tokens and every column after the prompt (padding is False); a step sees the valid
    columns up to its own, so rows can sit at different columns (a server's running batch)."""

    cache: KVCache
    ids: object
    positions: object
    cols: object
    key_valid: object


def prefill(params, prompt, feats, cache: KVCache, *, cfg: PaliGemmaConfig, probs_out=None):
    """Run the whole prompt into a fresh cache: -> (next-token logits [B, V], the DecodeState at its last
    token; `advance` it with the chosen ids to feed them).

    prompt: the device arrays of a laid-out batch (ids, positions, valid, prefix, image_slot, all [B, T]);
    feats: the projected image features [B, N, D]; probs_out: see forward (the last prompt token's weights)."""
    xp = array_namespace(prompt.ids)
    B, T = prompt.ids.shape
    masks = prefix_lm_masks(prompt.valid, prompt.prefix, 0, cfg=cfg)
    logits = forward(params, prompt.ids, prompt.positions, masks, cfg=cfg, image_slot=prompt.image_slot, feats=feats,
                     cache=cache, at=0, last_only=True, probs_out=probs_out)  # [B, 1, V]
    after = xp.ones((B, cache.capacity - T), dtype=xp.bool)  # every generated token is real
    state = DecodeState(cache, ids=prompt.ids[:, -1:], positions=prompt.positions[:, -1:],
                        cols=xp.full((B,), T - 1, dtype=prompt.ids.dtype), key_valid=xp.concat([prompt.valid, after], axis=1))
    return logits[:, -1, :], state


def decode_masks(key_valid, cols, *, cfg: PaliGemmaConfig):  # [B, C] bool, [B] int -> {"full", "sliding"} [B, 1, 1, C]
    """A generated token is causal: it sees the valid columns up to its own (on Gemma 2's sliding
    layers, only the last `sliding_window` of them), as prefix_lm_masks gives for a type-1 query."""
    xp = array_namespace(key_valid)
    C = key_valid.shape[1]
    ki = xp.reshape(xp.arange(C, dtype=cols.dtype), (1, C))
    q = xp.reshape(cols, (-1, 1))  # [B, 1]
    full = additive_mask((key_valid & (ki <= q))[:, None, None, :])
    W = cfg.text.sliding_window
    if not (cfg.text.is_gemma2 and W):
        return {"full": full, "sliding": full}
    return {"full": full, "sliding": additive_mask((key_valid & (ki <= q) & (ki > q - W))[:, None, None, :])}


def decode_step(params, state: DecodeState, *, cfg: PaliGemmaConfig, probs_out=None):  # -> next-token logits [B, V]
    """Feed state.ids at state.positions, written into cache column state.cols of each row
    (`probs_out`: see forward; each layer's weights of the fed token over the C cache columns)."""
    masks = decode_masks(state.key_valid, state.cols, cfg=cfg)
    logits = forward(params, state.ids, state.positions, masks, cfg=cfg, cache=state.cache, at=state.cols,
                     probs_out=probs_out)
    return logits[:, -1, :]


def image_attention(probs, image_slot, n_image: int):  # L x [B, H, 1, S], [B, T] int -> [B, L, N] float32
    """The weights that the query put on each of the N image tokens (in image order), per layer, averaged over
    heads: `probs` from prefill / decode_step's probs_out; image_slot the prompt's (its first T columns)."""
    xp = array_namespace(image_slot)
    T = image_slot.shape[1]
    pick = xp.astype(image_slot[:, :, None] == xp.arange(n_image, dtype=image_slot.dtype), xp.float32)  # [B, T, N]
    heads = xp.stack([xp.mean(p[:, :, 0, :T], axis=1) for p in probs], axis=1)  # [B, L, T]
    return heads @ pick  # one 1.0 per image column, so each weight is copied exactly


def advance(state: DecodeState, next_ids) -> DecodeState:  # next_ids [B] int, on the device
    """The state for the next step: feed `next_ids`, one position and one column further on."""
    xp = array_namespace(next_ids)
    B = state.ids.shape[0]
    return DecodeState(state.cache, ids=xp.reshape(xp.astype(next_ids, state.ids.dtype), (B, 1)),
                       positions=state.positions + 1, cols=state.cols + 1, key_valid=state.key_valid)
