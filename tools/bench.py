"""Benchmarks, measured as ratios in one run (these machines are noisy): never a timed test.

    python tools/bench.py decode-flat            # time per decoded token at position 30 vs 300 (KV cache)
    python tools/bench.py vs-hf [--preset mid]   # npvlm vs HF transformers on the same checkpoint
    python tools/bench.py vs-hf --backend cupy   # the same on a GPU (torch on CUDA as the reference)

Checkpoints are random, written by tools/make_checkpoint.py into a temp folder (or --dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
}


def checkpoint(name, where=None):
    d = where or os.path.join(tempfile.gettempdir(), f"npvlm-bench-{name}")
    if not os.path.exists(os.path.join(d, "config.json")):
        kw = dict(PRESETS[name])
        make_checkpoint(d, kw.pop("preset"), tokenizer=True, **kw)
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
    embed_w = model.params["language_model"]["model"]["embed_tokens"]["weight"]
    times = []
    for _ in range(3):  # repeat the whole measurement; keep the best median (least disturbed by noise)
        cache = KVCache(embed_w, t.num_hidden_layers, 1, t.num_key_value_heads, T + steps + 1, t.head_dim)
        logits, state = prefill(model.params, prompt, None, cache, cfg=cfg)
        nxt = xp.argmax(logits, axis=-1)
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state = advance(state, nxt)
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


def time_npvlm(d, backend, prompt, new_tokens):
    t0 = time.perf_counter()
    model = npvlm.load(d, backend=backend)
    load = time.perf_counter() - t0
    img = _image()
    model.generate(img, prompt, max_new_tokens=2)  # warm-up (BLAS threads, CuPy kernels)
    best = None
    for _ in range(2):
        st = model.generate(img, prompt, max_new_tokens=new_tokens).stats
        if best is None or st["prefill_seconds"] + st["decode_seconds"] < best["prefill_seconds"] + best["decode_seconds"]:
            best = st
    per_tok = best["decode_seconds"] / max(best["steps"] - 1, 1)
    return {"load_s": load, "image_s": best["image_seconds"], "first_token_s": best["image_seconds"] + best["prefill_seconds"],
            "ms_per_token": per_tok * 1e3, "new_tokens": best["new_tokens"]}


def time_hf(d, device, prompt, new_tokens):
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).to(device).eval()
    load = time.perf_counter() - t0
    proc = PaliGemmaProcessor.from_pretrained(d)
    inputs = proc(images=[_image()], text=["<image>" + prompt], return_tensors="pt").to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t

    with torch.no_grad():
        sync()
        t = time.perf_counter()
        model.model.get_image_features(inputs["pixel_values"])
        sync()
        img = time.perf_counter() - t
    run(2)
    first = min(run(1) for _ in range(2))
    full = min(run(new_tokens) for _ in range(2))
    return {"load_s": load, "image_s": img, "first_token_s": first, "ms_per_token": (full - first) / (new_tokens - 1) * 1e3,
            "new_tokens": new_tokens}


def _image():
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))


def cmd_vs_hf(a):
    d = checkpoint(a.preset, a.dir)
    prompt, n = "caption en", a.new_tokens
    ours = time_npvlm(d, a.backend, prompt, n)
    ref = time_hf(d, "cuda" if a.backend == "cupy" else "cpu", prompt, n)
    res = {"preset": a.preset, "backend": a.backend, "npvlm": ours, "hf": ref,
           "speedup_first_token": ref["first_token_s"] / ours["first_token_s"],
           "speedup_decode": ref["ms_per_token"] / ours["ms_per_token"]}
    print(f"{'':<14}{'npvlm':>12}{'HF torch':>12}{'HF/npvlm':>10}")
    for k in ("load_s", "image_s", "first_token_s", "ms_per_token"):
        print(f"{k:<14}{ours[k]:>12.3f}{ref[k]:>12.3f}{ref[k] / ours[k]:>10.2f}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode-flat", "vs-hf"])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--preset", default="mid", choices=list(PRESETS))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dir", help="checkpoint folder to use / create")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    res = {"decode-flat": cmd_decode_flat, "vs-hf": cmd_vs_hf}[a.what](a)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
