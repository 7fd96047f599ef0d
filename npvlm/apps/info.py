"""`npvlm info`: what a model folder (PaliGemma or SigLIP) holds and what it will cost, read from headers alone;
with `--check`, every tensor scanned for NaN, Inf and absurd magnitudes (npvlm/io/scan.py).

`describe` returns numbers (parameter counts, bytes); the text form is built from them for display.
Exit status: 0, or with --check 1 when a problem was found (2 for an error, as every command).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from ..errors import show, show_path
from ..io.checkpoint import checkpoint_files, read_safetensors_header
from ..io.scan import MAX_ABS, scan_folder


def add_parser(sub):
    i = sub.add_parser("info", help="describe a model folder without loading its weights")
    i.add_argument("--model", "-m", metavar="DIR|ORG/NAME", default=None,
                   help="model folder or a Hub id in the Hugging Face cache (default: the embedded shapes model)")
    i.add_argument("--json", action="store_true", help="print JSON: numbers (counts, bytes), not display strings")
    i.add_argument("--check", action="store_true",
                   help="also read every tensor (memory-mapped, a block at a time) for NaN, Inf and |w| > --max-abs; "
                        "exit status 1 if any is found")
    i.add_argument("--max-abs", type=float, default=MAX_ABS, metavar="X",
                   help=f"with --check: the largest |w| a weight may hold (default {MAX_ABS:g})")
    return i


def run(args) -> int:
    from ..errors import ConfigError
    from ..io.hub import looks_like_hub_id, resolve_model

    if not (math.isfinite(args.max_abs) and args.max_abs > 0):
        raise ConfigError(f"--max-abs must be a finite number > 0, got {args.max_abs}")
    model = resolve_model(args.model) if looks_like_hub_id(args.model) else args.model
    info = describe(model)
    if args.check:
        info["check"] = scan_folder(info["model"], args.max_abs, progress=_progress_display())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in display(info).items():
            print(f"{k:<24} {v}")
        if args.check:
            for p in info["check"]["problems"]:
                print(problem_line(p, args.max_abs))
            print(summary_line(info["check"]))
    return 1 if args.check and info["check"]["problems"] else 0


def problem_line(p: dict, max_abs: float) -> str:
    """One --check problem as a line naming the file, the tensor and the numbers."""
    largest = "no finite value" if p["max_abs"] is None else f"largest finite |w| {p['max_abs']:.3g}"
    what = " (the scale of an int8 weight: |w| = 127 x scale)" if p.get("int8_scale") else ""
    return (f"{show_path(p['file'])}: tensor {show(p['tensor'], 100)} ({p['dtype']} {p['shape']}){what}: "
            f"{p['nan']} NaN, {p['inf']} Inf, {p['above']} with |w| > {max_abs:g} ({largest})")


def summary_line(r: dict) -> str:
    """The closing line of --check: what was read, and what was found."""
    n = len(r["problems"])
    head = (f"checked {r['tensors']} tensors ({r['values']:,} values, {r['bytes'] / 2**20:.1f} MiB) in {r['files']} "
            f"file{'s' if r['files'] != 1 else ''} in {r['seconds']:.1f} s, bound |w| <= {r['max_abs']:g}: ")
    big = r["largest"]
    largest = "" if big is None else f"; largest finite |w| {big['value']:.3g} in {show(big['tensor'], 100)}"
    if not n:
        return head + "no NaN, no Inf, nothing above the bound" + largest
    tot = {k: sum(p[k] for p in r["problems"]) for k in ("nan", "inf", "above")}
    return (head + f"{n} tensor{'s' if n != 1 else ''} with problems ({tot['nan']} NaN, {tot['inf']} Inf, "
            f"{tot['above']} above the bound)" + largest)


def _progress_display(stream=None, min_bytes=64 << 20):
    """A progress callback for the scan: tqdm's bar on a terminal (a plain one without tqdm), plain lines (one a
    quarter, no carriage returns) into a file or pipe; nothing for folders under 64 MiB."""
    stream = sys.stderr if stream is None else stream  # the stderr of now, not of import time
    state = {"t0": time.perf_counter(), "quarter": -1, "bar": None}
    tty = hasattr(stream, "isatty") and stream.isatty()

    def progress(done, total, name):
        if total < min_bytes:
            return
        if tty and state["bar"] is None:
            try:
                from tqdm import tqdm

                state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc="checking", file=stream, leave=False)
            except ImportError:
                state["bar"] = False
        if state["bar"]:
            state["bar"].update(done - state["bar"].n)
            if done >= total:
                state["bar"].close()
            return
        quarter = int(4 * done / total)
        if quarter > state["quarter"]:
            state["quarter"] = quarter
            stream.write(f"checking {done / total:4.0%} {done / 1e9:.2f}/{total / 1e9:.2f} GB "
                         f"{time.perf_counter() - state['t0']:.0f}s {os.path.basename(name)}\n")
            stream.flush()

    return progress


def _files(model_dir) -> tuple[dict, dict]:
    """({count, bytes, dtypes}, {dtype: tensors}) of the folder's safetensors files, from their headers."""
    files = checkpoint_files(model_dir)
    dtypes, disk = {}, 0
    for f in files:
        disk += os.path.getsize(f)
        for info in read_safetensors_header(f).values():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    return {"count": len(files), "bytes": disk, "dtypes": dict(sorted(dtypes.items()))}, dtypes


