"""`npvlm finetune` against the same steps done with torch on HF's own model.

For random PaliGemma 1 (MQA, a transformers-5 layout on disk) and PaliGemma 2 (GQA, soft-caps, a sliding
window of 4, stored in bfloat16 and widened for training) checkpoints, a 3-row JSONL and batches of 2 (so
the third step wraps round to the first row): 3 SGD steps and 3 AdamW steps for each of --train
attention / all / lora, run through the CLI, against a torch loop over PaliGemmaForConditionalGeneration
with torch.optim.SGD / torch.optim.AdamW (weight_decay=0.01, the defaults otherwise), the same rows in the
same order, LoRA as a hand-written W + s B A parametrisation (torch.func.functional_call) with the same A.

Tolerance, for the weights after the last step: per tensor, max|ours - torch| <= 1e-4 * max|torch|, as in
tests/test_train.py (float32 gradients summed in another order, then a few optimiser steps).
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import npvlm
from hf_ref import image, write
from npvlm.apps.cli import main
from npvlm.models.paligemma_schema import canonical_name

TOL = 1e-4
STEPS, BATCH, RANK, ALPHA, SEED = 3, 2, 2, 8.0, 5
LR = {"sgd": 0.5, "adamw": 0.01}  # large enough that every trained tensor moves by percent (asserted)
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODELS = {
    "pg1": dict(layout="v5", hidden=16, heads=2, kv_heads=1, head_dim=8, layers=2, image_size=16, patch_size=8,
                vision_layers=1),
    "pg2": dict(dtype="bfloat16", model_type="gemma2", hidden=16, heads=4, kv_heads=2, head_dim=4, layers=2,
                query_pre_attn_scalar=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4,
                image_size=16, patch_size=8, vision_layers=1),
}
ROWS = [("caption en", "a red circle left of a blue square"), ("detect circle", "<loc0001><loc0002> circle"),
        ("answer en what colour", "green")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train.jsonl with 3 rows and its images (in a subfolder: paths are relative to the JSONL file)."""
    root = tmp_path_factory.mktemp("data")
    os.mkdir(root / "imgs")
    with open(root / "train.jsonl", "w") as f:
        for i, (prefix, suffix) in enumerate(ROWS):
            image(20 + i).save(root / "imgs" / f"{i}.png")
            f.write(json.dumps({"image": f"imgs/{i}.png", "prefix": prefix, "suffix": suffix}) + "\n")
    return str(root / "train.jsonl")


@pytest.fixture(scope="module", params=sorted(MODELS))
def ckpt(request, tmp_path_factory):
    return write(tmp_path_factory.mktemp(request.param), seed=3, **MODELS[request.param])


