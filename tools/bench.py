"""Benchmarks, measured as ratios in one run (these machines are noisy): never a timed test.

    python tools/bench.py decode-flat            # time per decoded token at position 30 vs 300 (KV cache)
    python tools/bench.py vs-hf [--preset mid]   # npvlm vs HF transformers on the same checkpoint
    python tools/bench.py vs-hf --weights float32,bfloat16,int8   # npvlm with each, against HF float32
    python tools/bench.py vs-hf --preset 3b --dtype bfloat16 --weights bfloat16   # the real 3B shapes, a bf16 file
    python tools/bench.py vs-hf --backend cupy   # the same on a GPU (torch on CUDA as the reference)
    python tools/bench.py ab --against DIR       # this checkout vs another checkout of npvlm, same run
    python tools/bench.py ab --against DIR --dtype bfloat16 --weights int8    # the same with packed weights

Checkpoints are random, written by tools/make_checkpoint.py into a temp folder (or --dir).
"""

from __future__ import annotations

import argparse
import json
import os
import math
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import npvlm  # noqa: E402
from npvlm.kv_cache import KVCache  # noqa: E402
from npvlm.models.paligemma import advance, decode_step, prefill  # noqa: E402
from npvlm.models.paligemma_inputs import PromptBatch  # noqa: E402
from tools.make_checkpoint import make_checkpoint  # noqa: E402

# ~265 M parameters (TESTING-NOTES' mid model): vision 6 x 768, text 8 x 1024, MQA, head dim 128, 256 image tokens
PRESETS = {
    "tiny": dict(preset="tiny-tok", vocab=1536, hidden=64, heads=4, kv_heads=1, head_dim=16, layers=2, intermediate=128),
    "mid": dict(preset="tiny-tok", vocab=32768, vision_hidden=768, vision_intermediate=3072, vision_layers=6,
                vision_heads=12, image_size=224, patch_size=14, hidden=1024, intermediate=8192, layers=8, heads=8,
                kv_heads=1, head_dim=128),
    # the real PaliGemma 1 3B shapes (2.92 B parameters: So400m vision at 224 px, Gemma 2B, the 257216-word vocabulary)
    "3b": dict(preset="pg1-3b-224"),
}


def checkpoint(name, where=None, dtype="float32"):
    """The preset's random checkpoint, written once into a folder whose name carries its shapes and dtype (so a
    folder left by another tool, or by another version of the preset, is never silently reused)."""
    kw = PRESETS[name]
    tag = "-".join(f"{k}{v}" for k, v in sorted({**kw, "dtype": dtype}.items())).replace("_", "")
    d = where or os.path.join(tempfile.gettempdir(), f"npvlm-bench-{name}-{tag}")
    if not os.path.exists(os.path.join(d, "model.safetensors")) and not os.path.exists(
            os.path.join(d, "model.safetensors.index.json")):
        kw = dict(kw)
        make_checkpoint(d, kw.pop("preset"), tokenizer=True, dtype=dtype, **kw)
    return d


def decode_step_seconds(model, position, steps=20):
    """Median time of one cached decode step whose new token sits at `position` (after a prefill of position-1)."""
    cfg, xp, be = model.config, model.backend.xp, model.backend
    t = cfg.text
    T = position - 1
    host = {"ids": [[5] * T], "positions": [list(range(1, T + 1))], "valid": [[True] * T], "prefix": [[False] * T],
            "image_slot": [[-1] * T]}
    prompt = PromptBatch(host, *(xp.asarray(host[k], dtype=dt) for k, dt in
                                 [("ids", xp.int64), ("positions", xp.int64), ("valid", xp.bool), ("prefix", xp.bool),
                                  ("image_slot", xp.int64)]))
    like = model.params["language_model"]["model"]["norm"]["weight"]  # float32 on the device (embed_tokens may be packed)
    times = []
    for _ in range(3):  # repeat the whole measurement; keep the best median (least disturbed by noise)
        cache = KVCache(like, t.num_hidden_layers, 1, t.num_key_value_heads, T + steps + 1, t.head_dim)
        logits, state = prefill(model.params, prompt, None, cache, cfg=cfg)
        nxt = xp.argmax(logits, axis=-1)
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state = advance(state, nxt)
            with be.decoding():
                nxt = xp.argmax(decode_step(model.params, state, cfg=cfg), axis=-1)
            be.to_host(nxt)
            step_times.append(time.perf_counter() - t0)
        times.append(statistics.median(step_times))
    return min(times)


