"""PaliGemma 2 (a Gemma 2 decoder) against HF transformers, on random checkpoints written here.

Gemma 2 adds four norms per layer, attention and final logit soft-caps, query_pre_attn_scalar,
GQA, and a sliding window on the even layers. HF's eager attention is the reference: its SDPA
path skips the attention soft-cap. Tolerance as for PaliGemma 1: max |logit difference| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

import npvlm
from namespaces import each_backend
from hf_ref import hf_generate, hf_logits, image, write

G2 = dict(model_type="gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
SHAPES = {
    "pg2-gqa": dict(G2, hidden=24, heads=4, kv_heads=2, head_dim=8, layers=2, query_pre_attn_scalar=8,
                    image_size=32, patch_size=8),
    "pg2-mqa-hd16": dict(G2, hidden=20, heads=2, kv_heads=1, head_dim=16, layers=3, query_pre_attn_scalar=20,
                         image_size=16, patch_size=8),
    "pg2-small-caps": dict(G2, hidden=16, heads=4, kv_heads=4, head_dim=6, layers=2, query_pre_attn_scalar=6,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, image_size=24, patch_size=8),
    # a window of 8 over a 16-token image + prompt + 32 generated tokens: the window changes the result
    "pg2-window8": dict(G2, hidden=24, heads=4, kv_heads=2, head_dim=8, layers=4, query_pre_attn_scalar=8,
                        sliding_window=8, image_size=32, patch_size=8),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(SHAPES))
def ckpt(request, tmp_path_factory):
    return write(tmp_path_factory.mktemp(request.param), seed=21 + len(request.param), **SHAPES[request.param])


def test_config_is_gemma2(ckpt):
    cfg = npvlm.load(ckpt).config.text
    assert cfg.is_gemma2 and cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"


@pytest.mark.parametrize("prompt,suffix", [("caption en", None), ("answer en what color is it?", "a blue square")])
def test_logits_match_hf(ckpt, prompt, suffix):
    ours, ref = npvlm.load(ckpt).logits(image(2), prompt, suffix), hf_logits(ckpt, image(2), prompt, suffix)
    assert np.abs(ours - ref).max() <= TOL, f"{np.abs(ours - ref).max():.2e}"


@each_backend
def test_greedy_32_tokens_equal_hf(ckpt, backend):
    model = npvlm.load(ckpt, backend=backend)
    prompts = ["caption en", "detect red circle"]
    ref, margin = hf_generate(ckpt, [image(8), image(9)], prompts, max_new_tokens=32)
    assert margin > 1e-3, f"near-tie {margin:.1e}"
    assert [o.token_ids for o in model.generate([image(8), image(9)], prompts, max_new_tokens=32)] == ref
    assert model.generate(image(8), prompts[0], max_new_tokens=32).token_ids == ref[0]


def test_the_sliding_window_changes_the_result(tmp_path):
    # the same weights with a window wider than the sequence: logits must differ, or the test above proves nothing
    narrow = write(tmp_path / "w8", seed=33, **SHAPES["pg2-window8"])
    wide = write(tmp_path / "w4096", seed=33, **dict(SHAPES["pg2-window8"], sliding_window=4096))
    # HF keeps the prefix (image + prompt) bidirectional whatever the window: only causal tokens feel it
    prompt, suffix = "caption en", "a red circle left of a blue square and a green triangle"
    a, b = npvlm.load(narrow).logits(image(1), prompt), npvlm.load(wide).logits(image(1), prompt)
    assert np.array_equal(a, b)
    a, b = npvlm.load(narrow).logits(image(1), prompt, suffix), npvlm.load(wide).logits(image(1), prompt, suffix)
    assert np.abs(a - b).max() > 1e-2
    gen_a = npvlm.load(narrow).generate(image(1), "caption en", max_new_tokens=32).token_ids
    gen_b = npvlm.load(wide).generate(image(1), "caption en", max_new_tokens=32).token_ids
    assert gen_a != gen_b
