"""Train the small PaliGemma-architecture model bundled as npvlm/demo/shapes_model (issue #5).

Dev-time tool: needs torch, transformers, sentencepiece, protobuf, safetensors (npvlm itself does not).

    python tools/train_shapes.py --out npvlm/demo/shapes_model [--steps 2000] [--seed 0]

What it does, deterministically for a seed:
1. trains a SentencePiece tokenizer (tools/make_tokenizer.py) on the text of every task of scenes
   0..2999, with PaliGemma's special pieces (<image>, <locNNNN>, <segNNN>);
2. builds a tiny PaliGemma (SigLIP + linear projector + Gemma 1), image 128 px, patch 32: 16 image
   tokens; vocabulary = tokenizer size rounded up to a multiple of 64;
3. trains it with AdamW and a cosine schedule on scenes drawn on the fly (npvlm.shapes, training
   seeds step * images + i, all below 800000; validation seeds 900000+; the held-out evaluation
   seeds are 10**6+). Each step encodes `--images` scenes once and asks `--tasks` questions of each;
   detection, the hardest task, gets half of the questions. The loss is next-token cross-entropy on
   the suffix + <eos> only, with HF's prefix-LM mask (token_type_ids), as PaliGemmaProcessor builds
   them with `suffix=` (checked against the processor at start-up). A training-only linear head on
   the vision tower's patches (colour, kind and box of the shape in each patch, `--aux-weight`) gets
   the model past the plateau where the decoder answers from the text prior alone; it is not saved;
4. saves the checkpoint in the hub layout (`vision_tower.vision_model.*`, `language_model.model.*`,
   `multi_modal_projector.linear.*`, no lm_head: it is tied) in bfloat16 with a config.json,
   tokenizer.model (+ HF tokenizer files) and preprocessor_config.json, then reloads it from disk
   in float32 and checks it still answers (bf16 rounding can change greedy outputs).

Progress (step, loss, s/step, ETA) and periodic validation accuracies go to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from make_tokenizer import train_tokenizer  # noqa: E402

from npvlm.demo.scenes import detect_tasks, make_scene, tasks, task_kind  # noqa: E402

IMAGE_SIZE, PATCH = 128, 32  # PATCH is --patch
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
TRAIN_SEED_LIMIT, VAL_SEED0 = 800_000, 900_000
LOC0 = 6  # id of <loc0000> (checked at start-up)
TASK_MIX = {"caption": 0.18, "count": 0.08, "count_kind": 0.12, "colour": 0.12, "detect": 0.50}


# ---------------------------------------------------------------- tokenizer, config, processor

def build_tokenizer(out_dir: str, vocab_size: int = 1600) -> str:
    lines = []
    for s in range(3000):
        for p, a in tasks(make_scene(s)):
            lines.append(p + "\n" + a)
    return train_tokenizer(out_dir, lines, vocab_size)


def build_config(vocab_size: int, image_token: int, a):
    from transformers import PaliGemmaConfig

    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=a.v_dim, intermediate_size=a.v_mlp,
                           num_hidden_layers=a.v_layers, num_attention_heads=a.v_heads, image_size=IMAGE_SIZE,
                           patch_size=PATCH, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6),
        text_config=dict(model_type="gemma", vocab_size=vocab_size, hidden_size=a.t_dim, intermediate_size=a.t_mlp,
                         num_hidden_layers=a.t_layers, num_attention_heads=a.t_heads, num_key_value_heads=a.t_kv,
                         head_dim=a.t_dim // a.t_heads, max_position_embeddings=256, hidden_activation="gelu_pytorch_tanh",
                         rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True),
        image_token_index=image_token,
        projection_dim=a.t_dim,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    cfg.text_config.num_image_tokens = N_IMAGE_TOKENS
    cfg.vision_config.projection_dim = a.t_dim
    return cfg


def build_processor(tok_dir: str):
    from transformers import AutoTokenizer, PaliGemmaProcessor, SiglipImageProcessor

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ip = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3, resample=3, do_resize=True, do_rescale=True, do_normalize=True)
    ip.image_seq_length = N_IMAGE_TOKENS
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


# ---------------------------------------------------------------- data

class Encoder:
    """Token ids as PaliGemmaProcessor builds them: <image>*N <bos> prompt "\\n" | answer <eos>."""

    def __init__(self, sp, image_token: int):
        self.sp = sp
        self.image_token = image_token
        self.cache: dict[str, list[int]] = {}

    def prefix(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            self.cache[prompt] = [self.image_token] * N_IMAGE_TOKENS + [2] + self.sp.encode(prompt + "\n")
        return self.cache[prompt]

    def example(self, prompt: str, answer: str):
        pre, suf = self.prefix(prompt), self.sp.encode(answer) + [1]
        return pre + suf, [0] * len(pre) + [1] * len(suf)


def pixels(images) -> np.ndarray:
    """[B, 3, S, S] float32 in [-1, 1]: SiglipImageProcessor on images already S x S (checked at start-up)."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    return ((a - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def pick_tasks(scene, n: int, rng) -> list[tuple[str, str]]:
    by = {}
    for p, a in tasks(scene):
        by.setdefault(task_kind(p), []).append((p, a))
    kinds = list(TASK_MIX)
    probs = np.array([TASK_MIX[k] for k in kinds])
    probs = probs / probs.sum()
    out = []
    for _ in range(n):
        k = kinds[int(rng.choice(len(kinds), p=probs))]
        pool = by.get(k) or by["detect"]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def make_batch(step: int, a, enc: Encoder):
    import torch

    rng = np.random.default_rng([a.seed, a.seed_offset + step])
    scenes = [make_scene((a.seed_offset + step) * a.images + i) for i in range(a.images)]
    seqs = [enc.example(p, ans) for sc in scenes for p, ans in pick_tasks(sc, a.tasks, rng)]
    L = max(len(s) for s, _ in seqs)
    ids = torch.zeros((len(seqs), L), dtype=torch.long)
    tt = torch.ones((len(seqs), L), dtype=torch.long)
    am = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, (s, t) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        tt[b, :len(t)] = torch.tensor(t)
        am[b, :len(s)] = 1
    labels = torch.where((tt == 1) & (am == 1), ids, torch.full_like(ids, -100))
    aux = [torch.from_numpy(np.stack(x)) for x in zip(*(patch_targets(sc) for sc in scenes))]
    return torch.from_numpy(pixels([sc.image for sc in scenes])), ids, tt, am, labels, aux


