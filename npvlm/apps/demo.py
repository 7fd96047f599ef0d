"""`npvlm demo`: the embedded shapes model on a synthetic scene: caption, count, detect, draw."""

from __future__ import annotations

import os
import sys
import time

from ..errors import ImageError
from .cli import add_model_args, check_output, format_stats, load_model


def add_parser(sub):
    d = sub.add_parser("demo", help="run the embedded shapes model on a synthetic scene")
    add_model_args(d)
    d.add_argument("--seed", type=int, default=7, help="which scene to make (default 7)")
    d.add_argument("--out", default=None, help="where to write the picture with boxes (default: npvlm-demo-SEED.png here)")
    return d


def run(args) -> int:
    from ..demo.scenes import make_scene
    from ..postprocess import draw_detections

    out = args.out or f"npvlm-demo-{args.seed}.png"  # in the current folder, where the user will look
    check_output(out, "--out")
    model = load_model(args)
    scene = make_scene(args.seed)
    img = scene.image
    print(f"scene {args.seed}: {len(scene.shapes)} shape(s); truth: {scene.caption}")
    prompts = ["caption en", "answer en how many shapes?"] + list(dict.fromkeys(f"detect {s.name}" for s in scene.shapes))
    dets, t0 = [], time.perf_counter()
    for p in prompts:
        res = model.generate(img, p, max_new_tokens=32)
        print(f"  {p:<28} -> {res.text}")
        dets += res.detections
    try:
        draw_detections(img, dets).save(out)
    except (OSError, ValueError) as e:
        raise ImageError(f"{out}: cannot write the demo image ({e})") from None
    print(f"boxes drawn: {os.path.abspath(out)}")
    print(f"{len(prompts)} prompts in {time.perf_counter() - t0:.2f} s; last: " + format_stats(res.stats, model),
          file=sys.stderr)
    return 0


