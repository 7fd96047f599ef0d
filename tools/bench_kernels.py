"""Benchmark the packed-weight kernels and the lean NumPy ops against their references.

    PYTHONPATH=$PWD python tools/bench_kernels.py --threads 2 --rounds 40 --json bench_kernels.json

Part 1, linear at DRAM-bound sizes: numpy float32 `x @ W.T` vs the bf16 and int8 kernels
(backends/numba_kernels.py) and, for reference, the path without numba (widen whole, then matmul).
Each variant cycles through enough copies of its weight that one round reads more than the L3
(so every call streams from DRAM), the variants alternate within each round (their order rotates
each round), and the table gives medians: fair ratios on a machine that others are loading too.
GB/s counts the bytes of weights read. Part 2: the lean elementwise ops vs nn's references.

OpenBLAS's idle threads spin for ~2^28 cycles after each call, on the cores numba's threads then need: with the
float32 variant's BLAS call just before, the kernels measured at 2 threads ran slower than at 1 (int8 5.7 against
9.9 Gparam/s). A model never alternates the two like this (its decode steps run on one BLAS thread beside the
kernels, and the CLI sets the shortest wait), so the tool sets OPENBLAS_THREAD_TIMEOUT=4 too, unless it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS: see the docstring
import numpy as np  # noqa: E402

from npvlm import fast_ops, nn  # noqa: E402
from npvlm.backends import numba_kernels, numpy_fast, packing  # noqa: E402

STREAM_BYTES = 3 * 32 << 20  # read at least 3x a 32 MiB L3 per call sequence, so no variant runs from cache


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(variants: dict, rounds: int) -> dict:
    """Run each variant once per round, the order rotating; {name: [seconds per round]}."""
    names = list(variants)
    for fn in variants.values():  # warm up (numba compiles or loads its cache here)
        fn()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(_timed(variants[n]))
    return times


def _cycler(items, call):
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(items)
        return call(items[state["i"]])

    return run


def _copies(make, nbytes):
    return [make() for _ in range(max(1, -(-STREAM_BYTES // nbytes)))]


def linear_variants(N: int, K: int, M: int, rng, with_reference: bool) -> "tuple[dict, dict]":
    w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.02)
    x = rng.standard_normal((M, K), dtype=np.float32)
    f32 = _copies(lambda: w.copy(), w.nbytes)
    bf = _copies(lambda: packing.bf16_weight(w), N * K * 2)
    i8 = _copies(lambda: packing.int8_weight(w), N * K)
    variants = {
        "float32 numpy": _cycler(f32, lambda W: x @ W.T),
        "bf16 kernel": _cycler(bf, lambda W: numba_kernels.packed_linear(x, W)),
        "int8 kernel": _cycler(i8, lambda W: numba_kernels.packed_linear(x, W)),
    }
    if with_reference:  # what nn.linear does without numba: widen the whole weight, then matmul
        variants["bf16 widen+matmul"] = _cycler(bf, lambda W: nn.linear.reference(x, W))
        variants["int8 widen+matmul"] = _cycler(i8, lambda W: nn.linear.reference(x, W))
    weight_bytes = {"float32": 4 * N * K, "bf16": 2 * N * K, "int8": N * K + 4 * N}
    return variants, {n: weight_bytes[n.split()[0]] for n in variants}


def bench_linear(shapes, rows, rounds, with_reference) -> list:
    rng = np.random.default_rng(0)
    results = []
    for N, K in shapes:
        for M in rows:
            variants, nbytes = linear_variants(N, K, M, rng, with_reference)
            times = alternate(variants, rounds)
            base = float(np.median(times["float32 numpy"]))
            for name, ts in times.items():
                t = float(np.median(ts))
                results.append({"out": N, "in": K, "M": M, "variant": name, "median_ms": 1e3 * t,
                                "gparam_s": N * K / t / 1e9, "gb_s": nbytes[name] / t / 1e9,
                                "speedup_vs_float32": base / t, "rounds": rounds})
            del variants
    return results


def bench_lean(rounds) -> list:
    rng = np.random.default_rng(1)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    cases = [("gelu_tanh", (r(1, 256, 16384) * 3,)), ("gelu_tanh", (r(1, 1, 16384),)),
             ("gelu_tanh", (r(1, 256, 4304),)),
             ("rms_norm", (r(1, 266, 2048), r(2048))), ("rms_norm", (r(1, 1, 2048), r(2048))),
             ("layer_norm", (r(1, 256, 1152), r(1152), r(1152))),
             ("softmax", (r(1, 8, 266, 266),)), ("softmax", (r(1, 8, 1, 266),))]
    results = []
    for name, args in cases:
        ref, lean = getattr(nn, name).reference, numpy_fast.LEAN_OPS[name]
        a, b = ref(*args), lean(*args)
        times = alternate({"reference": lambda: ref(*args), "lean": lambda: lean(*args)}, rounds)
        t_ref, t_lean = (float(np.median(times[k])) for k in ("reference", "lean"))
        results.append({"op": name, "shape": list(args[0].shape), "reference_ms": 1e3 * t_ref, "lean_ms": 1e3 * t_lean,
                        "speedup": t_ref / t_lean, "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
                        "bit_identical": bool(np.array_equal(a, b))})
    return results


def environment(threads: int) -> dict:
    from threadpoolctl import threadpool_info

    info = {"platform": platform.platform(), "processor": platform.processor(), "numpy": np.__version__,
            "threads": threads, "threadpools": threadpool_info(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP", "NUMBA", "MKL"))}}
    if numba_kernels.HAVE_NUMBA:
        import numba

        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--rows", default="1", help="comma-separated activation rows M (decode 1..8, prefill e.g. 300)")
    ap.add_argument("--shapes", default="16384x2048,2048x16384", help="weights out x in")
    ap.add_argument("--reference", action="store_true", help="also time the no-numba path (widen whole, then matmul)")
    ap.add_argument("--skip-lean", action="store_true")
    ap.add_argument("--json", default="bench_kernels.json")
    a = ap.parse_args(argv)
    if not numba_kernels.HAVE_NUMBA:
        raise SystemExit("bench_kernels: numba is not installed (pip install 'npvlm[fast]')")
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(a.threads)
    with threadpool_limits(limits=a.threads), fast_ops.reference_only():
        env = environment(a.threads)
        print(json.dumps({k: env[k] for k in ("numpy", "threads", "env")}), "\nthreadpools:",
              [(p["internal_api"], p.get("architecture"), p["num_threads"]) for p in env["threadpools"]])
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
        lin = bench_linear(shapes, [int(m) for m in a.rows.split(",")], a.rounds, a.reference)
        print(f"\n{'weight':>12} {'M':>4} {'variant':<20} {'ms':>8} {'Gparam/s':>9} {'GB/s':>7} {'x f32':>6}")
        for r in lin:
            print(f"{r['out']:>6}x{r['in']:<5} {r['M']:>4} {r['variant']:<20} {r['median_ms']:8.3f} {r['gparam_s']:9.2f}"
                  f" {r['gb_s']:7.2f} {r['speedup_vs_float32']:6.2f}")
        lean = [] if a.skip_lean else bench_lean(a.rounds)
        if lean:
            print(f"\n{'op':<11} {'shape':<18} {'ref ms':>8} {'lean ms':>8} {'x':>5} {'max rel diff':>13}")
        for r in lean:
            print(f"{r['op']:<11} {str(tuple(r['shape'])):<18} {r['reference_ms']:8.3f} {r['lean_ms']:8.3f}"
                  f" {r['speedup']:5.2f} {r['max_rel_diff']:13.1e}{'  (bit-identical)' if r['bit_identical'] else ''}")
    with open(a.json, "w") as f:
        json.dump({"environment": env, "linear": lin, "lean_ops": lean}, f, indent=1)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
