"""Train the small embedded SigLIP (npvlm/demo/siglip_model/) on the synthetic scenes, with torch.

    PYTHONPATH=. python tools/train_siglip_shapes.py [--steps 1500] [--out npvlm/demo/siglip_model]

An HF SiglipModel (vision 2 x 64 at 64 px / patch 8, text 2 x 64 over 16 tokens) learns caption <->
image pairs with the SigLIP sigmoid loss (Zhai et al. 2023, eq. 1; t' = log 10, b = -10 at init):
    L = -(1/|B|) sum_i sum_j log sigmoid(z_ij (exp(t') x_i . y_j + b)),  z_ij = +1 iff caption_i == caption_j
(equal captions in a batch are positives, not negatives). Training seeds are below scenes.EVAL_SEED0.
The folder is written with save_pretrained, an spiece.model trained on the captions, and the
tokenizer / image-processor configs, so HF and npvlm both load it.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def captions_corpus():
    from npvlm.demo.scenes import COLOURS, KINDS

    words = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c in COLOURS for k in KINDS]
    return [f"{a} left of {b}" for a in words for b in words] + [f"{a}, {b} and {a}" for a in words for b in words[:6]]


def main(argv=None):
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    from npvlm.demo.scenes import EVAL_SEED0, make_scene
    from npvlm.io.images import preprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=6000)
    ap.add_argument("--out", default="npvlm/demo/siglip_model")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    S, T = 64, 16
    os.makedirs(args.out, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions_corpus()), model_prefix=os.path.join(args.out, "spiece"),
                                   model_type="unigram", vocab_size=64, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
                                   minloglevel=2)
    os.remove(os.path.join(args.out, "spiece.vocab"))
    tok = SiglipTokenizer(vocab_file=os.path.join(args.out, "spiece.model"), model_max_length=T)
    cfg = SiglipConfig(vision_config=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                          image_size=S, patch_size=8),
                       text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=T, pad_token_id=1,
                                        bos_token_id=None, eos_token_id=1))
    model = SiglipModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    t0 = time.perf_counter()
    assert args.scenes < EVAL_SEED0
    scenes = [make_scene(seed, size=S) for seed in range(args.scenes)]
    pixels = torch.from_numpy(np.stack([preprocess(sc.image, S) for sc in scenes]))  # [N, 3, S, S]
    caps = [sc.caption for sc in scenes]
    ids = torch.tensor(tok(caps, padding="max_length", truncation=True)["input_ids"])  # [N, T]
    cap_id = torch.tensor([hash(c) for c in caps])
    print(f"{len(scenes)} scenes in {time.perf_counter() - t0:.1f} s")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        b = torch.randint(0, len(scenes), (args.batch,), generator=g)
        out = model(input_ids=ids[b], pixel_values=pixels[b])
        z = (cap_id[b][:, None] == cap_id[b][None, :]).float() * 2 - 1  # +1 for an equal caption
        loss = -torch.nn.functional.logsigmoid(z * out.logits_per_image).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} t {model.logit_scale.exp().item():.1f} b {model.logit_bias.item():.2f} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    SiglipImageProcessor(size={"height": S, "width": S}).save_pretrained(args.out)


if __name__ == "__main__":
    main()
