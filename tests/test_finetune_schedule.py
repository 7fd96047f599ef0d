"""`npvlm finetune --lr-schedule / --warmup-steps / --weight-decay` against HF transformers' schedulers and torch.

1. npvlm.train.schedule.lr_at, step by step, against the lr torch's optimiser reads from
   transformers.get_{constant,linear,cosine}_schedule_with_warmup (a LambdaLR): several (steps, warm-up) pairs.
2. `npvlm finetune --train all --optimizer adamw --lr-schedule cosine --warmup-steps 2 --weight-decay 0.1`
   for STEPS steps on a random PaliGemma folder and a random SigLIP folder (and linear on PaliGemma), against
   torch.optim.AdamW(weight_decay=0.1) + HF's scheduler over HF's own model, the same rows in the same order.
   With 4 steps and 2 of warm-up the lr goes 0, lr/2, lr, lr/2 (cosine): the warm-up, the peak and the decay
   are all in it, and step 0 moves nothing but AdamW's moments, as torch's.
   Tolerance as tests/test_finetune.py: per tensor, max|ours - torch| <= 1e-4 * max|torch|.
3. The --json curve records each step's lr; the new options' bad values are one line, exit 2.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hf_ref import image, write
from npvlm.apps.cli import main
from npvlm.models.paligemma_schema import canonical_name
from npvlm.train.schedule import SCHEDULES, lr_at
from tests.test_siglip import checkpoint as siglip_checkpoint

TOL = 1e-4
LR_RTOL = 1e-7  # the brief's bound for the lr itself; the expressions are HF's, so it is in fact bit for bit
STEPS, WARMUP, LR, WD = 4, 2, 0.01, 0.1


def hf_schedule(opt, schedule, warmup, steps):
    import transformers

    if schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
    make = {"cosine": transformers.get_cosine_schedule_with_warmup, "linear": transformers.get_linear_schedule_with_warmup}
    return make[schedule](opt, num_warmup_steps=warmup, num_training_steps=steps)


def hf_lrs(schedule, lr, steps, warmup):
    """The lr torch's optimiser uses at each of `steps` steps under HF's scheduler (read before each step)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, out = hf_schedule(opt, schedule, warmup, steps), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def assert_lrs_equal(ours, want):
    assert len(ours) == len(want)
    for t, (a, b) in enumerate(zip(ours, want)):
        assert abs(a - b) <= LR_RTOL * abs(b), (t, a, b)  # 1e-7 relative: a zero lr must be zero


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps, warmup", [(1, 0), (2, 1), (5, 0), (7, 3), (10, 9), (100, 10), (3500, 350)])
def test_each_steps_lr_equals_hf_get_schedule_with_warmup(schedule, steps, warmup):
    for lr in (2e-5, 0.03):
        assert_lrs_equal([lr_at(schedule, t, lr, steps=steps, warmup=warmup) for t in range(steps)],
                         hf_lrs(schedule, lr, steps, warmup))


def test_the_default_constant_schedule_is_the_lr_itself_at_every_step():
    # today's behaviour, bit for bit: no warm-up, lr * 1.0 == lr exactly
    assert all(lr_at("constant", t, 2e-5, steps=50) == 2e-5 for t in range(50))