@functools.lru_cache(maxsize=4)
def hf_start(model_dir):
    """HF's model and right-padding processor, and its starting weights {hub name: tensor}."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    proc = PaliGemmaProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "right"  # training pads on the right (paligemma_grad.py)
    return model, proc, {n: p.detach().clone() for n, p in model.named_parameters()}


def rows_of(jsonl):
    base = os.path.dirname(jsonl)
    return [dict(r, image=os.path.join(base, r["image"])) for r in map(json.loads, open(jsonl))]


@functools.lru_cache(maxsize=16)
def torch_run(model_dir, jsonl, optimizer, trainable):
    """The same STEPS in torch: {hub name: final weight (numpy)} and {hub name: starting weight}."""
    model, proc, start = hf_start(model_dir)
    rows = rows_of(jsonl)
    base = {n: t.clone() for n, t in start.items()}
    if trainable == "lora":
        layers = model.config.text_config.num_hidden_layers
        rng, lora = np.random.default_rng(SEED), {}
        for j in range(layers):
            for t in TARGETS:  # A drawn target by target, layer by layer: PEFT's kaiming_uniform_(a=sqrt(5))
                name = f"model.language_model.layers.{j}.{t}.weight"
                n_out, n_in = base[name].shape
                a = rng.uniform(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in), (RANK, n_in)).astype(np.float32)
                lora[name] = (torch.tensor(a, requires_grad=True), torch.zeros(n_out, RANK, requires_grad=True))
        leaves = [x for ab in lora.values() for x in ab]
    else:
        keep = (lambda n: True) if trainable == "all" else (lambda n: ".self_attn." in n and "language_model" in n)
        for n in base:
            base[n].requires_grad_(keep(n))
        leaves = [t for t in base.values() if t.requires_grad]
    opt = torch.optim.SGD(leaves, lr=LR["sgd"]) if optimizer == "sgd" else torch.optim.AdamW(leaves, lr=LR["adamw"],
                                                                                           weight_decay=0.01)

    def weights():
        if trainable != "lora":
            return base
        return {**base, **{n: base[n] + (ALPHA / RANK) * (b @ a) for n, (a, b) in lora.items()}}

    losses = []
    with torch.enable_grad():  # other test modules turn autograd off for the whole process
        for step in range(STEPS):
            batch = [rows[(step * BATCH + i) % len(rows)] for i in range(BATCH)]
            inputs = proc(images=[Image.open(r["image"]).convert("RGB") for r in batch],
                          text=["<image>" + r["prefix"] for r in batch], suffix=[r["suffix"] for r in batch],
                          return_tensors="pt", padding="longest")
            loss = torch.func.functional_call(model, weights(), args=(), kwargs=dict(inputs)).loss
            opt.zero_grad()
            loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
    final = {canonical_name(n): w.detach().numpy().copy() for n, w in weights().items()}
    return final, {canonical_name(n): w.numpy() for n, w in start.items()}, losses


def saved_weights(out_dir):
    from safetensors.numpy import load_file

    return {canonical_name(k): v for k, v in load_file(os.path.join(out_dir, "model.safetensors")).items()}


def finetune(ckpt, data, out, *extra, optimizer="sgd", trainable="attention"):
    argv = ["finetune", "--model", ckpt, "--data", data, "--out", str(out), "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--optimizer", optimizer, "--lr", str(LR[optimizer]), "--train", trainable,
            "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--seed", str(SEED), *extra]
    assert main(argv) == 0
    return str(out)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("trainable", ["attention", "all", "lora"])
def test_weights_after_n_steps_equal_torch_on_hf(ckpt, data, tmp_path, optimizer, trainable):
    out = finetune(ckpt, data, tmp_path / "out", "--json", str(tmp_path / "curve.json"), optimizer=optimizer,
                   trainable=trainable)
    ours = saved_weights(out)
    ref, start, losses = torch_run(ckpt, data, optimizer, trainable)
    assert sorted(ours) == sorted(ref)
    moved = {k for k in ref if not np.array_equal(ref[k], start[k])}
    if trainable == "attention":
        assert moved == {k for k in ref if ".self_attn." in k and k.startswith("language_model.")}
    if trainable == "lora":
        assert moved == {k for k in ref if any(f".{t}.weight" in k for t in TARGETS) and k.startswith("language_model.")}
    for k in ref:
        if k not in moved:  # frozen: bit for bit the (widened) input
            assert np.array_equal(ours[k], start[k]), k
            continue
        scale = np.abs(ref[k]).max()
        if k.endswith("self_attn.k_proj.bias"):
            # the SigLIP key bias's gradient is zero in exact arithmetic (softmax ignores it, test_train.py), so both
            # sides hold rounding noise: SGD barely moves it (compared below), AdamW's first step makes it +-lr
            if optimizer == "adamw":
                continue
        else:
            assert np.abs(ref[k] - start[k]).max() >= 1e-2 * scale, k  # moved: 100x the tolerance at least
        assert np.abs(ours[k] - ref[k]).max() <= TOL * scale, k  # the per-tensor tolerance of the docstring
    curve = json.load(open(tmp_path / "curve.json"))["curve"]
    assert [p["step"] for p in curve] == list(range(1, STEPS + 1))
    assert all(p["examples_per_second"] > 0 and p["elapsed_seconds"] > 0 for p in curve)
    for p, want in zip(curve, losses):  # the loss of each step's batch, before its update: 1e-4 relative
        assert abs(p["loss"] - want) <= TOL * abs(want)
