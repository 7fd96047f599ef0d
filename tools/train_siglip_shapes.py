"""Train the small embedded SigLIP (npvlm/demo/siglip_model/) from scratch on the synthetic scenes.

    PYTHONPATH=. python tools/train_siglip_shapes.py [--trainer npvlm|torch] [--steps 3500] [--scenes 8000]
                                                     [--batch 64] [--work /tmp/siglip-train] [--out DIR]

--trainer npvlm (the default) needs no torch: it writes a randomly initialised model folder with NumPy
(init_params), the scenes as PNGs and one JSONL of (image, caption) rows per learning-rate stage, and runs
`npvlm finetune --train all --optimizer adamw` once per stage, each stage starting from the last one's folder.
--trainer torch runs exactly that recipe in torch on HF's SiglipModel (the same starting folder, rows,
stages and torch.optim.AdamW(weight_decay=0.01), restarted per stage), to time it against npvlm.

The recipe (the earlier torch-only tool's numbers: AdamW peaking at lr 1e-3, batch 64, 3500 steps over 8000
training scenes, t' = log 10 and b = -10 at init):
  - the model: config.json, spiece.model, tokenizer_config.json and preprocessor_config.json of the shipped
    model (vision 2 x 64 at 64 px / patch 8, text 2 x 64 over 16 tokens, a 64-piece vocabulary);
  - the loss: HF SiglipModel's sigmoid loss, only the diagonal pairs positive. Each batch is drawn at random
    (seeds below scenes.EVAL_SEED0) with no caption twice, so no pair with an equal caption is a negative
    (the earlier tool counted equal captions as positives instead; on these batches the two are the same);
  - the schedule: npvlm finetune's learning rate is constant, so the earlier one-cycle schedule (warm-up,
    then cosine decay) is followed piecewise: STAGES, one finetune run each (AdamW's moments restart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npvlm", "demo", "siglip_model")
SIDE_FILES = ("config.json", "spiece.model", "tokenizer_config.json", "preprocessor_config.json")
STAGES = ((0.1, 3e-4), (0.5, 1e-3), (0.25, 3e-4), (0.15, 1e-4))  # (fraction of the steps, lr): warm-up, peak, decay


def init_params(cfg, rng) -> dict:
    """Random float32 weights as HF SiglipPreTrainedModel._init_weights draws them (transformers 5.24):
    attention and MLP weights (and the MAP probe and packed in_proj) Xavier-uniform, attention biases 0, MLP
    biases N(0, 1e-6); the patch embedding, text head and MAP out_proj LeCun-normal (std sqrt(1/fan_in) / 0.8796),
    biases 0; token, text position and vision position tables N(0, 1/D); LayerNorms 1 and 0;
    logit_scale log 10 and logit_bias -10 (the paper's start, not HF's zeros)."""
    from npvlm.models.siglip_schema import expected_shapes

    def xavier(shape):
        fan_in, fan_out = (shape[1] * int(np.prod(shape[2:])), shape[0] * int(np.prod(shape[2:])))
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape)

    def lecun(shape):
        return rng.normal(0.0, math.sqrt(1.0 / int(np.prod(shape[1:]))) / 0.87962566103423978, shape)

    lecun_weights = ("vision_model.embeddings.patch_embedding.weight", "text_model.head.weight",
                     "vision_model.head.attention.out_proj.weight")
    out = {}
    for name, shape in expected_shapes(cfg).items():
        parts = name.split(".")
        module, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        if name in ("logit_scale", "logit_bias"):
            w = np.full(shape, math.log(10.0) if name == "logit_scale" else -10.0)
        elif "norm" in module:
            w = np.ones(shape) if leaf == "weight" else np.zeros(shape)
        elif module in ("token_embedding", "position_embedding"):
            w = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)
        elif name in lecun_weights:
            w = lecun(shape)
        elif leaf in ("probe", "in_proj_weight", "weight"):  # every other weight: attention, MLPs, the MAP probe
            w = xavier(shape)
        elif module in ("fc1", "fc2"):
            w = rng.normal(0.0, 1e-6, shape)
        else:  # every other bias
            w = np.zeros(shape)
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def write_start(folder, seed: int) -> None:
    """The shipped model's config, tokenizer and processor files, and freshly initialised weights."""
    from safetensors.numpy import save_file

    from npvlm.models.siglip_config import SiglipConfig

    os.makedirs(folder, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copy2(os.path.join(SHIPPED, name), os.path.join(folder, name))
    cfg = SiglipConfig.from_dir(folder)
    save_file(init_params(cfg, np.random.default_rng(seed)), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def stage_steps(steps: int) -> list:
    """[(steps, lr)] for each stage, the step counts summing to `steps`."""
    counts = [int(round(f * steps)) for f, _ in STAGES]
    counts[1] += steps - sum(counts)
    return [(n, lr) for n, (_, lr) in zip(counts, STAGES) if n > 0]


def write_data(work, scenes: int, steps: int, batch: int, seed: int) -> list:
    """Scenes 0..scenes-1 as PNGs, and per stage a JSONL of its steps * batch rows; -> [(jsonl, steps, lr)]."""
    from npvlm.demo.scenes import EVAL_SEED0, make_scene

    assert scenes < EVAL_SEED0  # the held-out seeds stay unseen
    os.makedirs(os.path.join(work, "imgs"), exist_ok=True)
    caps = []
    for s in range(scenes):
        sc = make_scene(s, size=64)
        path = os.path.join(work, "imgs", f"{s}.png")
        if not os.path.exists(path):
            sc.image.save(path)
        caps.append(sc.caption)
    if len(set(caps)) < batch:
        raise SystemExit(f"--batch {batch}: only {len(set(caps))} distinct captions")
    rng, out = np.random.default_rng(seed), []
    for k, (n, lr) in enumerate(stage_steps(steps)):
        path = os.path.join(work, f"stage{k}.jsonl")
        with open(path, "w") as f:
            for _ in range(n):
                seen = set()
                while len(seen) < batch:  # a random batch with no caption twice
                    i = int(rng.integers(scenes))
                    if caps[i] not in seen:
                        seen.add(caps[i])
                        f.write(json.dumps({"image": f"imgs/{i}.png", "text": caps[i]}) + "\n")
        out.append((path, n, lr))
    return out


def train_npvlm(start, stages, batch, work) -> str:
    model = start
    for k, (data, n, lr) in enumerate(stages):
        out = os.path.join(work, f"npvlm-stage{k}")
        subprocess.run([sys.executable, "-m", "npvlm", "finetune", "--model", model, "--data", data, "--out", out,
                        "--steps", str(n), "--batch-size", str(batch), "--lr", str(lr), "--optimizer", "adamw",
                        "--train", "all", "--json", out + ".json", "--overwrite"], check=True)
        model = out
    return model


def train_torch(start, stages, batch, work) -> str:
    import torch
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(start, dtype=torch.float32)
    tok, proc = SiglipTokenizer.from_pretrained(start), SiglipImageProcessor.from_pretrained(start)
    model.train()
    for k, (data, n, lr) in enumerate(stages):
        rows = [json.loads(line) for line in open(data)]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)  # npvlm finetune's AdamW
        t0 = time.perf_counter()
        for step in range(n):
            b = rows[step * batch:(step + 1) * batch]
            ids = tok([r["text"] for r in b], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
            px = proc([Image.open(os.path.join(work, r["image"])).convert("RGB") for r in b], return_tensors="pt")
            loss = model(input_ids=ids, pixel_values=px["pixel_values"], return_loss=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % max(1, n // 10) == 0 or step + 1 == n:
                print(f"torch stage {k} step {step + 1}/{n} loss {loss.item():.4f} {time.perf_counter() - t0:.1f} s",
                      flush=True)
    out = os.path.join(work, "torch-final")
    model.eval()
    model.save_pretrained(out)
    for name in SIDE_FILES[1:]:
        shutil.copy2(os.path.join(start, name), os.path.join(out, name))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", choices=("npvlm", "torch"), default="npvlm")
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/siglip-train", help="scenes, JSONL, the start and each stage's folder")
    ap.add_argument("--out", default=None, help="copy the trained folder here (e.g. npvlm/demo/siglip_model)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    start = os.path.join(args.work, "start")
    write_start(start, args.seed)
    stages = write_data(args.work, args.scenes, args.steps, args.batch, args.seed)
    print(f"start folder, {args.scenes} scenes and {len(stages)} stage files in {time.perf_counter() - t0:.1f} s", flush=True)
    t1 = time.perf_counter()
    final = (train_npvlm if args.trainer == "npvlm" else train_torch)(start, stages, args.batch, args.work)
    print(f"{args.trainer}: {args.steps} steps in {time.perf_counter() - t1:.1f} s -> {final}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name in ("model.safetensors", *SIDE_FILES):
            shutil.copy2(os.path.join(final, name), os.path.join(args.out, name))


if __name__ == "__main__":
    main()