def describe(model_dir: str | None = None, extra_tokens: int = 128) -> dict:
    """The config and the files of `model_dir`, in numbers: counts, bytes, the float32 memory npvlm needs."""
    from ..api import EMBEDDED_MODEL, model_type

    model_dir = model_dir or EMBEDDED_MODEL
    if model_type(model_dir) == "siglip":
        return _describe_siglip(model_dir)
    from ..models.paligemma_config import PaliGemmaConfig
    from ..models.paligemma_schema import expected_shapes

    cfg = PaliGemmaConfig.from_dir(model_dir)
    files, dtypes = _files(model_dir)
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, shape in expected_shapes(cfg).items():
        part = "vision" if name.startswith("vision_tower") else "projector" if name.startswith("multi_modal") else "language"
        counts[part] += math.prod(shape)
    t, v = cfg.text, cfg.vision
    seq = cfg.num_image_tokens + extra_tokens
    return {
        "model": model_dir, "model_type": "paligemma",
        "decoder": {"model_type": t.model_type, "layers": t.num_hidden_layers, "width": t.hidden_size,
                    "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                    "mlp": t.intermediate_size, "vocab": t.vocab_size},
        "vision": {"layers": v.num_hidden_layers, "width": v.hidden_size, "heads": v.num_attention_heads,
                   "mlp": v.intermediate_size, "image_size": v.image_size, "patch_size": v.patch_size,
                   "image_tokens": cfg.num_image_tokens},
        "parameters": dict(total=sum(counts.values()), **counts),
        "files": files,
        "memory_float32": {"weights_bytes": sum(counts.values()) * 4, "memory_mapped": set(dtypes) == {"F32"},
                           "kv_cache_bytes": 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 4 * seq,
                           "kv_cache_tokens": seq},
        "max_positions": t.max_position_embeddings,
    }


def _describe_siglip(model_dir: str) -> dict:
    """describe() of a two-tower SigLIP folder: both towers, parameters, files, float32 weights (no KV cache)."""
    from ..models.siglip_config import SiglipConfig
    from ..models.siglip_schema import expected_shapes

    cfg = SiglipConfig.from_dir(model_dir)
    files, dtypes = _files(model_dir)
    counts = {"vision": 0, "text": 0, "other": 0}
    for name, shape in expected_shapes(cfg).items():
        part = "vision" if name.startswith("vision_model") else "text" if name.startswith("text_model") else "other"
        counts[part] += math.prod(shape)
    v, t = cfg.vision, cfg.text
    return {
        "model": model_dir, "model_type": "siglip",
        "vision": {"layers": v.num_hidden_layers, "width": v.hidden_size, "heads": v.num_attention_heads,
                   "mlp": v.intermediate_size, "image_size": v.image_size, "patch_size": v.patch_size,
                   "patches": v.num_patches},
        "text": {"layers": t.num_hidden_layers, "width": t.hidden_size, "heads": t.num_attention_heads,
                 "mlp": t.intermediate_size, "vocab": t.vocab_size, "max_tokens": t.max_position_embeddings},
        "embed_dim": cfg.embed_dim,
        "parameters": dict(total=sum(counts.values()), **counts),
        "files": files,
        "memory_float32": {"weights_bytes": sum(counts.values()) * 4, "memory_mapped": set(dtypes) == {"F32"}},
    }


def _memory_line(m: dict) -> str:
    return (f"weights {m['weights_bytes'] / 2**30:.2f} GiB "
            + ("(memory-mapped from disk)" if m["memory_mapped"] else "(widened from the file's dtype at load)"))


def display(info: dict) -> dict:
    """`describe`'s numbers as the lines `npvlm info` prints."""
    n, f, m, v = info["parameters"], info["files"], info["memory_float32"], info["vision"]
    files = f"{f['count']} file(s), {f['bytes'] / 2**20:.1f} MiB on disk, dtypes {f['dtypes']}"
    if info["model_type"] == "siglip":
        t = info["text"]
        return {
            "model": info["model"],
            "vision": f"SigLIP vision: {v['layers']} layers, width {v['width']}, {v['heads']} heads, MLP {v['mlp']}, "
                      f"{v['image_size']}px / patch {v['patch_size']} = {v['patches']} patches, MAP head",
            "text": f"SigLIP text: {t['layers']} layers, width {t['width']}, {t['heads']} heads, MLP {t['mlp']}, "
                    f"vocab {t['vocab']}, {t['max_tokens']} tokens a text",
            "parameters": f"{n['total'] / 1e6:.2f} M (vision {n['vision'] / 1e6:.2f} M, text {n['text'] / 1e6:.2f} M)",
            "files": files,
            "memory (float32)": _memory_line(m) + f", embeddings of width {info['embed_dim']}",
        }
    t = info["decoder"]
    return {
        "model": info["model"],
        "decoder": f"{t['model_type']}: {t['layers']} layers, width {t['width']}, {t['heads']} heads / {t['kv_heads']} kv, "
                   f"head dim {t['head_dim']}, MLP {t['mlp']}, vocab {t['vocab']}",
        "vision": f"SigLIP: {v['layers']} layers, width {v['width']}, {v['heads']} heads, MLP {v['mlp']}, "
                  f"{v['image_size']}px / patch {v['patch_size']} = {v['image_tokens']} image tokens",
        "parameters": f"{n['total'] / 1e6:.2f} M (vision {n['vision'] / 1e6:.2f} M, projector {n['projector'] / 1e6:.2f} M, "
                      f"language {n['language'] / 1e6:.2f} M)",
        "files": files,
        "memory (float32)": _memory_line(m) + f" + KV cache {m['kv_cache_bytes'] / 2**20:.1f} MiB for {m['kv_cache_tokens']} tokens",
        "max positions": info["max_positions"],
    }
