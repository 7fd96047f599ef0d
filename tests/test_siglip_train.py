"""Training SigLIP in npvlm against torch autograd through HF's own modules (transformers 5.24).

1. The two pieces the two-tower model adds to the vision tower, each against torch autograd (hypothesis
   shapes, the gradient of a random projection of the output): the MAP pooling head (HF
   SiglipMultiheadAttentionPoolingHead, a torch nn.MultiheadAttention inside) and the text tower (HF
   SiglipTextModel: embeddings + positions, bidirectional encoder, final LayerNorm, last token, head).
2. npvlm.train.siglip_model_grad.loss_and_grads: HF SiglipModel(..., return_loss=True)'s loss, CLIP's softmax
   loss over the same logits, and the same-text-positives sigmoid loss, with their gradient w.r.t. every
   parameter of random HF-written SiglipModel checkpoints (tests/test_siglip.py's three shapes).

Whole-model tolerance, as tests/test_train.py: per tensor, max|ours - torch| <= 1e-4 * max|torch| (floored at
1e-3 of the model's largest gradient). Gradients whose exact value is zero (every k_proj bias: it adds q.b to
a whole row of scores, which softmax ignores; logit_bias under the CLIP loss) hold only rounding noise on the
torch side and are checked to be tiny instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import npvlm
from npvlm.io.checkpoint import unflatten
from npvlm.models.paligemma_inputs import load_images, pixel_batch
from npvlm.train.siglip_grad import map_head_backward, map_head_forward
from npvlm.train.siglip_model_grad import loss_and_grads, make_batch, text_tower_backward, text_tower_forward
from tests.namespaces import HYPOTHESIS, each_namespace
from tests.test_siglip import checkpoint, image

TOL = 1e-4
TEXTS = ["a red square", "two dogs on the left", "über café", "a red square"]  # the last repeats the first


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flatten(v, f"{prefix}{k}.").items()}
    if isinstance(tree, list):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in flatten(v, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def zero_in_exact_arithmetic(name):
    return name.endswith("self_attn.k_proj.bias")


def worst(ours: dict, ref: dict, skip=()):
    """(the largest per-tensor max|diff| / scale, its name) over the tensors not in `skip`; equal key sets."""
    assert sorted(ours) == sorted(ref)
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ref.values())
    errs = {k: float(np.abs(np.asarray(ours[k]) - ref[k]).max() / max(np.abs(ref[k]).max(), floor))
            for k in ref if k not in skip and not zero_in_exact_arithmetic(k)}
    name = max(errs, key=errs.get)
    return errs[name], name


def put_tree(ns, tree):  # a host parameter tree (dicts and lists) -> the same tree in namespace ns
    if isinstance(tree, dict):
        return {k: put_tree(ns, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [put_tree(ns, v) for v in tree]
    return ns.put(tree)


def load_state(module, flat):
    """Host float32 params -> an HF module's, in float64: the per-op reference is torch autograd in float64, the
    exact answer our float32 is held to (a LayerNorm over a nearly constant row is ill-conditioned, and torch's
    float32 then errs as much as ours)."""
    module.double()
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(flat[n]).double())


def close(got, want, mag, rtol=1e-5):
    """|got - want| <= rtol (|want| + mag) elementwise, mag the op's largest gradient: an entry that is a sum of
    cancelling terms (a k gradient over one key, a LayerNorm of width 1) carries the terms' rounding, not its own."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape
    want = want.astype(np.float32)
    return bool(np.all(np.abs(got - want) <= rtol * (np.abs(want) + mag)))


def largest(*arrays):
    return max(float(np.abs(a).max()) for a in arrays)


# --- 1. the MAP head and the text tower on their own ---------------------------------------------------

@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 3), N=st.integers(1, 9), heads=st.integers(1, 3), E=st.integers(1, 6),
       F=st.integers(1, 13), seed=st.integers(0, 2**32 - 1))
def test_map_head_backward_matches_torch(ns, B, N, heads, E, F, seed):
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    D = heads * E
    cfg = SiglipVisionConfig(hidden_size=D, num_attention_heads=heads, intermediate_size=F)
    ref = SiglipMultiheadAttentionPoolingHead(cfg)
    rng = np.random.default_rng(seed)
    flat = {n: (rng.standard_normal(tuple(p.shape)) * 0.5).astype(np.float32) for n, p in ref.named_parameters()}
    load_state(ref, flat)
    x, R = rng.standard_normal((B, N, D)).astype(np.float32), rng.standard_normal((B, D)).astype(np.float32)
    y, saved = map_head_forward(ns.put(x), **put_tree(ns, unflatten(flat)), cfg=cfg)
    dx, grads = map_head_backward(ns.put(R), saved)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (ref(xt) * torch.from_numpy(R)).sum().backward()
    want_y = ref(torch.from_numpy(x).double()).detach().numpy()
    assert close(ns.get(y), want_y, largest(want_y))  # a few float32 matmuls deep: 1e-5, as above
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    mag = largest(xt.grad.numpy(), *ref_grads.values())
    assert close(ns.get(dx), xt.grad.numpy(), mag)  # 1e-5 relative, the floor at 1e-5 of the op's largest gradient
    for name, g in flatten(grads).items():
        assert close(ns.get(g), ref_grads[name], mag), name  # as above


