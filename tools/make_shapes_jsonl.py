"""Write a fine-tuning set of synthetic scenes for `npvlm finetune`: PNG images + a JSONL of (image, prefix, suffix).

    python tools/make_shapes_jsonl.py --out /tmp/shapes_ft --rows 96000 [--multi-share 0.5] [--seed0 300000]
    npvlm finetune --model npvlm/demo/shapes_model --data /tmp/shapes_ft/train.jsonl --out ... --train all

Each row is `{"image": "images/<seed>.png", "prefix": prompt, "suffix": answer}` (the image path relative
to the JSONL, the format `npvlm finetune` and roboflow's maestro read). Scenes are `scenes.make_scene(seed)`
for seeds seed0, seed0 + 1, ...; `--per-scene` rows of one scene sit next to each other (as one step of
tools/train_shapes.py asks two questions of each of its scenes). Training seeds must stay below the
held-out ones (scenes.EVAL_SEED0) and train_shapes' validation seeds (900000+): checked.

A row is, with probability `--multi-share`, the multi-class task `detect A ; B` (scenes.multi_detect_task:
"colour kind" names `--named-share` of the time, kinds otherwise; three classes `--three-share` of the time,
two otherwise); otherwise a replay
of the tasks the model already knows, drawn as the shipped model's last training run drew them
(train_shapes.TASK_MIX with `--detect-share 0.4`), so that fine-tuning forgets nothing. Deterministic
from --seed. NumPy and Pillow only (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from train_shapes import TASK_MIX, VAL_SEED0  # noqa: E402

from npvlm.demo.scenes import EVAL_SEED0, make_scene, multi_detect_task, task_kind, tasks  # noqa: E402


def replay_mix(detect_share: float, caption_share: float | None = None) -> dict[str, float]:
    """train_shapes' task probabilities with detection at `detect_share` of the questions, as its --detect-share
    (and captions at `caption_share`, when given: the other tasks keep their ratios in what is left)."""
    fixed = {"detect": detect_share} if caption_share is None else {"detect": detect_share, "caption": caption_share}
    if sum(fixed.values()) > 1:
        raise ValueError(f"replay shares {fixed} add up to more than 1")
    others = {k: v for k, v in TASK_MIX.items() if k not in fixed}
    total = sum(others.values())
    return {**{k: v / total * (1 - sum(fixed.values())) for k, v in others.items()}, **fixed}


def replay_task(scene, rng, mix: dict[str, float]) -> tuple[str, str]:
    """One known task of the scene: a task kind drawn from `mix`, then one of its prompts uniformly."""
    by: dict[str, list] = {}
    for p, a in tasks(scene):
        by.setdefault(task_kind(p), []).append((p, a))
    kinds = list(mix)
    kind = kinds[int(rng.choice(len(kinds), p=np.array([mix[k] for k in kinds]) / sum(mix.values())))]
    pool = by.get(kind) or by["detect"]  # "what color" needs a kind present once: fall back as train_shapes does
    return pool[int(rng.integers(len(pool)))]


def rows_for(scene, rng, per_scene: int, multi_share: float, mix, named_share: float = 0.5,
             three_share: float = 0.25) -> list[tuple[str, str]]:
    out = []
    for _ in range(per_scene):
        if rng.random() < multi_share:
            n_classes = 3 if rng.random() < three_share else 2
            out.append(multi_detect_task(scene, rng, n_classes=n_classes, named=rng.random() < named_share))
        else:
            out.append(replay_task(scene, rng, mix))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder: writes train.jsonl and images/")
    ap.add_argument("--rows", type=int, default=96_000, help="rows in all (steps x batch size, so none repeats)")
    ap.add_argument("--per-scene", type=int, default=2, help="consecutive rows asked of one scene")
    ap.add_argument("--multi-share", type=float, default=0.5, help="fraction of rows that are `detect A ; B`")
    ap.add_argument("--named-share", type=float, default=0.5, help="fraction of `detect A ; B` rows naming colour + kind")
    ap.add_argument("--three-share", type=float, default=0.25, help="fraction of `detect A ; B` rows with three classes")
    ap.add_argument("--detect-share", type=float, default=0.4, help="fraction of replay rows that are single-class detect")
    ap.add_argument("--caption-share", type=float, help="fraction of replay rows that are captions (default: "
                    "train_shapes' ratio of what detection leaves)")
    ap.add_argument("--seed0", type=int, default=300_000, help="first scene seed")
    ap.add_argument("--seed", type=int, default=0, help="seeds the choice of tasks")
    a = ap.parse_args(argv)
    n_scenes = -(-a.rows // a.per_scene)
    if a.seed0 < 0 or a.seed0 + n_scenes > min(EVAL_SEED0, VAL_SEED0):
        ap.error(f"--seed0 {a.seed0} + {n_scenes} scenes reaches the validation/held-out seeds ({VAL_SEED0}+)")
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    rng, mix = np.random.default_rng(a.seed), replay_mix(a.detect_share, a.caption_share)
    counts: dict[str, int] = {}
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for k in range(n_scenes):
            seed = a.seed0 + k
            scene = make_scene(seed)
            rel = f"images/{seed}.png"
            scene.image.save(os.path.join(a.out, rel))
            n_rows = min(a.per_scene, a.rows - k * a.per_scene)
            for prefix, suffix in rows_for(scene, rng, n_rows, a.multi_share, mix, a.named_share, a.three_share):
                f.write(json.dumps({"image": rel, "prefix": prefix, "suffix": suffix}) + "\n")
                counts[task_kind(prefix)] = counts.get(task_kind(prefix), 0) + 1
            if (k + 1) % 5000 == 0:
                print(f"{k + 1}/{n_scenes} scenes", file=sys.stderr, flush=True)
    share = "  ".join(f"{t} {n / a.rows:.3f}" for t, n in sorted(counts.items()))
    print(f"{a.out}/train.jsonl: {a.rows} rows of {n_scenes} scenes (seeds {a.seed0}..{a.seed0 + n_scenes - 1}); {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
