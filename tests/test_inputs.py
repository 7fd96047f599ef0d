"""The prompt layout and the masks built from it, against their definitions written out as loops.

layout_batch (npvlm/models/paligemma_inputs.py): left padding, 1-indexed positions over real tokens,
<image> slots numbered in order. prefix_lm_masks / decode_masks (npvlm/models/paligemma.py): the
prefix-LM rule allowed(q, k) = valid[k] and (k <= q or (prefix[q] and prefix[k])), with Gemma 2's
sliding window limiting the causal part to keys k > q - W. merge_image_features: image row n over
the n-th <image> slot of its own image. Exact comparisons throughout: these are integers and booleans.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import npvlm
from npvlm.models.paligemma import decode_masks, merge_image_features, prefix_lm_masks
from npvlm.models.paligemma_inputs import layout_batch
from npvlm.nn import MASK_MIN


def cfg(window=None):  # the two fields the masks read
    return SimpleNamespace(text=SimpleNamespace(is_gemma2=window is not None, sliding_window=window))


def test_layout_batch_left_pads_and_numbers_positions_from_1():
    img, pad = 7, 0
    seqs = [([img, img, 2, 11, 12, 13], [0, 0, 0, 0, 0, 1]),  # 2 image tokens, <bos>, prompt, one suffix token
            ([img, img, 2, 11], [0, 0, 0, 0])]
    out = layout_batch(seqs, pad_id=pad, image_id=img, num_image_tokens=2)
    assert out["ids"] == [[7, 7, 2, 11, 12, 13], [0, 0, 7, 7, 2, 11]]
    assert out["valid"] == [[True] * 6, [False, False, True, True, True, True]]
    assert out["prefix"] == [[True] * 5 + [False], [False, False, True, True, True, True]]
    assert out["positions"] == [[1, 2, 3, 4, 5, 6], [1, 1, 1, 2, 3, 4]]  # HF PaliGemma counts from 1
    assert out["image_slot"] == [[0, 1, -1, -1, -1, -1], [-1, -1, 0, 1, -1, -1]]


def test_layout_batch_refuses_a_wrong_image_token_count():
    with pytest.raises(npvlm.GenerationError, match="holds 3 <image> tokens, the model expects 4"):
        layout_batch([([5, 5, 5, 2, 9], [0] * 5)], pad_id=0, image_id=5, num_image_tokens=4)


def allowed_by_definition(valid, prefix, start, window):  # -> bool [B, T, S]
    B, S = valid.shape
    out = np.zeros((B, S - start, S), dtype=bool)
    for b in range(B):
        for q in range(start, S):
            for k in range(S):
                causal = k <= q and (window is None or k > q - window)
                out[b, q - start, k] = valid[b, k] and (causal or (prefix[b, q] and prefix[b, k]))
    return out


def visible(mask):  # additive [B, 1, T, S] -> bool [B, T, S]
    m = np.asarray(mask)
    assert set(np.unique(m)) <= {0.0, np.float32(MASK_MIN)}
    return m[:, 0] == 0.0


@pytest.mark.parametrize("window", [None, 2, 3])
@pytest.mark.parametrize("start", [0, 3])
def test_prefix_lm_masks_follow_the_definition(window, start):
    # row 0: 2 pads, a 4-token prefix, a 3-token suffix; row 1: no padding, a 6-token prefix, 3 suffix tokens
    valid = np.array([[False] * 2 + [True] * 7, [True] * 9])
    prefix = np.array([[False] * 2 + [True] * 4 + [False] * 3, [True] * 6 + [False] * 3])
    masks = prefix_lm_masks(valid, prefix, start, cfg=cfg(window))
    np.testing.assert_array_equal(visible(masks["full"]), allowed_by_definition(valid, prefix, start, None))
    np.testing.assert_array_equal(visible(masks["sliding"]), allowed_by_definition(valid, prefix, start, window))


@pytest.mark.parametrize("window", [None, 2, 4])
def test_decode_masks_see_the_valid_columns_up_to_their_own(window):
    key_valid = np.array([[False, True, True, True, True, True, True, True],
                          [True, True, True, False, True, True, True, True]])
    cols = np.array([5, 2])  # rows at different columns
    masks = decode_masks(key_valid, cols, cfg=cfg(window))
    for name, w in (("full", None), ("sliding", window)):
        got = visible(masks[name])[:, 0, :]  # [B, C]
        want = [[bool(key_valid[b, k]) and k <= cols[b] and (w is None or k > cols[b] - w) for k in range(8)]
                for b in range(2)]
        np.testing.assert_array_equal(got, np.array(want), err_msg=name)


def test_image_features_go_into_their_own_slots_in_order():
    B, T, N, D = 2, 6, 3, 4
    h = np.full((B, T, D), -1.0, dtype=np.float32)
    feats = np.arange(B * N * D, dtype=np.float32).reshape(B, N, D)  # every row distinct
    slot = np.array([[0, 1, 2, -1, -1, -1], [-1, -1, 0, 1, 2, -1]])  # row 1 is left-padded by 2
    out = np.asarray(merge_image_features(h, slot, feats))
    for b in range(B):
        for t in range(T):
            want = feats[b, slot[b, t]] if slot[b, t] >= 0 else h[b, t]
            np.testing.assert_array_equal(out[b, t], want, err_msg=f"row {b} position {t}")
