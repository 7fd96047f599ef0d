"""`npvlm info`: what a model folder holds and what it will cost, read from headers alone.

`describe` returns numbers (parameter counts, bytes); the text form is built from them for display.
"""

from __future__ import annotations

import math
import os

import json

from ..io.checkpoint import checkpoint_files, read_safetensors_header
from ..models.paligemma_config import PaliGemmaConfig
from ..models.paligemma_schema import expected_shapes


def add_parser(sub):
    i = sub.add_parser("info", help="describe a model folder without loading its weights")
    i.add_argument("--model", "-m", metavar="DIR|ORG/NAME", default=None,
                   help="model folder or a Hub id in the Hugging Face cache (default: the embedded shapes model)")
    i.add_argument("--json", action="store_true", help="print JSON: numbers (counts, bytes), not display strings")
    return i


def run(args) -> int:
    from ..io.hub import looks_like_hub_id, resolve_model

    model = resolve_model(args.model) if looks_like_hub_id(args.model) else args.model
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in display(info).items():
            print(f"{k:<24} {v}")
    return 0


def describe(model_dir: str | None = None, extra_tokens: int = 128) -> dict:
    """The config and the files of `model_dir`, in numbers: counts, bytes, the float32 memory npvlm needs."""
    from ..api import EMBEDDED_MODEL

    model_dir = model_dir or EMBEDDED_MODEL
    cfg = PaliGemmaConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    dtypes, disk = {}, 0
    for f in files:
        disk += os.path.getsize(f)
        for info in read_safetensors_header(f).values():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, shape in expected_shapes(cfg).items():
        part = "vision" if name.startswith("vision_tower") else "projector" if name.startswith("multi_modal") else "language"
        counts[part] += math.prod(shape)
    t, v = cfg.text, cfg.vision
    seq = cfg.num_image_tokens + extra_tokens
    return {
        "model": model_dir,
        "decoder": {"model_type": t.model_type, "layers": t.num_hidden_layers, "width": t.hidden_size,
                    "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                    "mlp": t.intermediate_size, "vocab": t.vocab_size},
        "vision": {"layers": v.num_hidden_layers, "width": v.hidden_size, "heads": v.num_attention_heads,
                   "mlp": v.intermediate_size, "image_size": v.image_size, "patch_size": v.patch_size,
                   "image_tokens": cfg.num_image_tokens},
        "parameters": dict(total=sum(counts.values()), **counts),
        "files": {"count": len(files), "bytes": disk, "dtypes": dict(sorted(dtypes.items()))},
        "memory_float32": {"weights_bytes": sum(counts.values()) * 4, "memory_mapped": set(dtypes) == {"F32"},
                           "kv_cache_bytes": 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 4 * seq,
                           "kv_cache_tokens": seq},
        "max_positions": t.max_position_embeddings,
    }


def display(info: dict) -> dict:
    """`describe`'s numbers as the lines `npvlm info` prints."""
    t, v, n, f, m = info["decoder"], info["vision"], info["parameters"], info["files"], info["memory_float32"]
    return {
        "model": info["model"],
        "decoder": f"{t['model_type']}: {t['layers']} layers, width {t['width']}, {t['heads']} heads / {t['kv_heads']} kv, "
                   f"head dim {t['head_dim']}, MLP {t['mlp']}, vocab {t['vocab']}",
        "vision": f"SigLIP: {v['layers']} layers, width {v['width']}, {v['heads']} heads, MLP {v['mlp']}, "
                  f"{v['image_size']}px / patch {v['patch_size']} = {v['image_tokens']} image tokens",
        "parameters": f"{n['total'] / 1e6:.2f} M (vision {n['vision'] / 1e6:.2f} M, projector {n['projector'] / 1e6:.2f} M, "
                      f"language {n['language'] / 1e6:.2f} M)",
        "files": f"{f['count']} file(s), {f['bytes'] / 2**20:.1f} MiB on disk, dtypes {f['dtypes']}",
        "memory (float32)": f"weights {m['weights_bytes'] / 2**30:.2f} GiB "
                            + ("(memory-mapped from disk)" if m["memory_mapped"] else "(widened from the file's dtype at load)")
                            + f" + KV cache {m['kv_cache_bytes'] / 2**20:.1f} MiB for {m['kv_cache_tokens']} tokens",
        "max positions": info["max_positions"],
    }
