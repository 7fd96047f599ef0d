"""Time and peak memory of CLIP's softmax loss, SigLIP's sigmoid loss and the chunked sigmoid loss, forward + backward.

    OMP_NUM_THREADS=2 python tools/bench_contrastive.py --out bench_contrastive.json --plot bench_contrastive.png

Each (loss, batch) runs in a fresh subprocess (numpy, float32, width 1152, random embeddings,
t' = log 10, b = -10), so one configuration's memory never colours the next. Two memory figures:
  tracemalloc   peak bytes numpy allocated during the call, over what was held before it (numpy
                reports its buffers to tracemalloc): the arrays the algorithm needs
  rss           the process's peak resident set over its resident set before the call (getrusage):
                what the OS saw, BLAS workspaces included
Time is wall clock of one call (best of --repeats for batches up to 4096, one call above), taken with
tracemalloc running: its cost is per allocation and these functions make a few dozen large ones.
The unchunked losses are skipped above --max-unchunked (32k x 32k float32 is 4 GiB per matrix and they
hold about three), the chunked one runs there too. matplotlib (Agg) draws the plot: a tool-only dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("clip", "siglip", "siglip_chunked")


def rss_bytes() -> int:  # current resident set, from /proc (Linux)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one(loss: str, n: int, width: int, chunk: int, repeats: int) -> dict:
    """In the child: build the inputs, then time and measure one loss + gradients call."""
    import tracemalloc

    import numpy as np

    sys.path.insert(0, ROOT)
    from npvlm import contrastive as C

    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, width), dtype=np.float32)
    txt = (img + 0.5 * rng.standard_normal((n, width), dtype=np.float32))  # matching pairs correlate
    scale, bias = math.log(10.0), -10.0
    fn = {"clip": lambda: C.clip_loss_and_grads(img, txt, scale),
          "siglip": lambda: C.siglip_loss_and_grads(img, txt, scale, bias),
          "siglip_chunked": lambda: C.siglip_loss_chunked(img, txt, scale, bias, chunk)}[loss]
    rss0 = rss_bytes()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    times = []
    for _ in range(repeats):
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        value, grads = fn()
        times.append(time.perf_counter() - t0)
        peak = tracemalloc.get_traced_memory()[1] - base
        del grads
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"loss": loss, "n": n, "width": width, "chunk": chunk if loss == "siglip_chunked" else None,
            "seconds": min(times), "repeats": repeats, "tracemalloc_peak_bytes": peak, "rss_peak_bytes": rss_peak,
            "value": float(value), "threads": os.environ.get("OMP_NUM_THREADS")}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for loss in LOSSES:
        rs = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["n"])
        label = loss if loss != "siglip_chunked" else f"siglip chunked ({rs[0]['chunk'] if rs else '?'} texts)"
        ax_t.plot([r["n"] for r in rs], [r["seconds"] for r in rs], "o-", label=label)
        ax_m.plot([r["n"] for r in rs], [r["tracemalloc_peak_bytes"] / 2**20 for r in rs], "o-", label=label)
    for ax, what in ((ax_t, "forward + backward, s"), (ax_m, "peak numpy memory of the call, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch n (width 1152, float32, numpy)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Contrastive losses with their gradients, one CPU process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--chunk", type=int, default=1024, help="texts per block of the chunked sigmoid loss")
    ap.add_argument("--max-unchunked", type=int, default=16384, help="largest batch for the [n, n] forms")
    ap.add_argument("--repeats", type=int, default=3, help="calls per config for batches <= 4096 (best time)")
    ap.add_argument("--out", default="bench_contrastive.json")
    ap.add_argument("--plot", default="bench_contrastive.png")
    ap.add_argument("--one", nargs=2, metavar=("LOSS", "N"), help=argparse.SUPPRESS)  # the child's entry
    a = ap.parse_args(argv)
    if a.one:
        n = int(a.one[1])
        print(json.dumps(run_one(a.one[0], n, a.width, a.chunk, a.repeats if n <= 4096 else 1)))
        return 0
    rows, skipped = [], []
    for n in a.batches:
        for loss in LOSSES:
            if loss != "siglip_chunked" and n > a.max_unchunked:
                skipped.append({"loss": loss, "n": n, "why": f"[n, n] float32 = {n * n * 4 / 2**30:.0f} GiB per matrix"})
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--one", loss, str(n), "--width", str(a.width),
                   "--chunk", str(a.chunk), "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{loss:15s} n={n:6d}  {r['seconds']:8.3f} s  tracemalloc {r['tracemalloc_peak_bytes'] / 2**20:9.1f} MiB"
                  f"  rss {r['rss_peak_bytes'] / 2**20:9.1f} MiB  loss {r['value']:.4f}", file=sys.stderr, flush=True)
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "skipped": skipped, "command": " ".join(sys.argv)}, f, indent=1)
    plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
