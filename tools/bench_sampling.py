"""Time one sampling step at PaliGemma's vocabulary: the seam's top_candidates (argpartition, then a sort of
the candidates) against the reference (a stable sort of the whole vocabulary).

    python tools/bench_sampling.py [--vocab 257216] [--rounds 30] [--threads 1]

Three cases: top-k 40; top-p 0.9 on peaked logits (a small nucleus); top-p 0.9 on flat logits (a nucleus over
1024 tokens: the fast path falls back to the full sort). Medians over alternating rounds, in ms a token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from npvlm import fast_ops  # noqa: E402
from npvlm.backends import get_backend  # noqa: E402
from npvlm.generation.sampling import sample  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=257216)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    get_backend("numpy").set_threads(a.threads)  # registers the numpy fast ops, and limits BLAS
    rng = np.random.default_rng(0)
    peaked = (rng.standard_normal((1, a.vocab)) * 12).astype(np.float32)
    flat = (rng.standard_normal((1, a.vocab)) * 0.01).astype(np.float32)
    cases = {"top-k 40": (peaked, 1.0, 40, 1.0), "top-p 0.9, peaked": (peaked, 1.0, 0, 0.9),
             "top-p 0.9, flat": (flat, 1.0, 0, 0.9)}
    for name, (logits, t, k, p) in cases.items():
        times = {"fast": [], "reference": []}
        for r in range(a.rounds + 1):
            for way in ("fast", "reference") if r % 2 else ("reference", "fast"):
                t0 = time.perf_counter()
                if way == "fast":
                    ids = sample(logits, t, k, p, [0.3])
                else:
                    with fast_ops.reference_only():
                        ids_ref = sample(logits, t, k, p, [0.3])
                if r:
                    times[way].append(time.perf_counter() - t0)
        assert int(ids[0]) == int(ids_ref[0]), (name, ids, ids_ref)
        f, ref = (1e3 * statistics.median(times[w]) for w in ("fast", "reference"))
        print(f"{name:20s} reference {ref:7.2f} ms   top_candidates {f:7.2f} ms   ({ref / f:.1f}x), same id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
