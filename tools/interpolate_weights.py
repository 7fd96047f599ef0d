"""Blend a fine-tuned model with the model it started from, weight by weight (WiSE-FT, Wortsman et al. 2022).

    python tools/interpolate_weights.py --base npvlm/demo/shapes_model --tuned /tmp/t2 --alpha 0.7 --out /tmp/wise

Every tensor becomes (1 - alpha) * base + alpha * tuned, computed in float32: alpha 0 is the base model,
alpha 1 the fine-tuned one. Fine-tuning moves the weights a short way along a path that keeps the old
tasks nearly as good as at its start; a point part-way along it often keeps most of what fine-tuning
taught while giving back most of what it made the model forget. Choose alpha on scenes that are not the
held-out ones (`tools/eval_shapes.py --split val`).

OUT is a complete model folder: every file of --tuned (config, tokenizer, processor files) copied, and
model.safetensors holding the blend in float32. Both models must have the same tensor names and shapes
(checked before anything is written); the folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from npvlm.io.safetensors_file import read_safetensors  # noqa: E402  (F32, BF16, F16 -> float32, validated)


def blend(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """(1 - alpha) * base + alpha * tuned for every tensor; the two must name the same tensors, of the same shapes."""
    if set(base) != set(tuned):
        only = sorted(set(base) ^ set(tuned))
        raise ValueError(f"the two models name different tensors: {only[:3]}{' ...' if len(only) > 3 else ''}")
    for k in base:
        if base[k].shape != tuned[k].shape:
            raise ValueError(f"{k}: shape {base[k].shape} in the base model, {tuned[k].shape} in the tuned one")
    a = np.float32(alpha)
    return {k: (np.float32(1) - a) * base[k] + a * tuned[k] for k in base}  # float32 throughout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the model fine-tuning started from")
    ap.add_argument("--tuned", required=True, help="the fine-tuned model (its other files are copied)")
    ap.add_argument("--alpha", type=float, required=True, help="0 = base, 1 = tuned")
    ap.add_argument("--out", required=True, help="new folder (must not exist)")
    a = ap.parse_args(argv)
    if not 0.0 <= a.alpha <= 1.0:
        ap.error(f"--alpha {a.alpha} is outside [0, 1]")
    if os.path.exists(a.out):
        ap.error(f"--out {a.out} exists")
    from safetensors.numpy import save_file

    blended = blend(*(read_safetensors(os.path.join(d, "model.safetensors")) for d in (a.base, a.tuned)), a.alpha)
    parent = os.path.dirname(os.path.abspath(a.out))
    tmp = tempfile.mkdtemp(prefix=".blend-", dir=parent)
    try:
        for name in os.listdir(a.tuned):
            src = os.path.join(a.tuned, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
                shutil.copy2(src, os.path.join(tmp, name))
        save_file(blended, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.rename(tmp, a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{a.out}: {len(blended)} tensors, (1 - {a.alpha}) * {a.base} + {a.alpha} * {a.tuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