def cmd_decode_flat(a):
    model = npvlm.load(checkpoint("tiny", a.dir), backend=a.backend)
    t30, t300 = decode_step_seconds(model, 30), decode_step_seconds(model, 300)
    res = {"model": "tiny", "backend": a.backend, "ms_per_token_at_30": t30 * 1e3, "ms_per_token_at_300": t300 * 1e3,
           "ratio_300_over_30": t300 / t30}
    print(f"decode step at position 30: {t30 * 1e3:.3f} ms; at 300: {t300 * 1e3:.3f} ms; ratio {t300 / t30:.2f} "
          f"(target <= 1.5)")
    return res


class Worker:
    """One side of a comparison in its own persistent process (tools/bench_workers.py)."""

    def __init__(self, *args):
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_workers.py")
        self.proc = subprocess.Popen([sys.executable, worker, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench worker {self.proc.args[2:]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, n: int) -> dict:
        self.proc.stdin.write(json.dumps({"n": n}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _other_cores(out: dict) -> dict:
    """Mark a worker's reply with the cores other processes kept busy during its run."""
    out["other_cores"] = max(0.0, out["machine_busy_s"] - out["own_cpu_s"]) / max(out["wall_s"], 1e-9)
    return out


def alternate(workers: dict, rounds: int, n: int, max_other: float):
    """Rounds in which every worker runs once, the order rotating; a round counts as quiet when, during each
    of its runs, other processes kept less than `max_other` of a core busy. -> (quiet rounds, all rounds).

    With a "bandwidth" worker, the probe runs before the first side and after every side, so each side's run is
    bracketed by two probes: row["bandwidth"]["around"][side] is their mean, the bandwidth the machine offered
    while that side ran (a shared host's memory slows down in bursts that /proc/stat does not show); the rest
    of row["bandwidth"] is the round's first probe, with the most other load any of its probes saw."""
    names = [k for k in workers if k != "bandwidth"]
    probe = workers.get("bandwidth")
    every = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        row, probes = {}, [] if probe is None else [_other_cores(probe.run(n))]
        for k in order:
            row[k] = _other_cores(workers[k].run(n))
            if probe is not None:
                probes.append(_other_cores(probe.run(n)))
        if probe is not None:
            row["bandwidth"] = dict(probes[0], other_cores=max(p["other_cores"] for p in probes),
                                    around={k: (probes[i]["gb_per_s"] + probes[i + 1]["gb_per_s"]) / 2
                                            for i, k in enumerate(order)})
        every.append(row)
    quiet = [row for row in every if all(x["other_cores"] <= max_other for x in row.values())]
    return quiet, every


def _median(rows, side, key):
    return statistics.median(row[side][key] for row in rows)


def decode_bytes_per_token(d, weights: str = "float32") -> int:
    """Bytes of weights one decode step reads: the whole decoder and the tied head (not the vision tower); with
    `weights` bfloat16 / int8 the Linear weights at 2 bytes / 1 byte (+ a float32 scale a row), the rest float32."""
    from npvlm.backends.packing import is_packed
    from npvlm.models.paligemma_config import PaliGemmaConfig
    from npvlm.models.paligemma_schema import expected_shapes

    shapes = expected_shapes(PaliGemmaConfig.from_dir(d))
    total = 0
    for k, v in shapes.items():
        if not k.startswith("language_model."):
            continue
        n = math.prod(v)
        if weights != "float32" and is_packed(k, v):
            total += 2 * n if weights == "bfloat16" else n + 4 * v[0]
        else:
            total += 4 * n
    return total


def _close_all(workers):
    for w in workers.values():
        w.close()


def cmd_vs_hf(a):
    """npvlm (with each of --weights) and HF transformers float32 on the same checkpoint, alternating persistent
    processes, quiet rounds, medians."""
    d = checkpoint(a.preset, a.dir, a.dtype)
    threads = a.threads or len(os.sched_getaffinity(0))
    kinds = a.weights.split(",")
    sides = {("npvlm" if kinds == ["float32"] else f"npvlm-{w}"): w for w in kinds}
    workers = {k: Worker("npvlm", d, "--backend", a.backend, "--threads", threads, "--weights", w) for k, w in sides.items()}
    workers["hf"] = Worker("hf", d, "--device", "cuda" if a.backend == "cupy" else "cpu", "--threads", threads)
    if a.backend == "numpy":
        workers["bandwidth"] = Worker("bandwidth", a.bandwidth_mib, "--threads", threads)
    try:
        quiet, every = alternate(workers, a.rounds, a.new_tokens, a.max_other_load)
    finally:
        _close_all(workers)
    rows = quiet if len(quiet) >= 3 else every
    names = [*sides, "hf"]
    med = {k: {m: _median(rows, k, m) for m in ("first_token_s", "ms_per_token")} for k in names}
    per_token = {k: decode_bytes_per_token(d, sides.get(k, "float32")) for k in names}
    res = {"preset": a.preset, "checkpoint": d, "backend": a.backend, "threads": threads, "new_tokens": a.new_tokens,
           "rounds": a.rounds, "quiet_rounds": len(quiet), "max_other_load": a.max_other_load,
           "used": "quiet rounds" if rows is quiet else "all rounds (fewer than 3 were quiet)",
           **{k: med[k] for k in names}, "weights": sides,
           **{f"speedup_first_token{k[5:]}": med["hf"]["first_token_s"] / med[k]["first_token_s"] for k in sides},
           **{f"speedup_decode{k[5:]}": med["hf"]["ms_per_token"] / med[k]["ms_per_token"] for k in sides},
           "decode_bytes_per_token": per_token if len(sides) > 1 else per_token[next(iter(sides))],
           "peak_rss_bytes": {k: max(r[k]["peak_rss_bytes"] for r in every) for k in names}}
    print(f"{a.preset}: {a.rounds} alternating rounds, {len(quiet)} quiet (other load <= {a.max_other_load} core), "
          f"medians over {res['used']}; {threads} threads")
    print(f"{'':<16}" + "".join(f"{k:>16}" for k in names) + "".join(f"{'HF/' + k:>20}" for k in sides))
    for m in ("first_token_s", "ms_per_token"):
        print(f"{m:<16}" + "".join(f"{med[k][m]:>16.4f}" for k in names)
              + "".join(f"{med['hf'][m] / med[k][m]:>20.2f}" for k in sides))
    if "bandwidth" in workers:
        # each side's read rate against the probes just before and after its run (a shared host's bandwidth moves
        # from minute to minute, so a ratio within a round says more than a ratio of medians), median over rounds
        bw = _median(rows, "bandwidth", "gb_per_s")
        res["bandwidth_gb_per_s"] = bw
        for k in names:
            res[f"{k}_fraction_of_bandwidth"] = statistics.median(
                per_token[k] / (row[k]["ms_per_token"] / 1e3) / 1e9 / row["bandwidth"]["around"][k] for row in rows)
            res[f"{k}_fraction_of_median_bandwidth"] = per_token[k] / (med[k]["ms_per_token"] / 1e3) / 1e9 / bw
        ways = {w: _median(rows, "bandwidth", f"{w}_gb_per_s") for w in ("blas", "blas_v", "numba")
                if f"{w}_gb_per_s" in rows[0]["bandwidth"]}
        res.update({f"bandwidth_{w}_gb_per_s": v for w, v in ways.items()})
        print(f"read bandwidth (float32 GEMV, {threads} threads, the best of "
              + ", ".join(f"{w} {v:.1f}" for w, v in ways.items()) + f"; median {bw:.1f} GB/s, "
              + f"{min(min(r['bandwidth']['around'].values()) for r in rows):.1f}-"
              + f"{max(max(r['bandwidth']['around'].values()) for r in rows):.1f}"
              + " over the rounds); a decode step reads "
              + ", ".join(f"{k} {per_token[k] / 1e9:.3f} GB at {res[k + '_fraction_of_bandwidth']:.0%}" for k in names)
              + " of the bandwidth probed just before and after (median over rounds)")
    return res


def cmd_ab(a):
    """Two checkouts of npvlm, each in its own persistent process on the same checkpoint, taking turns round by
    round; medians over quiet rounds. Only the public API is used on both sides."""
    d = checkpoint(a.preset, a.dir, a.dtype)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "," in a.weights:
        raise SystemExit("bench.py ab: one --weights at a time (both checkouts load the same)")
    workers = {k: Worker("npvlm", d, "--root", root, "--weights", a.weights)
               for k, root in (("this", here), ("other", os.path.abspath(a.against)))}
    try:
        quiet, every = alternate(workers, a.rounds, a.new_tokens, a.max_other_load)
    finally:
        _close_all(workers)
    rows = quiet if len(quiet) >= 3 else every
    med = {k: {m: _median(rows, k, m) for m in ("first_token_s", "ms_per_token")} for k in workers}
    res = {"preset": a.preset, "dtype": a.dtype, "weights": a.weights, "rounds": a.rounds, "quiet_rounds": len(quiet),
           "new_tokens": a.new_tokens,
           "other_checkout": os.path.abspath(a.against), "median_this": med["this"], "median_other": med["other"],
           "decode_other_over_this": med["other"]["ms_per_token"] / med["this"]["ms_per_token"],
           "first_token_other_over_this": med["other"]["first_token_s"] / med["this"]["first_token_s"]}
    print(f"{a.preset}: {a.rounds} alternating rounds, {len(quiet)} quiet; medians over "
          f"{'quiet' if rows is quiet else 'all'} rounds, {a.new_tokens} new tokens")
    print(f"{'':<16}{'this':>12}{'other':>12}{'other/this':>12}")
    for m in ("first_token_s", "ms_per_token"):
        print(f"{m:<16}{med['this'][m]:>12.4f}{med['other'][m]:>12.4f}{med['other'][m] / med['this'][m]:>12.3f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode-flat", "vs-hf", "ab"])
    ap.add_argument("--against", help="ab: the other checkout's root folder")
    ap.add_argument("--rounds", type=int, default=12, help="vs-hf, ab: alternating rounds")
    ap.add_argument("--max-other-load", type=float, default=0.3,
                    help="a round counts when other processes kept at most this much of a core busy (default 0.3)")
    ap.add_argument("--threads", type=int, default=0, help="BLAS / torch threads on each side (default: all free cores)")
    ap.add_argument("--bandwidth-mib", type=int, default=512, help="size of the bandwidth probe's matrices")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--preset", default="mid", choices=list(PRESETS))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--weights", default="float32",
                    help="vs-hf: npvlm's weights, comma-separated (float32,bfloat16,int8: one npvlm process each); ab: one of them")
    ap.add_argument("--dir", help="checkpoint folder to use / create")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="vs-hf, ab: the checkpoint's dtype on disk (bfloat16: as PaliGemma 2 ships; HF widens it to float32)")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    res = {"decode-flat": cmd_decode_flat, "vs-hf": cmd_vs_hf, "ab": cmd_ab}[a.what](a)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