@each_namespace
@HYPOTHESIS
@given(B=st.integers(1, 3), T=st.integers(1, 6), extra=st.integers(0, 2), heads=st.integers(1, 3),
       E=st.integers(1, 5), layers=st.integers(1, 2), P=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_text_tower_backward_matches_torch(ns, B, T, extra, heads, E, layers, P, seed):
    from transformers import SiglipTextConfig, SiglipTextModel

    D, V = heads * E, 11
    cfg = SiglipTextConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D + 1, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=T + extra, projection_size=P)
    ref = SiglipTextModel(cfg).eval()
    rng = np.random.default_rng(seed)
    flat = {n: (rng.standard_normal(tuple(p.shape)) * 0.5).astype(np.float32) for n, p in ref.named_parameters()}
    load_state(ref, flat)
    ids = rng.integers(0, V, (B, T))
    ids[0, :2] = 3  # a repeated id: its table row gets both gradients
    R = rng.standard_normal((B, P)).astype(np.float32)
    from npvlm.models.siglip_config import SiglipTextConfig as Ours

    ours = Ours(vocab_size=V, hidden_size=D, intermediate_size=2 * D + 1, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=T + extra, projection_size=P)
    y, saved = text_tower_forward(ns.put(ids), **put_tree(ns, unflatten(flat)), cfg=ours)
    grads = flatten(text_tower_backward(ns.put(R), saved))
    with torch.enable_grad():
        (ref(input_ids=torch.from_numpy(ids)).pooler_output * torch.from_numpy(R).double()).sum().backward()
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    mag = largest(*ref_grads.values())
    for name, want in ref_grads.items():  # positions past T get exactly zero, as torch's
        # 1e-5 relative, the floor at 1e-5 of the tower's largest gradient: 1-2 blocks of float32 matmuls and norms
        assert close(ns.get(grads[name]), want, mag), name
    assert sorted(grads) == sorted(n for n, _ in ref.named_parameters())


# --- 2. the whole model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("siglip-train"))


def hf_loss_and_grads(folder, images, texts, loss):
    from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(folder, dtype=torch.float32)
    ids = SiglipTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    px = SiglipImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    with torch.enable_grad():  # other test modules turn autograd off for the whole process
        out = model(input_ids=ids, pixel_values=px, return_loss=True)  # no attention_mask: padding attended
        L, n = out.logits_per_image, len(texts)
        if loss == "sigmoid":
            value = out.loss
        elif loss == "clip":  # HF's clip_loss (modeling_clip): the mean of both directions' cross-entropies
            lab = torch.arange(n)
            value = (torch.nn.functional.cross_entropy(L, lab) + torch.nn.functional.cross_entropy(L.t(), lab)) / 2
        else:  # same-text positives, as tools/train_siglip_shapes.py's torch loop
            z = (ids[:, None, :] == ids[None, :, :]).all(-1).float() * 2 - 1
            value = -torch.nn.functional.logsigmoid(z * L).sum(1).mean()
        value.backward()
    return float(value.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}, ids.numpy()


@each_namespace
@pytest.mark.parametrize("name", ["odd", "one-layer", "wide-text"])
@pytest.mark.parametrize("loss", ["sigmoid", "clip", "same-text"])
def test_loss_and_every_gradient_equal_torch_autograd_through_hf(ns, name, loss, root):
    folder = checkpoint(name, root)
    m = npvlm.load(folder, backend=ns.backend)
    imgs = [image(i) for i in range(len(TEXTS))]
    batch = make_batch(m.tokenizer, ns.xp, pixel_batch(load_images(imgs), m.processor, m.backend), TEXTS,
                       positives="same-text" if loss == "same-text" else "diagonal")
    value, grads = loss_and_grads(m.params, batch, m.config, loss="clip" if loss == "clip" else "sigmoid")
    ref_loss, ref, ids = hf_loss_and_grads(folder, imgs, TEXTS, loss)
    assert np.array_equal(ns.get(batch.ids), ids)  # the same tokens as HF's tokenizer
    assert abs(float(ns.get(value)) - ref_loss) <= TOL * abs(ref_loss)
    ours = {k: ns.get(v) for k, v in flatten(grads).items()}
    assert all(v.dtype == np.float32 for v in ours.values())  # float32 discipline: nothing widened
    skip = ("logit_bias",) if loss == "clip" else ()
    err, worst_name = worst(ours, ref, skip)
    assert err <= TOL, f"worst tensor {worst_name}: {err:.2e}"
    top = max(float(np.abs(v).max()) for v in ref.values())
    for k in [k for k in ref if zero_in_exact_arithmetic(k)] + list(skip):  # zero up to float32 rounding of the rest
        assert np.abs(ours[k]).max() <= 1e-5 * top and np.abs(ref[k]).max() <= 1e-5 * top, k