# ---------------------------------------------------------------------------------------------
# npvlm finetune against torch's AdamW + HF's scheduler


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"paligemma": (folder, jsonl, batch), "siglip": ...}: random models and 3 or 4 rows over images in imgs/."""
    root = tmp_path_factory.mktemp("schedule")
    os.mkdir(root / "imgs")
    for i in range(4):
        image(50 + i).save(root / "imgs" / f"{i}.png")
    pg = write(root / "pg", seed=3, layout="v5", hidden=16, heads=2, kv_heads=1, head_dim=8, layers=2, image_size=16,
               patch_size=8, vision_layers=1)
    pg_rows = [("caption en", "a red circle left of a blue square"), ("detect circle", "<loc0001><loc0002> circle"),
               ("answer en what colour", "green")]
    with open(root / "pg.jsonl", "w") as f:
        for i, (prefix, suffix) in enumerate(pg_rows):
            f.write(json.dumps({"image": f"imgs/{i}.png", "prefix": prefix, "suffix": suffix}) + "\n")
    texts = ["a red square", "two dogs on the left", "a photo of a cat.", "blue circle"]
    with open(root / "sg.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"image": f"imgs/{i}.png", "text": text}) + "\n")
    return {"paligemma": (pg, str(root / "pg.jsonl"), 2), "siglip": (siglip_checkpoint("one-layer", str(root)),
                                                                       str(root / "sg.jsonl"), 3)}


def batch_rows(jsonl, step, batch):
    rows = [json.loads(line) for line in open(jsonl)]
    picked = [rows[(step * batch + i) % len(rows)] for i in range(batch)]  # file order, wrapping round
    for r in picked:
        r["pil"] = Image.open(os.path.join(os.path.dirname(jsonl), r["image"])).convert("RGB")
    return picked


def hf_model_and_loss(kind, folder):
    """(HF's model, loss(model, weights, rows) -> scalar tensor): the loss npvlm finetune trains on."""
    if kind == "paligemma":
        from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        proc = PaliGemmaProcessor.from_pretrained(folder)
        proc.tokenizer.padding_side = "right"  # training pads on the right

        def loss(weights, rows):
            inputs = proc(images=[r["pil"] for r in rows], text=["<image>" + r["prefix"] for r in rows],
                          suffix=[r["suffix"] for r in rows], return_tensors="pt", padding="longest")
            return torch.func.functional_call(model, weights, args=(), kwargs=dict(inputs)).loss
        return model, loss
    from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(folder, dtype=torch.float32)
    tok, proc = SiglipTokenizer.from_pretrained(folder), SiglipImageProcessor.from_pretrained(folder)

    def loss(weights, rows):
        ids = tok([r["text"] for r in rows], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
        px = proc([r["pil"] for r in rows], return_tensors="pt")["pixel_values"]
        return torch.func.functional_call(model, weights, args=(), kwargs=dict(input_ids=ids, pixel_values=px,
                                                                                return_loss=True)).loss
    return model, loss


def torch_run(kind, folder, jsonl, batch, schedule):
    """STEPS of torch.optim.AdamW(lr=LR, weight_decay=WD) + HF's scheduler on every parameter:
    ({name: final}, {name: start}, [loss of each step], [lr of each step]), names canonical for PaliGemma."""
    model, loss_of = hf_model_and_loss(kind, folder)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    opt = torch.optim.AdamW(list(weights.values()), lr=LR, weight_decay=WD)
    sched, losses, lrs = hf_schedule(opt, schedule, WARMUP, STEPS), [], []
    with torch.enable_grad():  # other test modules turn autograd off for the whole process
        for step in range(STEPS):
            lrs.append(opt.param_groups[0]["lr"])
            loss = loss_of(weights, batch_rows(jsonl, step, batch))
            opt.zero_grad()
            loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
            sched.step()
    name = canonical_name if kind == "paligemma" else (lambda n: n)
    return ({name(n): w.detach().numpy().copy() for n, w in weights.items()},
            {name(n): w.numpy() for n, w in start.items()}, losses, lrs)


def noise_only(kind, name, shape):
    """Entries whose gradient is zero in exact arithmetic (a key bias shifts a whole row of scores, which softmax
    ignores; the k third of SigLIP's packed MAP in_proj bias likewise): both sides hold rounding noise there,
    which AdamW turns into +-lr of either sign (tests/test_finetune.py, tests/test_siglip_train.py)."""
    mask = np.zeros(shape, dtype=bool)
    if name.endswith("self_attn.k_proj.bias"):
        mask[...] = True
    if kind == "siglip" and name == "vision_model.head.attention.in_proj_bias":
        mask[shape[0] // 3:2 * shape[0] // 3] = True
    return mask


@pytest.mark.parametrize("kind, schedule", [("paligemma", "cosine"), ("siglip", "cosine"), ("paligemma", "linear")])
def test_scheduled_adamw_with_weight_decay_equals_torch_and_hf_scheduler(folders, tmp_path, capsys, kind, schedule):
    from safetensors.numpy import load_file

    folder, jsonl, batch = folders[kind]
    out, curve_file = tmp_path / "out", tmp_path / "curve.json"
    assert main(["finetune", "--model", folder, "--data", jsonl, "--out", str(out), "--steps", str(STEPS),
                 "--batch-size", str(batch), "--optimizer", "adamw", "--lr", str(LR), "--train", "all",
                 "--lr-schedule", schedule, "--warmup-steps", str(WARMUP), "--weight-decay", str(WD),
                 "--json", str(curve_file)]) == 0
    assert "lr 0.005" in capsys.readouterr().err  # a scheduled run prints each step's lr (lr/2 at step 2)
    name = canonical_name if kind == "paligemma" else (lambda n: n)
    ours = {name(k): v for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    ref, start, losses, lrs = torch_run(kind, folder, jsonl, batch, schedule)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        scale = np.abs(ref[k]).max()
        real = ~noise_only(kind, k, ref[k].shape)
        if real.any():
            assert np.abs(ref[k] - start[k])[real].max() >= 10 * TOL * scale, k  # moved: 10x the tolerance at least
        assert np.abs(ours[k] - ref[k])[real].max(initial=0.0) <= TOL * scale, k  # per tensor, 1e-4 of its largest
    summary = json.loads(curve_file.read_text())
    assert (summary["lr_schedule"], summary["warmup_steps"], summary["weight_decay"], summary["lr"]) == \
        (schedule, WARMUP, WD, LR)
    assert [p["step"] for p in summary["curve"]] == list(range(1, STEPS + 1))
    assert_lrs_equal([p["lr"] for p in summary["curve"]], lrs)  # the lr of each step, as torch's optimiser read it
    assert lrs[0] == 0.0 and max(lrs) == LR  # the warm-up starts at 0 and the peak is reached
    for p, want in zip(summary["curve"], losses):  # each step's loss, before its update: 1e-4 relative
        assert abs(p["loss"] - want) <= TOL * abs(want)


def test_the_json_curve_of_a_default_run_records_the_constant_lr(folders, tmp_path):
    folder, jsonl, batch = folders["siglip"]
    curve_file = tmp_path / "c.json"
    assert main(["finetune", "--model", folder, "--data", jsonl, "--out", str(tmp_path / "o"), "--steps", "2",
                 "--batch-size", str(batch), "--optimizer", "adamw", "--json", str(curve_file)]) == 0
    summary = json.loads(curve_file.read_text())
    assert (summary["lr_schedule"], summary["warmup_steps"], summary["weight_decay"]) == ("constant", 0, 0.01)
    assert [p["lr"] for p in summary["curve"]] == [2e-5, 2e-5]  # AdamW's default lr, unscheduled: exactly


BAD_OPTIONS = {
    "warm-up as long as the run": (["--steps", "3", "--warmup-steps", "3", "--optimizer", "adamw"],
                                   "--warmup-steps 3 must be below --steps 3"),
    "negative warm-up": (["--warmup-steps", "-1"], "--warmup-steps: must be an integer >= 0, got '-1'"),
    "unknown schedule": (["--lr-schedule", "step"], "--lr-schedule: invalid choice: 'step'"),
    "negative weight decay": (["--optimizer", "adamw", "--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    "weight decay with sgd": (["--weight-decay", "0.1"], "--weight-decay 0.1: plain SGD has no weight decay"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_a_bad_schedule_or_weight_decay_is_one_line_exit_2(folders, tmp_path, capsys, case):
    folder, jsonl, _ = folders["siglip"]
    extra, message = BAD_OPTIONS[case]
    capsys.readouterr()
    try:
        code = main(["finetune", "--model", folder, "--data", jsonl, "--out", str(tmp_path / "o"), *extra])
    except SystemExit as e:  # argparse's own refusals (a bad choice, a bad integer) exit from inside main
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npvlm: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "o")
