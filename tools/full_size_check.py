"""Full-size check (a tool, not CI): a random checkpoint with the real shapes, npvlm against HF.

    python tools/full_size_check.py --preset pg1-3b-224                 # PaliGemma 3B, float32, vs HF (<= 1e-3)
    python tools/full_size_check.py --preset pg2-3b-448 --dtype bfloat16 --skip-hf   # PG2 at 448: first token
    python tools/full_size_check.py --preset pg2-3b-448 --image-size 896 --dtype bfloat16 --last-only --skip-hf

The two sides run one after the other, each in its own process (both at once do not fit in
24 GB), on the same token ids and pixels; each reports its own peak RSS. The random weights
carry no tokenizer, so the prompt is given as ids: <image>*N <bos> 8 text ids "\\n".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

DECODE_STEPS = 4  # cached greedy steps timed after the prefill (the best one is reported)
TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))


def inputs(cfg):
    """Token ids, token types and pixels shared by both sides."""
    n = cfg.num_image_tokens
    V, img = cfg.text.vocab_size, cfg.image_token_index
    text = [t % V if t % V != img else 7 for t in (6006, 603, 573, 13910, 9980, 235336, 1000, 2000, 108)]
    ids = [img] * n + [2] + text
    S = cfg.vision.image_size
    pix = np.random.default_rng(0).uniform(-1, 1, (1, 3, S, S)).astype(np.float32)
    return ids, [0] * len(ids), pix


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_npvlm(d, out, last_only):
    from npvlm.backends import get_backend
    from npvlm.io.checkpoint import load_weights, unflatten
    from npvlm.kv_cache import KVCache
    from npvlm.models.paligemma import advance, decode_step, forward, image_features, prefill, prefix_lm_masks
    from npvlm.models.paligemma_config import PaliGemmaConfig
    from npvlm.models.paligemma_inputs import PromptBatch, layout_batch
    from npvlm.models.paligemma_schema import paligemma_schema

    t0 = time.perf_counter()
    cfg = PaliGemmaConfig.from_dir(d)
    be = get_backend("numpy")
    params = unflatten({k: be.asarray(v) for k, v in load_weights(d, paligemma_schema(cfg)).items()})
    t1 = time.perf_counter()
    ids, types, pix = inputs(cfg)
    host = layout_batch([(ids, types)], pad_id=0, image_id=cfg.image_token_index, num_image_tokens=cfg.num_image_tokens)
    xp = be.xp
    prompt = PromptBatch(host, *(xp.asarray(host[k], dtype=dt) for k, dt in
                                 [("ids", xp.int64), ("positions", xp.int64), ("valid", xp.bool), ("prefix", xp.bool),
                                  ("image_slot", xp.int64)]))
    feats = image_features(be.asarray(pix), params, cfg=cfg)
    t2 = time.perf_counter()
    masks = prefix_lm_masks(prompt.valid, prompt.prefix, 0, cfg=cfg)
    logits = forward(params, prompt.ids, prompt.positions, masks, cfg=cfg, image_slot=prompt.image_slot, feats=feats,
                     last_only=last_only)
    t3 = time.perf_counter()
    np.save(out, be.to_host(logits)[0])
    first = int(np.argmax(be.to_host(logits)[0, -1]))
    # cached decode: prefill again into a KV cache, then time DECODE_STEPS greedy steps
    t, L = cfg.text, len(ids)
    cache = KVCache(params["language_model"]["model"]["norm"]["weight"], t.num_hidden_layers, 1,
                    t.num_key_value_heads, L + DECODE_STEPS, t.head_dim)
    last, state = prefill(params, prompt, feats, cache, cfg=cfg)
    nxt = xp.argmax(last, axis=-1)
    steps = []
    for i in range(DECODE_STEPS):
        t4 = time.perf_counter()
        state = advance(state, nxt)
        nxt = xp.argmax(decode_step(params, state, cfg=cfg), axis=-1)
        be.to_host(nxt)
        steps.append(time.perf_counter() - t4)
    return {"side": "npvlm", "load_s": t1 - t0, "image_s": t2 - t1, "first_token_s": t3 - t1, "tokens": L,
            "next_token": first, "decode_ms_per_token": 1e3 * min(steps), "peak_rss_mib": peak_rss_mib()}


def run_hf(d, out, last_only):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from npvlm.models.paligemma_config import PaliGemmaConfig

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    t1 = time.perf_counter()
    ids, types, pix = inputs(PaliGemmaConfig.from_dir(d))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pix),
                       token_type_ids=torch.tensor([types]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       logits_to_keep=1 if last_only else 0).logits[0].numpy()
    t2 = time.perf_counter()
    np.save(out, logits)
    # cached decode, HF's way: prefill with use_cache, then one token a call
    L, steps = len(ids), []
    with torch.no_grad():
        o = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pix), token_type_ids=torch.tensor([types]),
                  attention_mask=torch.ones(1, L, dtype=torch.long), use_cache=True, logits_to_keep=1)
        cache = o.past_key_values if hasattr(o, "past_key_values") else o.cache
        nxt = o.logits[:, -1:].argmax(-1)
        for i in range(DECODE_STEPS):
            t3 = time.perf_counter()
            o = model(input_ids=nxt, past_key_values=cache, attention_mask=torch.ones(1, L + i + 1, dtype=torch.long),
                      position_ids=torch.tensor([[L + i + 1]]), use_cache=True, logits_to_keep=1)
            cache = o.past_key_values if hasattr(o, "past_key_values") else o.cache
            nxt = o.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t3)
    return {"side": "hf", "load_s": t1 - t0, "first_token_s": t2 - t1, "tokens": L,
            "next_token": int(np.argmax(logits[-1])), "decode_ms_per_token": 1e3 * min(steps), "peak_rss_mib": peak_rss_mib()}


def warm_page_cache(d, chunk=64 << 20):
    """Read the weight files once so both sides find them in the page cache (both map the file)."""
    t = time.perf_counter()
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(os.path.join(d, f), "rb", buffering=0) as fh:
                while fh.read(chunk):
                    pass
    print(f"page cache warmed in {time.perf_counter() - t:.1f} s")


def side(which, d, out, last_only):
    cmd = [sys.executable, os.path.abspath(__file__), "--side", which, "--dir", d, "--out", out]
    cmd += ["--last-only"] if last_only else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{which} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pg1-3b-224")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--image-size", type=int, help="override the preset's image side (e.g. 896)")
    ap.add_argument("--dir", help="checkpoint folder (written if it holds no config.json)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--last-only", action="store_true", help="compare the last position's logits only")
    ap.add_argument("--side", choices=["npvlm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    if a.side:
        print(json.dumps((run_npvlm if a.side == "npvlm" else run_hf)(a.dir, a.out, a.last_only)))
        return
    d = a.dir or os.path.join(tempfile.gettempdir(), f"npvlm-{a.preset}-{a.dtype}-{a.image_size or 'preset'}")
    if not os.path.exists(os.path.join(d, "config.json")):
        from make_checkpoint import make_checkpoint

        t = time.perf_counter()
        make_checkpoint(d, a.preset, dtype=a.dtype, tokenizer=False, image_size=a.image_size)
        print(f"wrote {d} in {time.perf_counter() - t:.0f} s")
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    warm_page_cache(d)  # else whichever side runs first pays for reading the file from disk
    summary = {"preset": a.preset, "dtype": a.dtype, "checkpoint_mib": size / 2**20}
    summary["npvlm"] = side("npvlm", d, os.path.join(d, "npvlm_logits.npy"), a.last_only)
    if not a.skip_hf:
        summary["hf"] = side("hf", d, os.path.join(d, "hf_logits.npy"), a.last_only)
        ours, ref = np.load(os.path.join(d, "npvlm_logits.npy")), np.load(os.path.join(d, "hf_logits.npy"))
        summary["max_abs_diff"] = float(np.abs(ours - ref).max())
        summary["logit_scale"] = float(np.abs(ref).max())
    print(f"checkpoint {size / 2**30:.2f} GiB on disk; npvlm peak RSS {summary['npvlm']['peak_rss_mib'] / 1024:.2f} GiB, "
          f"first token {summary['npvlm']['first_token_s']:.1f} s, decode {summary['npvlm']['decode_ms_per_token']:.0f} ms/token"
          + (f"; HF peak RSS {summary['hf']['peak_rss_mib'] / 1024:.2f} GiB, first token {summary['hf']['first_token_s']:.1f} s, "
             f"decode {summary['hf']['decode_ms_per_token']:.0f} ms/token; "
             f"max |logit diff| {summary['max_abs_diff']:.2e}" if "hf" in summary else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