def patch_targets(scene):
    """Per-patch truth for the auxiliary training head: colour class, kind class, box of the shape there.

    A patch belongs to the shape covering most of its pixels, if that is at least 1/40 of the patch
    (class 0 = background). Box = the owning
    shape's (x0, y0, x1, y1) / side, with a mask where the patch is background.
    """
    from PIL import Image, ImageDraw

    from npvlm.demo.scenes import COLOURS, KINDS

    side = scene.width
    lab = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(lab)
    for i, sh in enumerate(scene.shapes, start=1):
        x0, y0, x1, y1 = sh.box
        if sh.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=i)
        elif sh.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=i)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=i)
    g = side // PATCH
    blocks = np.asarray(lab).reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, PATCH * PATCH)
    counts = np.stack([(blocks == i).sum(1) for i in range(1, len(scene.shapes) + 1)], 1)  # [N, shapes]
    owner = np.where(counts.max(1) >= max(8, PATCH * PATCH // 40), counts.argmax(1) + 1, 0)
    colour_ids = [0] + [1 + list(COLOURS).index(sh.colour) for sh in scene.shapes]
    kind_ids = [0] + [1 + KINDS.index(sh.kind) for sh in scene.shapes]
    boxes = np.zeros((len(scene.shapes) + 1, 4), np.float32)
    for i, sh in enumerate(scene.shapes, start=1):
        boxes[i] = np.array(sh.box, np.float32) / side
    return (np.array(colour_ids)[owner].astype(np.int64), np.array(kind_ids)[owner].astype(np.int64),
            boxes[owner], (owner > 0).astype(np.float32))


class AuxHead:
    """A training-only linear probe on the vision tower's output tokens (never saved).

    It asks every patch for the colour, kind and box of the shape it shows. This dense signal gets
    the vision tower past the plateau where the decoder answers from the text prior alone.
    """

    def __init__(self, dim: int):
        import torch

        self.linear = torch.nn.Linear(dim, 7 + 4 + 4)

    def parameters(self):
        return self.linear.parameters()

    def loss(self, hidden, aux):
        import torch.nn.functional as F

        colour, kind, box, mask = aux
        out = self.linear(hidden)  # [I, N, 15]
        lc = F.cross_entropy(out[..., :7].reshape(-1, 7), colour.reshape(-1))
        lk = F.cross_entropy(out[..., 7:11].reshape(-1, 4), kind.reshape(-1))
        lb = (F.smooth_l1_loss(out[..., 11:], box, reduction="none", beta=0.05).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        return lc + lk + 10.0 * lb


def check_against_processor(proc, enc: Encoder, n: int = 60):
    """Our fast batch building must equal HF PaliGemmaProcessor(..., suffix=...) exactly."""
    import torch

    for s in range(n):
        sc = make_scene(VAL_SEED0 + 5000 + s)
        for p, ans in tasks(sc)[:: max(1, s % 4)]:
            out = proc(images=[sc.image], text=["<image>" + p], suffix=[ans], return_tensors="pt")
            ids, tt = enc.example(p, ans)
            assert out["input_ids"][0].tolist() == ids, (p, ans, out["input_ids"][0].tolist(), ids)
            assert out["token_type_ids"][0].tolist() == tt, (p, ans)
            assert torch.allclose(out["pixel_values"][0], torch.from_numpy(pixels([sc.image])[0]), atol=1e-6), "pixel values differ"


# ---------------------------------------------------------------- model

def init_loc_embeddings(model, sp, scale: float = 0.02):
    """Give the <locNNNN> rows a smooth code of NNNN (sines and cosines) so neighbouring bins start close.

    Embeddings are tied to the output layer, so this also makes a near-miss bin score near the right
    one from the first step. The rows are ordinary trainable weights afterwards.
    """
    import torch

    emb = model.get_input_embeddings().weight
    D = emb.shape[1]
    ids = [sp.piece_to_id(f"<loc{i:04d}>") for i in range(1024)]
    assert ids == list(range(ids[0], ids[0] + 1024)), "loc tokens are not contiguous"
    k = torch.arange(1024, dtype=torch.float32)[:, None]
    periods = torch.logspace(math.log10(2048.0), math.log10(24.0), D // 2)[None, :]
    code = torch.cat([torch.sin(2 * math.pi * k / periods), torch.cos(2 * math.pi * k / periods)], dim=1)
    with torch.no_grad():
        emb[ids[0]:ids[0] + 1024, : code.shape[1]] = code * scale * 1.4 + 0.3 * emb[ids[0]:ids[0] + 1024, : code.shape[1]]


def forward_loss(model, pix, ids, tt, am, labels, aux, images: int, per_image: int, head=None):
    """Mean next-token CE over suffix tokens (+ the auxiliary patch loss, if a head is given).

    The vision tower runs once per image and is shared by its questions."""
    import torch.nn.functional as F
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    vis = model.model.vision_tower(pix).last_hidden_state  # [I, N, Dv]
    feats = model.model.multi_modal_projector(vis)  # [I, N, D], as get_image_features
    feats = feats.repeat_interleave(per_image, dim=0)  # [I * T, N, D]
    out = model.model(input_ids=ids, token_type_ids=tt, attention_mask=am,
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)})
    h = out.last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[sel]).float()
    ce = F.cross_entropy(logits, tgt[sel], reduction="none")
    is_loc = (tgt[sel] >= LOC0) & (tgt[sel] < LOC0 + 1024)
    forward_loss.split = (ce[is_loc].mean().item() if is_loc.any() else 0.0, ce[~is_loc].mean().item())
    return ce.mean(), (head.loss(vis, aux) if head is not None else None)


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------- save / validate

def hub_state_dict(model) -> dict:
    """transformers 5 in-memory names -> the hub's on-disk names, bfloat16, without the tied lm_head."""
    import torch

    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.startswith("model.vision_tower.vision_model."):
            nk = "vision_tower.vision_model." + k[len("model.vision_tower.vision_model."):]
        elif k.startswith("model.vision_tower."):
            nk = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.language_model."):
            nk = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.multi_modal_projector."):
            nk = "multi_modal_projector." + k[len("model.multi_modal_projector."):]
        else:
            raise KeyError(f"unexpected parameter name {k}")
        out[nk] = v.detach().to(torch.bfloat16).contiguous().clone()
    return out


def save_checkpoint(model, proc, tok_model: str, out: str):
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(hub_state_dict(model), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    cfg["text_config"]["dtype"] = cfg["vision_config"]["dtype"] = "bfloat16"
    cfg.pop("transformers_version", None)
    cfg["architectures"] = ["PaliGemmaForConditionalGeneration"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    proc.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, processor_config.json
    proc.image_processor.save_pretrained(out)  # preprocessor_config.json
    shutil.copyfile(tok_model, os.path.join(out, "tokenizer.model"))
    path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(path))
    tc["vocab_file"] = "tokenizer.model"  # save_pretrained writes the absolute build path
    tc.pop("mask_token", None)  # Gemma's default; this vocabulary has no <mask>
    with open(path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "additional_special_tokens": ["<image>"]}, f, indent=2)
        f.write("\n")


def check_reload(model, out: str):
    """The files hold exactly the trained weights (rounded to bf16), under names HF reads without warnings."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    re = PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    mine, theirs = model.state_dict(), re.state_dict()
    assert set(mine) == set(theirs), set(mine) ^ set(theirs)
    for k, v in mine.items():
        assert torch.equal(v.to(torch.bfloat16).float(), theirs[k]), f"{k} did not round-trip"
    assert re.lm_head.weight.data_ptr() == re.get_input_embeddings().weight.data_ptr(), "lm_head is not tied"
    return re.eval()


def validate(model_dir: str, n: int, label: str, threads: int = 1):
    import eval_shapes

    scenes = [make_scene(VAL_SEED0 + i) for i in range(n)]
    jobs = eval_shapes.jobs_for(scenes)
    t0 = time.perf_counter()
    eng = eval_shapes.HFEngine(model_dir, threads=threads)
    outs = eng.run(scenes, jobs)
    summ = eval_shapes.evaluate(scenes, jobs, outs)
    print(f"[val {label}] " + "  ".join(f"{k} {v['score']:.3f}" for k, v in sorted(summ.items()))
          + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return summ


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "npvlm", "demo", "shapes_model"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-offset", type=int, default=0, help="first data step (continue with fresh scenes after --init-from)")
    ap.add_argument("--images", type=int, default=16, help="scenes per step")
    ap.add_argument("--tasks", type=int, default=2, help="questions per scene per step")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.03)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--v-mlp", type=int, default=512)
    ap.add_argument("--v-layers", type=int, default=4)
    ap.add_argument("--v-heads", type=int, default=4)
    ap.add_argument("--t-dim", type=int, default=160)
    ap.add_argument("--t-mlp", type=int, default=640)
    ap.add_argument("--t-layers", type=int, default=4)
    ap.add_argument("--t-heads", type=int, default=4)
    ap.add_argument("--t-kv", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=1600, help="SentencePiece vocabulary asked for")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val-scenes", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads: 1 is fastest on a shared 2-core machine")
    ap.add_argument("--patch", type=int, default=32, help="patch side in pixels: (128 / patch)^2 image tokens")
    ap.add_argument("--no-loc-init", action="store_true")
    ap.add_argument("--init-from", help="start from this saved checkpoint instead of random weights")
    ap.add_argument("--detect-share", type=float, default=0.5, help="fraction of questions that are detection")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the training-only patch loss (0: off)")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and stop")
    a = ap.parse_args(argv)
    global PATCH, N_IMAGE_TOKENS
    PATCH = a.patch
    N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
    others = sum(v for k, v in TASK_MIX.items() if k != "detect")
    TASK_MIX["detect"] = others * a.detect_share / (1 - a.detect_share)  # so detection is that share of questions

    import sentencepiece as spm
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    assert (a.seed_offset + a.steps) * a.images <= TRAIN_SEED_LIMIT, "training seeds would reach the validation range"
    t_start = time.perf_counter()

    work = a.out.rstrip("/") + ".build"
    os.makedirs(work, exist_ok=True)
    tok_model = build_tokenizer(work, a.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=tok_model)
    image_token = sp.piece_to_id("<image>")
    assert sp.piece_to_id("<loc0000>") == LOC0
    vocab = -(-sp.get_piece_size() // 64) * 64
    proc = build_processor(work)
    enc = Encoder(sp, image_token)
    check_against_processor(proc, enc)

    cfg = build_config(vocab, image_token, a)
    if a.init_from:  # continue from a checkpoint this script saved (same tokenizer, same config)
        model = PaliGemmaForConditionalGeneration.from_pretrained(a.init_from, dtype=torch.float32, attn_implementation="eager")
        assert model.config.text_config.vocab_size == vocab and model.config.image_token_index == image_token
        assert model.config.vision_config.patch_size == PATCH, "--patch differs from the checkpoint's"
    else:
        model = PaliGemmaForConditionalGeneration._from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        if not a.no_loc_init:
            init_loc_embeddings(model, sp)
    n_params = sum(p.numel() for p in model.parameters())
    vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    print(f"tokenizer {sp.get_piece_size()} pieces -> vocab {vocab}, <image>={image_token}; "
          f"params {n_params / 1e6:.2f} M (vision {vis / 1e6:.2f} M); {N_IMAGE_TOKENS} image tokens at {IMAGE_SIZE} px; "
          f"batch {a.images} scenes x {a.tasks} questions", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    head = AuxHead(a.v_dim) if a.aux_weight > 0 else None
    if head is not None:
        decay += list(head.parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    steps = a.bench or a.steps
    t0, ema = time.perf_counter(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        pix, ids, tt, am, labels, aux = make_batch(step, a, enc)
        lm, aux_loss = forward_loss(model, pix, ids, tt, am, labels, aux, a.images, a.tasks, head)
        loss = lm if aux_loss is None else lm + a.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss = lm
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            dt = (time.perf_counter() - t0) / (step + 1)
            ax = f"  aux {aux_loss.item():.3f}" if aux_loss is not None else ""
            ax += "  loc/text %.3f/%.3f" % forward_loss.split
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f} (ema {ema:.4f}){ax}  lr {lr_at(step, a):.2e}  "
                  f"{dt:.3f} s/step  ETA {dt * (steps - step - 1) / 60:.1f} min", flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < steps and not a.bench:
            save_checkpoint(model, proc, tok_model, work + "/ckpt")
            validate(work + "/ckpt", a.val_scenes, f"step {step + 1}", a.threads)
            model.train()
    if a.bench:
        return 0
    train_s = time.perf_counter() - t0
    save_checkpoint(model, proc, tok_model, a.out)
    check_reload(model, a.out)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"saved {a.out}: {size / 1e6:.2f} MB in all; trained {a.steps} steps in {train_s / 60:.1f} min "
          f"(total {(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    validate(a.out, a.val_scenes * 2, "final, bf16 from disk", a.threads)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
