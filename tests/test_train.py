"""Fine-tuning PaliGemma in npvlm against torch autograd through HF's own model.

1. npvlm.train.paligemma_grad.loss_and_grads: the loss HF's PaliGemmaForConditionalGeneration returns for
   processor(images, text=prefix, suffix=suffix) (right padding), and its gradient w.r.t. every parameter,
   on random PaliGemma 1 and PaliGemma 2 checkpoints (MHA/GQA/MQA, soft-caps, a sliding window that matters).
2. `npvlm finetune`: N SGD / AdamW steps give the weights torch gives for the same steps on HF's model.

Tolerance: per tensor, max|ours - torch| <= 1e-4 * max|torch| (the worst tensor is named on failure). Every
gradient is float32 arithmetic some 10-20 matmuls and reductions deep (vision tower, projector, decoder, tied
head), summed in a different order than torch sums it; an elementwise rtol would be meaningless for entries
that are sums of cancelling terms, so the error is measured against the tensor's own scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import npvlm
from hf_ref import image, write
from npvlm.models.paligemma_inputs import load_images, pixel_batch
from npvlm.models.paligemma_schema import canonical_name
from npvlm.train.paligemma_grad import loss_and_grads, make_batch

TOL = 1e-4
G2 = dict(model_type="gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
SHAPES = {
    "pg1-mqa": dict(hidden=16, heads=2, kv_heads=1, head_dim=8, layers=2, image_size=16, patch_size=8),
    "pg1-mha": dict(hidden=16, heads=2, kv_heads=2, head_dim=8, layers=1, image_size=16, patch_size=8),
    # GQA; small caps so the tanh is far from linear; a window of 4 over ~4 image + ~10 text tokens
    "pg2-gqa-window4": dict(G2, hidden=24, heads=4, kv_heads=2, head_dim=8, layers=2, query_pre_attn_scalar=8,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4,
                            image_size=16, patch_size=8),
    "pg2-mqa": dict(G2, hidden=20, heads=2, kv_heads=1, head_dim=16, layers=3, query_pre_attn_scalar=20,
                    image_size=16, patch_size=8),
}
PREFIXES = ["caption en", "detect red circle ; blue square"]
SUFFIXES = ["a red circle left of a blue square", "<loc0001> red circle"]


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flatten(v, f"{prefix}{k}.").items()}
    if isinstance(tree, list):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in flatten(v, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def worst(ours: dict, ref: dict):
    """(the largest per-tensor max|diff| / scale, its name); the key sets must be equal.

    scale = max|ref| of the tensor, floored at 1e-3 of the largest gradient of the model (a tensor whose
    gradient is tiny next to the rest is held to the model's scale). The SigLIP k_proj biases are left out
    here: their gradient is exactly zero in exact arithmetic (b adds q.b to every score of a row, which
    softmax ignores), so both sides hold rounding noise; test_siglip_key_bias_gradient_is_zero checks them."""
    assert sorted(ours) == sorted(ref)
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ref.values())
    ref = {k: v for k, v in ref.items() if not k.endswith("self_attn.k_proj.bias")}
    errs = {k: float(np.abs(np.asarray(ours[k]) - ref[k]).max() / max(np.abs(ref[k]).max(), floor)) for k in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


def hf_batch(model_dir, images, prefixes, suffixes):
    from transformers import PaliGemmaProcessor

    proc = PaliGemmaProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "right"  # training pads on the right (see paligemma_grad)
    return proc(images=list(images), text=["<image>" + p for p in prefixes], suffix=list(suffixes),
                return_tensors="pt", padding="longest")


def hf_loss_and_grads(model_dir, images, prefixes, suffixes):
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    inputs = hf_batch(model_dir, images, prefixes, suffixes)
    with torch.enable_grad():  # other test modules turn autograd off for the whole process
        loss = model(**inputs).loss
        loss.backward()
    grads = {canonical_name(n): p.grad.numpy() for n, p in model.named_parameters()}
    return float(loss.detach()), {k: v for k, v in grads.items() if k is not None}, inputs


@pytest.fixture(scope="module", params=sorted(SHAPES))
def ckpt(request, tmp_path_factory):
    return write(tmp_path_factory.mktemp(request.param), seed=7 + len(request.param), **SHAPES[request.param])


@pytest.mark.parametrize("rows", [1, 2])
def test_loss_and_every_gradient_equal_torch_autograd_through_hf(ckpt, rows):
    m = npvlm.load(ckpt)
    imgs = [image(3 + i) for i in range(rows)]
    batch = make_batch(m.tokenizer, m.config, np, pixel_batch(load_images(imgs), m.processor, m.backend),
                       PREFIXES[:rows], SUFFIXES[:rows])
    loss, grads = loss_and_grads(m.params, batch, m.config)
    ref_loss, ref, inputs = hf_loss_and_grads(ckpt, imgs, PREFIXES[:rows], SUFFIXES[:rows])
    assert np.array_equal(np.asarray(batch.ids), inputs["input_ids"].numpy())  # the same tokens and labels as HF's
    assert np.array_equal(np.asarray(batch.labels), inputs["labels"].numpy())
    assert abs(float(loss) - ref_loss) <= TOL * abs(ref_loss)
    err, name = worst(flatten(grads), ref)
    assert err <= TOL, f"worst tensor {name}: {err:.2e}"
    top = max(float(np.abs(v).max()) for v in ref.values())
    for k in (k for k in ref if k.endswith("self_attn.k_proj.bias")):  # zero up to float32 rounding of the rest
        assert np.abs(flatten(grads)[k]).max() <= 1e-5 * top and np.abs(ref[k]).max() <= 1e-5 * top, k


def test_the_sliding_window_changes_the_loss(tmp_path):
    # the pg2 window-4 shapes with a window wider than the sequence: the loss must differ, or the test
    # above would pass with the window ignored
    def loss_of(window):
        d = write(tmp_path / f"w{window}", seed=9, **dict(SHAPES["pg2-gqa-window4"], sliding_window=window))
        m = npvlm.load(d)
        b = make_batch(m.tokenizer, m.config, np, pixel_batch(load_images([image(3)]), m.processor, m.backend),
                       PREFIXES[:1], SUFFIXES[:1])
        return float(loss_and_grads(m.params, b, m.config)[0])
    assert abs(loss_of(4) - loss_of(4096)) > 1e-3
