"""Zero-shot accuracy of a SigLIP folder on held-out synthetic scenes (seeds from scenes.EVAL_SEED0).

    PYTHONPATH=. python tools/eval_siglip_shapes.py [--model npvlm/demo/siglip_model] [-n 200]

  one shape:  top-1 over the 18 labels "a {colour} {kind}" (chance 1/18)
  two shapes: the true caption against the same two shapes in swapped order (chance 1/2)
  retrieval:  over n held-out scenes of two shapes, recall@1 and @5 image -> text among the n captions and
              text -> image among the n images (a caption that several scenes share counts for each of them)
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None):
    import npvlm
    from npvlm.demo.scenes import COLOURS, EVAL_SEED0, KINDS, caption, make_scene

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="npvlm/demo/siglip_model")
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args(argv)
    model = npvlm.load(args.model)
    S = model.config.vision.image_size
    labels = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c in COLOURS for k in KINDS]
    lab_emb = model.embed_texts(labels)
    ones = [make_scene(EVAL_SEED0 + i, size=S, n_shapes=1) for i in range(args.n)]
    img = model.embed_images([sc.image for sc in ones])
    top1 = np.mean([labels[int(np.argmax(row))] == sc.caption for row, sc in zip(img @ lab_emb.T, ones)])
    twos = [make_scene(EVAL_SEED0 + 10_000 + i, size=S, n_shapes=2) for i in range(args.n)]
    img2 = model.embed_images([sc.image for sc in twos])
    right = model.embed_texts([sc.caption for sc in twos])
    swapped = model.embed_texts([caption(sc.shapes[::-1]) for sc in twos])
    order = np.mean(np.sum(img2 * right, -1) > np.sum(img2 * swapped, -1))
    caps = [sc.caption for sc in twos]
    sim = img2 @ right.T  # [n images, n captions]
    same = np.array([[a == b for b in caps] for a in caps])  # the right answers, duplicates included
    recall = {}
    for k in (1, 5):
        i2t = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        t2i = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
        recall[k] = (np.mean([same[i, i2t[i]].any() for i in range(len(caps))]),
                     np.mean([same[t, t2i[t]].any() for t in range(len(caps))]))
    print(f"one shape, top-1 of 18 labels: {top1:.3f} (n={args.n}, chance 0.056)")
    print(f"two shapes, caption vs swapped order: {order:.3f} (n={args.n}, chance 0.5)")
    print(f"retrieval over {args.n} two-shape scenes ({len(set(caps))} distinct captions): image->text recall@1 "
          f"{recall[1][0]:.3f}, @5 {recall[5][0]:.3f}; text->image recall@1 {recall[1][1]:.3f}, @5 {recall[5][1]:.3f}")


if __name__ == "__main__":
    main()
