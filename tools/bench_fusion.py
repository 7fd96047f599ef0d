"""Would fusing q|k|v and gate|up into one weight each make a float32 decode step faster here?

    python tools/bench_fusion.py [--preset mid] [--rounds 12]

A decode step's Linear layers are matrix-vector products, each one BLAS call. Fusing the three attention
projections into one [(H + 2K) E, D] weight, and the MLP's gate and up into one [2F, D] weight, makes fewer
and larger calls (issue 13 measured 3-4 ms a token saved this way on another machine). This tool times one
decode step's worth of GEMVs on random float32 weights of a preset's shapes (tools/bench.py's PRESETS or a
paligemma config preset of tools/make_checkpoint.py), separate and fused, taking turns over `rounds`, and
prints the medians and the median of fused / separate. Nothing else of the model runs: this isolates the
weights' reads, which is all fusion could change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # hidden D, heads H, kv heads K, head dim E, MLP F, layers L, vocabulary V
    "mid": (1024, 8, 1, 128, 8192, 8, 32768),
    "3b": (2048, 8, 1, 256, 16384, 18, 257216),
}


def weights(D, H, K, E, F, L, V, seed=0):
    """The fused weights, and the separate ones as row views of them (C-contiguous: a block of whole rows), so
    both read the same memory and the 3B shapes fit once (11 GB), not twice."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    separate, fused = [], []
    for _ in range(L):
        qkv, o, gu, d = w((H + 2 * K) * E, D), w(D, H * E), w(2 * F, D), w(D, F)
        q, k, v = qkv[:H * E], qkv[H * E:(H + K) * E], qkv[(H + K) * E:]
        separate.append([q, k, v, o, gu[:F], gu[F:], d])
        fused.append([qkv, o, gu, d])
    return separate, fused, w(V, D)


def step(layers, head, xs):  # every GEMV of one decode step, x [1, 1, in] @ W.T as nn.linear calls it
    for ws in layers:
        for w in ws:
            xs[w.shape[1]] @ w.T
    xs[head.shape[1]] @ head.T


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args(argv)
    D, H, K, E, F, L, V = SHAPES[a.preset]
    separate, fused, head = weights(D, H, K, E, F, L, V)
    xs = {n: np.ones((1, 1, n), np.float32) for n in {D, H * E, F}}
    for _ in range(2):  # warm-up: pages touched, BLAS threads started
        step(separate, head, xs)
        step(fused, head, xs)
    times = {"separate": [], "fused": []}
    for _ in range(a.rounds):
        for name, layers in (("separate", separate), ("fused", fused)):
            t = time.perf_counter()
            step(layers, head, xs)
            times[name].append(time.perf_counter() - t)
    ratio = statistics.median(f / s for s, f in zip(times["separate"], times["fused"]))
    print(f"{a.preset}: one decode step's GEMVs, float32, {a.rounds} rounds taking turns: separate "
          f"{1e3 * statistics.median(times['separate']):.2f} ms, fused q|k|v and gate|up "
          f"{1e3 * statistics.median(times['fused']):.2f} ms; fused / separate, median of rounds: {ratio:.3f}")


if __name__ == "__main__":
    main()
