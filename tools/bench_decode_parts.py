"""Where a float32 decode step's time goes: its weight reads (GEMVs) against the machine's read bandwidth,
fused or not, and the rest of the step.

    python tools/bench_decode_parts.py [--preset mid] [--rounds 12] [--skip-glue]

1. GEMVs alone. One decode step's matrix-vector products on random float32 weights of the preset's shapes,
   x [1, 1, in] @ W.T as nn.linear calls them, each round beside a bandwidth probe (the same call on two
   256 MiB matrices 1024 wide, best of three passes): their read rate as a fraction of the probe's.
2. Fused or not. The same GEMVs with q|k|v fused into one [(H + 2K) E, D] weight and gate|up into one
   [2F, D] weight: fewer, larger calls (issue 13 measured 3-4 ms a token saved this way on another machine).
   The separate weights are row views of the fused ones (whole rows: C-contiguous), so both read the same
   memory, and the 3B shapes fit once (11 GB), not twice. Reported: the median of fused / separate.
3. The rest of the step (`--skip-glue` skips it): a real decode step of tools/bench.py's random checkpoint of
   the preset, against the same step with every decode GEMV replaced by a cached result of its shape, so
   what remains is norms, RoPE, the cache write, attention, GELU, the residual adds and Python between them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_workers import best_read_gb_per_s  # noqa: E402

SHAPES = {  # hidden D, heads H, kv heads K, head dim E, MLP F, layers L, vocabulary V (tools/bench.py's PRESETS)
    "mid": (1024, 8, 1, 128, 8192, 8, 32768),
    "3b": (2048, 8, 1, 256, 16384, 18, 257216),
}


def weights(D, H, K, E, F, L, V, seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    separate, fused = [], []
    for _ in range(L):
        qkv, o, gu, d = w((H + 2 * K) * E, D), w(D, H * E), w(2 * F, D), w(D, F)
        q, k, v = qkv[:H * E], qkv[H * E:(H + K) * E], qkv[(H + K) * E:]
        separate.append([q, k, v, o, gu[:F], gu[F:], d])
        fused.append([qkv, o, gu, d])
    return separate, fused, w(V, D)


def step(layers, head, xs):  # every GEMV of one decode step
    for ws in layers:
        for w in ws:
            xs[w.shape[1]] @ w.T
    xs[head.shape[1]] @ head.T


def gemvs(preset: str, rounds: int):
    D, H, K, E, F, L, V = SHAPES[preset]
    separate, fused, head = weights(D, H, K, E, F, L, V)
    nbytes = sum(w.nbytes for ws in fused for w in ws) + head.nbytes
    xs = {n: np.ones((1, 1, n), np.float32) for n in {D, H * E, F}}
    mats = [np.random.default_rng(9 + i).standard_normal((65536, 1024), dtype=np.float32) for i in range(2)]
    x1024 = np.ones((1, 1, 1024), np.float32)

    def probe():  # the bandwidth probe: two 256 MiB matrices 1024 wide, best of three passes
        return best_read_gb_per_s(lambda w: x1024 @ w.T, mats)

    for _ in range(2):  # warm-up: pages touched, BLAS threads started
        step(separate, head, xs)
        step(fused, head, xs)
        probe()
    t = {"separate": [], "fused": []}
    frac = []
    for _ in range(rounds):
        before = probe()
        for name, layers in (("separate", separate), ("fused", fused)):
            t0 = time.perf_counter()
            step(layers, head, xs)
            t[name].append(time.perf_counter() - t0)
        after = probe()
        frac.append(nbytes / t["separate"][-1] / 1e9 / ((before + after) / 2))
    ratio = statistics.median(f / s for s, f in zip(t["separate"], t["fused"]))
    sep = statistics.median(t["separate"])
    print(f"{preset}: one decode step's GEMVs ({nbytes / 1e9:.3f} GB of float32 weights), {rounds} rounds: separate "
          f"{1e3 * sep:.2f} ms, at {statistics.median(frac):.0%} of the probe around them (median; "
          f"{min(frac):.0%}-{max(frac):.0%}); fused q|k|v and gate|up {1e3 * statistics.median(t['fused']):.2f} ms, "
          f"fused / separate {ratio:.3f} (median of rounds)")


def glue(preset: str, rounds: int):
    import npvlm
    from npvlm import nn
    from npvlm.models import gemma
    from tools.bench import checkpoint, decode_step_seconds

    model = npvlm.load(checkpoint(preset))
    real = nn.linear
    cached = {}

    def cached_linear(x, weight, bias=None):  # a decode GEMV (one row of x) answered from a cache of its shape
        if x.size != weight.shape[1]:
            return real(x, weight, bias)
        key = (tuple(x.shape), tuple(weight.shape), bias is None)
        if key not in cached:
            cached[key] = real(x, weight, bias)
        return cached[key]

    cached_linear.reference = real.reference  # numba's kernels fall back to nn.linear.reference: keep it reachable

    full, rest = [], []
    try:
        for _ in range(rounds):
            gemma.linear = nn.linear = real
            full.append(decode_step_seconds(model, 280, steps=20))
            gemma.linear = nn.linear = cached_linear
            rest.append(decode_step_seconds(model, 280, steps=20))
    finally:
        gemma.linear = nn.linear = real
    print(f"{preset}: a decode step at position 280 takes {1e3 * statistics.median(full):.2f} ms; without its "
          f"GEMVs {1e3 * statistics.median(rest):.3f} ms ({statistics.median(r / f for r, f in zip(rest, full)):.1%} "
          f"of the step; medians of {rounds} rounds)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mid", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--skip-glue", action="store_true", help="only the GEMVs (no checkpoint is written or loaded)")
    a = ap.parse_args(argv)
    gemvs(a.preset, a.rounds)
    if not a.skip_glue:
        glue(a.preset, max(3, a.rounds // 4))


if __name__ == "__main__":
    main()
