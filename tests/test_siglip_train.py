"""Training SigLIP in npvlm against torch autograd through HF's own modules (transformers 5.24).

1. The two pieces the two-tower model adds to the vision tower, each against torch autograd (hypothesis
   shapes, the gradient of a random projection of the output): the MAP pooling head (HF
   SiglipMultiheadAttentionPoolingHead, a torch nn.MultiheadAttention inside) and the text tower (HF
   SiglipTextModel: embeddings + positions, bidirectional encoder, final LayerNorm, last token, head).
2. npvlm.train.siglip_model_grad.loss_and_grads: HF SiglipModel(..., return_loss=True)'s loss and CLIP's softmax
   loss over the same logits, with their gradient w.r.t. every parameter of random HF-written SiglipModel
   checkpoints (tests/test_siglip.py's three shapes).

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
from npvlm.train.siglip_task import LORA_TARGETS
from tests.namespaces import HYPOTHESIS, each_namespace
from tests.test_siglip import checkpoint, image

TOL = 1e-4
TEXTS = ["a red square", "two dogs on the left", "über café", "a photo of a cat."]


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
        else:  # HF's clip_loss (modeling_clip): the mean of both directions' cross-entropies
            lab = torch.arange(n)
            value = (torch.nn.functional.cross_entropy(L, lab) + torch.nn.functional.cross_entropy(L.t(), lab)) / 2
        value.backward()
    return float(value.detach()), {n: p.grad.numpy() for n, p in model.named_parameters()}, ids.numpy()


@each_namespace
@pytest.mark.parametrize("name", ["odd", "one-layer", "wide-text"])
@pytest.mark.parametrize("loss", ["sigmoid", "clip"])
def test_loss_and_every_gradient_equal_torch_autograd_through_hf(ns, name, loss, root):
    folder = checkpoint(name, root)
    m = npvlm.load(folder, backend=ns.backend)
    imgs = [image(i) for i in range(len(TEXTS))]
    batch = make_batch(m.tokenizer, ns.xp, pixel_batch(load_images(imgs), m.processor, m.backend), TEXTS)
    value, grads = loss_and_grads(m.params, batch, m.config, loss=loss)
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


# --- 3. `npvlm finetune` on a SigLIP folder ----------------------------------------------------------
# A 4-row JSONL, batches of 3 (the second step wraps round to the first rows), STEPS steps through the CLI,
# against a torch loop over HF's SiglipModel(..., return_loss=True) with torch.optim.SGD / AdamW
# (weight_decay=0.01), the same rows in the same order, LoRA as a hand-written W + s B A parametrisation
# (torch.func.functional_call) with the same A. Weights after the last step: per tensor, max|ours - torch|
# <= 1e-4 max|torch|, as above.

STEPS, BATCH, RANK, ALPHA, SEED = 3, 3, 2, 8.0, 5
LR = {"sgd": 0.5, "adamw": 0.01}  # large enough that every trained tensor moves by percent (asserted)
ROW_TEXTS = ["a red square", "two dogs on the left", "a photo of a cat.", "blue circle"]
LORA_RE = r".*_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


@pytest.fixture(scope="module")
def ft_model(root):
    return checkpoint("one-layer", root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("siglip-data")
    (d / "imgs").mkdir()
    with open(d / "train.jsonl", "w") as f:
        for i, text in enumerate(ROW_TEXTS):
            image(30 + i).save(d / "imgs" / f"{i}.png")
            f.write(json.dumps({"image": f"imgs/{i}.png", "text": text}) + "\n")
    return str(d / "train.jsonl")


def torch_run(folder, jsonl, optimizer, trainable, loss="sigmoid"):
    """The same STEPS in torch: ({name: final weight}, {name: starting weight}, [loss of each step])."""
    import json
    import math
    import os

    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(folder, dtype=torch.float32)
    tok, proc = SiglipTokenizer.from_pretrained(folder), SiglipImageProcessor.from_pretrained(folder)
    rows = [json.loads(line) for line in open(jsonl)]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = {n: t.clone() for n, t in start.items()}
    if trainable == "lora":  # A drawn module by module: vision layers, then text layers, each q, k, v, out, fc1, fc2
        rng, lora = np.random.default_rng(SEED), {}
        cfg = model.config
        for tower, layers in (("vision_model", cfg.vision_config.num_hidden_layers),
                              ("text_model", cfg.text_config.num_hidden_layers)):
            for n in [f"{tower}.encoder.layers.{j}.{t}.weight" for j in range(layers) for t in LORA_TARGETS]:
                n_out, n_in = base[n].shape
                a = rng.uniform(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in), (RANK, n_in)).astype(np.float32)
                lora[n] = (torch.tensor(a, requires_grad=True), torch.zeros(n_out, RANK, requires_grad=True))
        leaves = [x for ab in lora.values() for x in ab]
    else:
        for n in base:
            base[n].requires_grad_(trainable == "all" or ".self_attn." in n)
        leaves = [t for t in base.values() if t.requires_grad]
    opt = torch.optim.SGD(leaves, lr=LR["sgd"]) if optimizer == "sgd" else \
        torch.optim.AdamW(leaves, lr=LR["adamw"], weight_decay=0.01)

    def weights():
        if trainable != "lora":
            return base
        return {**base, **{n: base[n] + (ALPHA / RANK) * (b @ a) for n, (a, b) in lora.items()}}

    losses, tiny = [], {}  # tiny: entries whose gradient was below GRAD_FLOOR of its tensor's largest, at some step
    with torch.enable_grad():
        for step in range(STEPS):
            batch = [rows[(step * BATCH + i) % len(rows)] for i in range(BATCH)]
            ids = tok([r["text"] for r in batch], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
            px = proc([Image.open(os.path.join(os.path.dirname(jsonl), r["image"])).convert("RGB") for r in batch],
                      return_tensors="pt")["pixel_values"]
            out = torch.func.functional_call(model, weights(), args=(),
                                             kwargs=dict(input_ids=ids, pixel_values=px, return_loss=True))
            if loss == "sigmoid":
                value = out.loss
            else:
                lab, L = torch.arange(BATCH), out.logits_per_image
                value = (torch.nn.functional.cross_entropy(L, lab) + torch.nn.functional.cross_entropy(L.t(), lab)) / 2
            opt.zero_grad()
            value.backward()
            losses.append(float(value.detach()))
            for n, t in base.items():
                if t.grad is not None:
                    g = t.grad.abs().numpy()
                    tiny[n] = tiny.get(n, False) | ((g > 0) & (g <= GRAD_FLOOR * g.max()))  # 0: exact on both sides
            opt.step()
    final = {n: w.detach().numpy().copy() for n, w in weights().items()}
    return final, {n: w.numpy() for n, w in start.items()}, losses, tiny


def run_finetune(folder, jsonl, out, *extra, optimizer="sgd", trainable="attention"):
    from npvlm.apps.cli import main

    argv = ["finetune", "--model", folder, "--data", jsonl, "--out", str(out), "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--optimizer", optimizer, "--lr", str(LR[optimizer]), "--train", trainable,
            "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--seed", str(SEED), *extra]
    assert main(argv) == 0
    return str(out)


def saved_weights(out_dir):
    import os

    from safetensors.numpy import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))


def noise_only(name, shape, clip=False):
    """The entries whose gradient is zero in exact arithmetic (a k bias shifts a whole row of scores, which softmax
    ignores; so does logit_bias under the CLIP loss): both sides hold rounding noise there, which AdamW's first
    step turns into +-lr of either sign."""
    mask = np.zeros(shape, dtype=bool)
    if zero_in_exact_arithmetic(name) or (clip and name == "logit_bias"):
        mask[...] = True
    if name == "vision_model.head.attention.in_proj_bias":  # the packed q; k; v: its k third
        D = shape[0] // 3
        mask[D:2 * D] = True
    return mask


# AdamW's step is lr * m / sqrt(v): about lr * sign(g) at first, whatever |g| is. Where |g| is below 1e-3 of its
# tensor's largest gradient, float32 summation order alone (BLAS threads, torch's kernels vs numpy's) changes g by
# more than 1e-3 of itself, and the quotient by more than the weight tolerance. Those entries (measured: up to 11 % of
# a k_proj, none of most tensors) are compared at lr * STEPS / 10 instead: a wrong sign or a missing step, not noise.
GRAD_FLOOR = 1e-3


def assert_same_training(ours, ref, start, optimizer, trainable, curve=None, losses=None, clip=False, tiny=None):
    import re

    assert sorted(ours) == sorted(ref)
    moved = {k for k in ref if not np.array_equal(ref[k], start[k])}
    if trainable == "attention":
        assert moved == {k for k in ref if ".self_attn." in k}  # both towers' q/k/v/out_proj, weights and biases
    if trainable == "lora":
        assert moved == {k for k in ref if k.endswith(".weight") and re.fullmatch(LORA_RE, k[:-len(".weight")])}
    for k in ref:
        if k not in moved:  # frozen: bit for bit the input
            assert np.array_equal(ours[k], start[k]), k
            continue
        scale = np.abs(ref[k]).max()
        real = ~noise_only(k, ref[k].shape, clip)
        if real.any():
            assert np.abs(ref[k] - start[k])[real].max() >= 10 * TOL * scale, k  # moved: 10x the tolerance at least
        keep = real if optimizer == "adamw" else np.ones_like(real)  # SGD moves the noise by noise: compared too
        if optimizer == "adamw" and tiny and k in tiny:
            small = tiny[k] & keep
            assert small.mean() <= 0.25, (k, small.mean())  # the exception stays an exception
            assert np.abs(ours[k] - ref[k])[small].max(initial=0.0) <= LR["adamw"] * STEPS / 10, k
            keep = keep & ~small
        assert np.abs(ours[k] - ref[k])[keep].max(initial=0.0) <= TOL * scale, k  # per tensor, 1e-4 of its largest
    if losses is not None:
        for p, want in zip(curve, losses):  # the loss of each step's batch, before its update: 1e-4 relative
            assert abs(p["loss"] - want) <= TOL * abs(want)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("trainable", ["attention", "all", "lora"])
def test_finetune_weights_after_n_steps_equal_torch_on_hf(ft_model, data, tmp_path, optimizer, trainable):
    import json

    out = run_finetune(ft_model, data, tmp_path / "out", "--json", str(tmp_path / "c.json"), optimizer=optimizer,
                       trainable=trainable)
    summary = json.load(open(tmp_path / "c.json"))
    assert summary["loss"] == "sigmoid" and [p["step"] for p in summary["curve"]] == list(range(1, STEPS + 1))
    ref, start, losses, tiny = torch_run(ft_model, data, optimizer, trainable)
    assert_same_training(saved_weights(out), ref, start, optimizer, trainable, summary["curve"], losses, tiny=tiny)


def test_finetune_with_the_clip_loss_equals_torch(ft_model, data, tmp_path):
    out = run_finetune(ft_model, data, tmp_path / "out", "--loss", "clip", optimizer="sgd", trainable="all")
    ref, start, _, _ = torch_run(ft_model, data, "sgd", "all", loss="clip")
    assert_same_training(saved_weights(out), ref, start, "sgd", "all", clip=True)


def test_array_api_strict_trains_to_the_same_weights(ft_model, data, tmp_path):
    out = run_finetune(ft_model, data, tmp_path / "out", "--backend", "array_api_strict", optimizer="adamw",
                       trainable="lora")
    ref, start, _, _ = torch_run(ft_model, data, "adamw", "lora")
    assert_same_training(saved_weights(out), ref, start, "adamw", "lora")


def test_save_adapter_writes_peft_layout_equal_to_the_merged_run(ft_model, data, tmp_path):
    import json
    import os
    import re

    from safetensors.numpy import load_file

    out = run_finetune(ft_model, data, tmp_path / "adapter", "--save-adapter", optimizer="adamw", trainable="lora")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert not os.path.exists(os.path.join(out, "model.safetensors")) and "spiece.model" in os.listdir(out)
    ab = load_file(os.path.join(out, "adapter_model.safetensors"))
    ref, start, _, _ = torch_run(ft_model, data, "adamw", "lora")
    mods = [k[:-len(".weight")] for k in ref if k.endswith(".weight") and re.fullmatch(LORA_RE, k[:-len(".weight")])]
    assert sorted(ab) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB")  # PEFT's keys
    for k in ref:  # PEFT's regex picks exactly the adapted modules (not the MAP head's, not the embeddings')
        assert bool(re.fullmatch(cfg["target_modules"], k.rsplit(".", 1)[0])) == (k.rsplit(".", 1)[0] in mods), k
    for m in mods:
        merged = start[m + ".weight"] + (ALPHA / RANK) * (ab[f"base_model.model.{m}.lora_B.weight"] @
                                                          ab[f"base_model.model.{m}.lora_A.weight"])
        assert np.abs(merged - ref[m + ".weight"]).max() <= TOL * np.abs(ref[m + ".weight"]).max(), m  # as merged


def test_out_dir_loads_in_hf_and_npvlm_and_classifies(ft_model, data, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from transformers import SiglipModel

    from tests.test_siglip import hf_outputs

    out = run_finetune(ft_model, data, tmp_path / "out", optimizer="adamw", trainable="all")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    side = sorted(f for f in os.listdir(ft_model) if not f.endswith(".safetensors") and f != "config.json")
    assert side and set(side) <= set(os.listdir(out))  # spiece.model, tokenizer and processor configs copied
    _, info = SiglipModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    png = str(tmp_path / "x.png")
    image(40).save(png)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "npvlm", "classify", "--model", out, "--image", png, "--labels", *ROW_TEXTS,
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)[0]["probabilities"]
    _, _, logits = hf_outputs(out, [PIL_image(png)], ROW_TEXTS)
    want = 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64)))
    np.testing.assert_allclose([got[t] for t in ROW_TEXTS], want, atol=1e-5, rtol=0)  # as tests/test_siglip.py
    before = npvlm.load(ft_model).logits([png], ROW_TEXTS)
    assert np.abs(npvlm.load(out).logits([png], ROW_TEXTS) - before).max() > 1e-2  # it learnt


def PIL_image(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_loss_option_on_a_paligemma_folder_is_one_line(data, tmp_path, capsys):
    from npvlm.apps.cli import main

    assert main(["finetune", "--data", data, "--out", str(tmp_path / "o"), "--loss", "clip"]) == 2  # the embedded PaliGemma
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--loss 'clip'" in err and "paligemma" in err, err


def test_no_float64_anywhere_in_a_siglip_training_step(ft_model, data):
    """The batch, every saved activation, the loss, every gradient, the trained arrays and AdamW's moments."""
    from npvlm.train.finetune import read_rows, rows_at
    from npvlm.train.optim import adamw
    from npvlm.train.siglip_model_grad import loss_forward
    from npvlm.train.siglip_task import SiglipTask

    task = SiglipTask.load(ft_model, "numpy")
    rows = [r for _, r in read_rows(data, task.fields)]
    sel, opt = task.select("lora", task.params, rank=RANK), adamw(0.01)
    trained = sel.init(task.params, SEED)
    state = opt.init(trained)
    seen = []
    for step in range(2):
        batch = task.batch(rows_at(rows, step, BATCH))
        params = sel.model(task.params, trained)
        _, saved = loss_forward(unflatten(params), batch, cfg=task.model.config)
        loss, grads = task.loss_and_grads(params, batch, sel.needs)
        trained, state = opt.step(trained, sel.grads(grads, trained), state)
        seen += arrays([vars(batch), saved, loss, grads, params, trained, state])
    floats = {str(a.dtype) for a in seen if np.dtype(a.dtype).kind == "f"}
    assert floats == {"float32"}, floats
    assert len(seen) > 100


def arrays(tree):
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in arrays(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in arrays(v)]
    return [tree] if hasattr(tree, "dtype") else []
