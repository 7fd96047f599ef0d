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

from array_api_compat import array_namespace

from .config import PaliGemmaConfig
from .errors import GenerationError
from .gemma import decoder, embed, lm_head
from .nn import additive_mask, linear
from .siglip import vision_tower


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


def forward(params, ids, positions, masks, *, cfg: PaliGemmaConfig, image_slot=None, feats=None, cache=None,
            start=0, last_only=False):
    """One decoder pass: ids [B, T], positions [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only)."""
    lm = params["language_model"]["model"]
    h = embed(ids, lm["embed_tokens"], cfg=cfg.text)  # [B, T, D]
    if feats is not None:
        h = merge_image_features(h, image_slot, feats)
    h = decoder(h, positions, masks, **lm, cfg=cfg.text, cache=cache, start=start)  # [B, T, D]
    if last_only:
        h = h[:, -1:, :]  # generation needs the next-token logits only: skips most of the V-wide head
    return lm_head(h, lm["embed_tokens"], cfg=cfg.text)


def layout_batch(seqs, *, pad_id: int, image_id: int, num_image_tokens: int):
    """Left-pad token sequences into the host lists a forward pass needs.

    seqs: list of (input_ids, token_type_ids). Returns a dict of [B, T] Python lists:
    ids, valid (bool), prefix (bool, type 0 and real), positions (1-indexed over real tokens),
    image_slot (0..N-1 at <image> positions, -1 elsewhere).
    """
    T = max(len(ids) for ids, _ in seqs)
    out = {k: [] for k in ("ids", "valid", "prefix", "positions", "image_slot")}
    for b, (ids, types) in enumerate(seqs):
        n_img = sum(1 for t in ids if t == image_id)
        if n_img != num_image_tokens:
            raise GenerationError(f"sequence {b} holds {n_img} <image> tokens, the model expects {num_image_tokens}")
        pad = T - len(ids)
        slot, count = [], 0
        for t in ids:
            slot.append(count if t == image_id else -1)
            count += t == image_id
        out["ids"].append([pad_id] * pad + list(ids))
        out["valid"].append([False] * pad + [True] * len(ids))
        out["prefix"].append([False] * pad + [ty == 0 for ty in types])
        out["positions"].append([1] * pad + list(range(1, len(ids) + 1)))
        out["image_slot"].append([-1] * pad + slot)
    return out
