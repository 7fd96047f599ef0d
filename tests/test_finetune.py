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


# ---------------------------------------------------------------------------------------------
# The folder written, the adapter, the data checks, Ctrl-C, float32, the array-API shim


def test_out_dir_is_a_model_folder_hf_and_npvlm_load_with_the_same_logits(ckpt, data, tmp_path):
    from hf_ref import hf_logits
    from safetensors import safe_open
    from transformers import PaliGemmaForConditionalGeneration

    out = finetune(ckpt, data, tmp_path / "out", optimizer="adamw", trainable="all")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"  # trained in float32, saved so
    side = sorted(f for f in os.listdir(ckpt) if not f.endswith(".safetensors") and f != "config.json")
    assert side and set(side) <= set(os.listdir(out))  # tokenizer and processor files copied
    names = lambda d: sorted(safe_open(os.path.join(d, "model.safetensors"), "np").keys())  # noqa: E731
    assert names(out) == names(ckpt)  # the input's naming scheme (as HF 5.24's save_pretrained keeps it)
    _, info = PaliGemmaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ours = npvlm.load(out).logits(image(9), "caption en", "a red circle")
    ref = hf_logits(out, image(9), "caption en", "a red circle")
    assert np.abs(ours - ref).max() <= TOL  # as tests/test_model_hf.py: 1e-4 absolute on logits of scale ~3-10
    assert np.abs(ours - npvlm.load(ckpt).logits(image(9), "caption en", "a red circle")).max() > 1e-2  # it learnt


def test_save_adapter_writes_peft_layout_equal_to_the_merged_run(ckpt, data, tmp_path):
    from safetensors.numpy import load_file

    out = finetune(ckpt, data, tmp_path / "adapter", "--save-adapter", optimizer="adamw", trainable="lora")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    ab = load_file(os.path.join(out, "adapter_model.safetensors"))
    layers = json.load(open(os.path.join(ckpt, "config.json")))["text_config"]["num_hidden_layers"]
    mods = [f"model.language_model.layers.{j}.{t}" for j in range(layers) for t in TARGETS]
    assert sorted(ab) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB")  # PEFT's keys
    ref, start, _ = torch_run(ckpt, data, "adamw", "lora")
    import re
    for m in mods:
        assert re.fullmatch(cfg["target_modules"], m)  # PEFT would find exactly these modules
        hub = canonical_name(m + ".weight")
        merged = start[hub] + (ALPHA / RANK) * (ab[f"base_model.model.{m}.lora_B.weight"] @
                                               ab[f"base_model.model.{m}.lora_A.weight"])
        assert np.abs(merged - ref[hub]).max() <= TOL * np.abs(ref[hub]).max(), m  # as the merged weights
    assert not re.fullmatch(cfg["target_modules"], "model.vision_tower.encoder.layers.0.self_attn.q_proj")


