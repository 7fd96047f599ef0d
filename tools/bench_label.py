"""Throughput of `npvlm label` (images/s) on N synthetic scenes at several batch sizes, embedded model.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/bench_label.py --scenes 200 --batch-sizes 1 8 32 [--prompts 1]
    ... --engine local ray:1 ray:2        # also the Ray engine with 1 and 2 actors (needs `pip install 'ray[data]'`)

Each (engine, batch size) labels the same folder into a fresh JSONL (PNG decode and the fsync'd writes
included) and all outputs are checked byte-identical. Local: model load excluded. Ray: `ray.init` excluded,
the actors' start and model load included (they happen inside the run), which is what a job pays once.
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
    ap.add_argument("--engine", nargs="+", default=["local"], help="local and/or ray:WORKERS (e.g. ray:1 ray:2)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local Ray instance")
    a = ap.parse_args()
    model = npvlm.load(backend=a.backend) if "local" in a.engine else None
    if any(e.startswith("ray") for e in a.engine):
        import ray

        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        for s in range(a.scenes):
            make_scene(s).image.save(os.path.join(d, f"s{s:04d}.png"))
        items, outs = list_inputs(d), []
        for eng in a.engine:
            engine = None
            if eng.startswith("ray"):
                from npvlm.label.ray_engine import RayEngine

                engine = RayEngine(None, a.backend, workers=int(eng.partition(":")[2] or 1))
            for b in a.batch_sizes:
                out = os.path.join(d, f"{eng.replace(':', '')}_b{b}.jsonl")
                s = run_job(model, items, PROMPTS[: a.prompts], out, batch_size=b, max_new_tokens=a.max_new_tokens,
                            progress=False, engine=engine)
                outs.append(open(out, "rb").read())
                print(f"{eng:6s} batch {b:3d}: {s.images} images x {a.prompts} prompt(s) in {s.seconds:6.2f} s = "
                      f"{s.images / s.seconds:6.1f} images/s, {s.done / s.seconds:6.1f} prompts/s", flush=True)
        print("outputs byte-identical across engines and batch sizes:", all(o == outs[0] for o in outs))
    if any(e.startswith("ray") for e in a.engine):
        ray.shutdown()


if __name__ == "__main__":
    main()
