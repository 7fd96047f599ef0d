"""Throughput of `npvlm label` (images/s) on N synthetic scenes at several batch sizes, embedded model.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/bench_label.py --scenes 200 --batch-sizes 1 8 32 [--prompts 1]

Each batch size labels the same folder into a fresh JSONL (model load excluded, PNG decode and the fsync'd
writes included) and the outputs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import npvlm
from npvlm.demo.scenes import make_scene
from npvlm.label.inputs import list_inputs
from npvlm.label.job import run_job

PROMPTS = ["caption en", "detect circle ; square ; triangle", "answer en how many shapes?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompts", type=int, default=1, help="how many of the 3 prompts per image")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--backend", default="numpy")
    a = ap.parse_args()
    model = npvlm.load(backend=a.backend)
    with tempfile.TemporaryDirectory() as d:
        for s in range(a.scenes):
            make_scene(s).image.save(os.path.join(d, f"s{s:04d}.png"))
        items, outs = list_inputs(d), []
        for b in a.batch_sizes:
            out = os.path.join(d, f"b{b}.jsonl")
            s = run_job(model, items, PROMPTS[: a.prompts], out, batch_size=b, max_new_tokens=a.max_new_tokens,
                        progress=False)
            outs.append(open(out, "rb").read())
            print(f"batch {b:3d}: {s.images} images x {a.prompts} prompt(s) in {s.seconds:6.2f} s = "
                  f"{s.images / s.seconds:6.1f} images/s, {s.done / s.seconds:6.1f} prompts/s")
        print("outputs byte-identical across batch sizes:", all(o == outs[0] for o in outs))


if __name__ == "__main__":
    main()
