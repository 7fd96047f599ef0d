"""CLIP and SigLIP losses against HF transformers' own formulas, under every namespace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npvlm import contrastive as C
from npvlm.errors import ShapeError

try:
    from .namespaces import HYPOTHESIS, assert_close, each_namespace
except ImportError:
    from namespaces import HYPOTHESIS, assert_close, each_namespace


def hf_siglip_loss(img, txt, scale, bias):  # transcribed from transformers' SiglipModel.forward
    img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
    logits_per_text = txt @ img.t() * torch.tensor(scale).exp() + bias
    eye = torch.eye(logits_per_text.size(0))
    loglik = torch.nn.functional.logsigmoid((2 * eye - 1) * logits_per_text)
    return -loglik.sum(dim=-1).mean()


def hf_clip_loss(img, txt, scale):
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

    img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
    return clip_loss(txt @ img.t() * torch.tensor(scale).exp())


@each_namespace
@HYPOTHESIS
@given(n=st.integers(1, 9), d=st.integers(1, 17), scale=st.floats(-1.0, 5.0), bias=st.floats(-12.0, 3.0),
       seed=st.integers(0, 2**16))
def test_losses_match_hf(ns, n, d, scale, bias, seed):
    rng = np.random.default_rng(seed)
    img, txt = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    logits = C.pair_logits(ns.put(img), ns.put(txt), ns.put(np.float32(scale)), bias)
    ti, tt = torch.from_numpy(img), torch.from_numpy(txt)
    # log-sigmoid / log-softmax of logits up to e^5 * 1 + 12 ~ 160 in float32: ~1e-5 relative per term
    assert_close(ns, C.siglip_loss(logits), hf_siglip_loss(ti, tt, scale, bias), rtol=2e-5, atol=2e-5)
    logits0 = C.pair_logits(ns.put(img), ns.put(txt), ns.put(np.float32(scale)))
    assert_close(ns, C.clip_loss(logits0), hf_clip_loss(ti, tt, scale), rtol=2e-5, atol=2e-5)


@each_namespace
def test_losses_reward_matching_pairs(ns):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    scale, bias = C.siglip_init()
    good = C.pair_logits(ns.put(x), ns.put(x), ns.put(np.float32(scale)), bias)  # text i == image i
    bad = C.pair_logits(ns.put(x), ns.put(x[::-1].copy()), ns.put(np.float32(scale)), bias)
    assert float(ns.get(C.siglip_loss(good))) < float(ns.get(C.siglip_loss(bad)))
    assert float(ns.get(C.clip_loss(good))) < float(ns.get(C.clip_loss(bad)))


@each_namespace
def test_log_sigmoid_is_stable_at_the_extremes(ns):
    x = ns.put(np.array([-200.0, -30.0, 0.0, 30.0, 200.0], dtype=np.float32))
    want = torch.nn.functional.logsigmoid(torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0]))
    assert_close(ns, C.log_sigmoid(x), want, rtol=1e-6, atol=1e-7)  # no inf, no NaN


def test_losses_need_square_logits():
    with pytest.raises(ShapeError, match=r"siglip_loss: expected square logits \[n, n\], got \(2, 3\)"):
        C.siglip_loss(np.zeros((2, 3), np.float32))
    with pytest.raises(ShapeError, match="pair_logits"):
        C.pair_logits(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), np.float32(0.0))