BAD_ROWS = {
    "bad JSON": ('{"image": "imgs/0.png", "prefix": "caption en"', r":2: bad JSON"),
    "missing key": ('{"image": "imgs/0.png", "prefix": "caption en"}', r":2: missing key 'suffix'"),
    "not a string": ('{"image": "imgs/0.png", "prefix": 3, "suffix": "x"}', r":2: 'prefix' must be a string, got 3"),
    "image missing": ('{"image": "imgs/nope.png", "prefix": "p", "suffix": "x"}', r":2: 'image': image .*nope.png does not exist"),
    "not an object": ('["imgs/0.png", "p", "x"]', r":2: a row must be a JSON object"),
    "not an image": ('{"image": "train.jsonl", "prefix": "p", "suffix": "x"}', r":2: 'image': .*train.jsonl"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_one_line_exit_2_before_any_training(ckpt, data, tmp_path, capsys, case):
    import re
    import shutil

    line, message = BAD_ROWS[case]
    shutil.copytree(os.path.dirname(data), tmp_path / "d")
    bad = tmp_path / "d" / "train.jsonl"
    rows = open(bad).read().splitlines()
    bad.write_text("\n".join([rows[0], line, rows[1]]) + "\n")
    capsys.readouterr()
    code = main(["finetune", "--model", ckpt, "--data", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("npvlm: error: "), err
    assert re.search(re.escape(str(bad)) + message, err), err  # names the file, the line and the field
    assert "step 1" not in err and not os.path.exists(tmp_path / "out")


def test_existing_non_empty_out_dir_is_refused_unless_overwrite(ckpt, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["finetune", "--model", ckpt, "--data", data, "--out", str(out), "--steps", "1"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main(args + ["--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_while_saving_leaves_nothing_half_written(ckpt, data, tmp_path, monkeypatch, existing):
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def interrupted(tensors, path, metadata=None):
        real(dict(list(tensors.items())[:3]), path, metadata=metadata)  # part of the weights are on disk...
        raise KeyboardInterrupt  # ...when Ctrl-C arrives

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("the earlier run")
    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    before = sorted(os.listdir(tmp_path))
    args = ["finetune", "--model", ckpt, "--data", data, "--out", str(out), "--steps", "1", "--overwrite"]
    assert main(args) == 130
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left beside it
    assert os.listdir(out) == ["old.txt"] if existing else not out.exists()  # the old folder as it was, or none


def test_progress_goes_to_stderr_as_plain_lines_off_a_terminal(ckpt, data, tmp_path, capsys):
    finetune(ckpt, data, tmp_path / "out")
    io = capsys.readouterr()
    assert "\r" not in io.err and io.err.count("loss") == STEPS and "examples/s" in io.err
    assert io.out.startswith("wrote ")


def _arrays(tree):
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in _arrays(v)]
    if hasattr(tree, "__dataclass_fields__"):
        return _arrays(vars(tree))
    return [tree] if hasattr(tree, "dtype") else []


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_no_float64_anywhere_in_a_training_step(ckpt, data, trainable):
    """The batch, every saved activation, the loss, every gradient, the trained arrays and AdamW's moments."""
    from npvlm.io.checkpoint import unflatten
    from npvlm.train.finetune import read_rows, rows_at
    from npvlm.train.optim import adamw, select
    from npvlm.train.paligemma_grad import loss_forward
    from npvlm.train.paligemma_task import PaliGemmaTask

    task = PaliGemmaTask.load(ckpt, "numpy")
    rows = [r for _, r in read_rows(data, task.fields)]
    sel, opt = select(trainable, task.params, rank=RANK), adamw(0.01)
    trained = sel.init(task.params, SEED)
    state = opt.init(trained)
    seen = []
    for step in range(2):
        batch = task.batch(rows_at(rows, step, BATCH))
        params = sel.model(task.params, trained)
        _, saved = loss_forward(unflatten(params), batch, cfg=task.model.config)
        loss, grads = task.loss_and_grads(params, batch, sel.needs)
        trained, state = opt.step(trained, sel.grads(grads, trained), state)
        seen += _arrays([batch, saved, loss, grads, params, trained, state])
    floats = {str(a.dtype) for a in seen if np.dtype(a.dtype).kind == "f"}
    assert floats == {"float32"}, floats
    assert len(seen) > 100


def test_array_api_strict_trains_to_the_same_weights(ckpt, data, tmp_path):
    out = finetune(ckpt, data, tmp_path / "out", "--backend", "array_api_strict", optimizer="adamw", trainable="lora")
    ours, (ref, _, _) = saved_weights(out), torch_run(ckpt, data, "adamw", "lora")
    for k in ref:  # the same per-tensor tolerance as above
        assert np.abs(ours[k] - ref[k]).max() <= TOL * np.abs(ref[k]).max(), k


def test_a_model_type_with_no_training_task_is_one_line(data, tmp_path, capsys):
    siglip = os.path.join(os.path.dirname(npvlm.__file__), "demo", "siglip_model")
    assert main(["finetune", "--model", siglip, "--data", data, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type 'siglip'" in err and "paligemma" in err, err
