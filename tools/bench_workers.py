"""The persistent processes tools/bench.py alternates: one side each, talking JSON lines on stdin/stdout.

    python tools/bench_workers.py npvlm DIR [--root CHECKOUT] [--backend numpy] [--threads N] [--weights int8]
    python tools/bench_workers.py hf DIR [--device cpu] [--threads N]
    python tools/bench_workers.py bandwidth MIB [--threads N]

Each loads once and answers `{"n": new_tokens}` with the timings of one run, the CPU seconds it used
and the machine's busy CPU seconds over the same interval (so the caller can tell which rounds were
disturbed by other load). npvlm is timed from its own stats (image + prefill, then decode per token);
HF with generate(max_new_tokens=1) for the first token and generate(n, min_new_tokens=n) for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """All CPUs' non-idle time since boot, from /proc/stat (user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(fn):
    """Run fn() and return (its result, wall s, own CPU s, machine busy CPU s)."""
    b0, c0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, own_cpu_seconds() - c0, machine_busy_seconds() - b0


def image():
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))


def limit_threads(n):
    if n:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)


def npvlm_side(a):
    if a.root:
        sys.path.insert(0, a.root)
    import npvlm
    from npvlm.backends import get_backend

    t0 = time.perf_counter()
    backend = get_backend(a.backend)
    if a.threads:
        backend.set_threads(a.threads)  # BLAS, and numba once packed weights import it
    model = npvlm.load(a.dir, backend=backend, **({"weights": a.weights} if a.weights != "float32" else {}))
    load_s = time.perf_counter() - t0
    img = image()
    model.generate(img, "caption en", max_new_tokens=2)  # warm-up: BLAS threads, caches

    def run(n):
        st = model.generate(img, "caption en", max_new_tokens=n).stats
        steps = st.get("steps", st["new_tokens"])  # token steps run (the eos step included); older npvlm: new_tokens
        return {"first_token_s": st["image_seconds"] + st["prefill_seconds"],
                "ms_per_token": 1e3 * st["decode_seconds"] / max(steps - 1, 1), "new_tokens": st["new_tokens"]}

    serve(run, {"side": "npvlm", "weights": a.weights, "load_s": load_s, "root": os.path.dirname(os.path.dirname(npvlm.__file__))})


def hf_side(a):
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(a.dir, dtype=torch.float32).to(a.device).eval()
    load_s = time.perf_counter() - t0
    proc = PaliGemmaProcessor.from_pretrained(a.dir)
    inputs = proc(images=[image()], text=["<image>caption en"], return_tensors="pt").to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def gen(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t

    gen(2)

    def run(n):
        first, full = gen(1), gen(n)
        return {"first_token_s": first, "ms_per_token": 1e3 * (full - first) / (n - 1), "new_tokens": n}

    serve(run, {"side": "hf", "load_s": load_s, "torch": torch.__version__})


def best_read_gb_per_s(gemv, mats, passes: int = 3) -> float:
    """GB/s of the fastest of `passes` passes of gemv(w) over every matrix in `mats` (a roof is the most a pass
    reaches; a pass that other tenants slowed says nothing about it)."""
    best = 0.0
    for _ in range(passes):
        t = time.perf_counter()
        for w in mats:
            gemv(w)
        best = max(best, sum(w.nbytes for w in mats) / (time.perf_counter() - t) / 1e9)
    return best


def bandwidth_side(a):
    """Read bandwidth as decode sees it: float32 matrix-vector products over `mib` MiB, the best of several ways
    of making them, since a roof is the most any of them reaches: through BLAS as nn.linear calls it
    (x [1, 1, K] @ W.T) and as a plain `W @ v`, and (when numba is installed) numba's one-pass loop
    (backends/numba_kernels.py); over rows 1024 and 4096 wide (decode's widths: mid's and 3B's hidden sizes are
    1024-2304, their MLPs' 8192-16384). Each way reads two copies (the second is not in cache after the first),
    three passes a run, the fastest kept: other tenants of a shared host slow memory down in bursts that
    /proc/stat does not show, and a pass they hit says nothing about the roof."""
    import numpy as np

    mats = {}
    for K in (1024, 4096):
        rows = (a.mib << 20) // (2 * 4 * K)  # two copies of mib / 2 MiB each, per width
        mats[K] = [np.random.default_rng(i).standard_normal((rows, K), dtype=np.float32) for i in range(2)]
    xs = {K: np.ones((1, 1, K), np.float32) for K in mats}
    ways = {"blas": lambda w, x: x @ w.T, "blas_v": lambda w, x: w @ x[0, 0]}
    try:
        from npvlm.backends import numpy_backend

        numpy_backend.numba_environment()  # numba's threads and vectors as npvlm sets them
        from npvlm.backends import numba_kernels

        if numba_kernels.HAVE_NUMBA:
            import numba

            numba.set_num_threads(max(1, min(a.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)))
            ways["numba"] = lambda w, x: numba_kernels.dense_linear(x[0], w)
    except ImportError:  # an npvlm without the kernel module: BLAS alone
        pass
    for way in ways.values():
        for K, ws in mats.items():
            for w in ws:
                way(w, xs[K])  # warm-up: pages touched, numba compiled or loaded from its cache

    def run(_n):
        out = {f"{name}_gb_per_s": max(best_read_gb_per_s(lambda w: way(w, xs[K]), ws) for K, ws in mats.items())
               for name, way in ways.items()}
        out["gb_per_s"] = max(out.values())
        return out

    serve(run, {"side": "bandwidth", "mib": a.mib, "ways": list(ways), "widths": list(mats)})


def serve(run, hello):
    hello["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out, wall, cpu, busy = measured(lambda: run(req["n"]))
        out.update(wall_s=wall, own_cpu_s=cpu, machine_busy_s=busy,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps(out), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["npvlm", "hf", "bandwidth"])
    ap.add_argument("dir", help="checkpoint folder (bandwidth: MiB to read)")
    ap.add_argument("--root", help="npvlm: import npvlm from this checkout")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weights", default="float32", help="npvlm: float32 | bfloat16 | int8 (npvlm.load(weights=...))")
    a = ap.parse_args(argv)
    if a.side == "npvlm":
        # as the npvlm command sets it (npvlm/apps/start.py), before numpy loads OpenBLAS: its threads then sleep
        # right after a call instead of spinning ~0.1 s on the cores numba's kernels use (packed weights, and a
        # large float32 model's decode loop and its calibration at load)
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    limit_threads(a.threads)
    if a.side == "bandwidth":
        a.mib = int(a.dir)
    {"npvlm": npvlm_side, "hf": hf_side, "bandwidth": bandwidth_side}[a.side](a)


if __name__ == "__main__":
    main()
