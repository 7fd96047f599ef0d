"""`npvlm info`: what a model folder holds and what it will cost, read from headers alone."""

from __future__ import annotations

import math
import os

import json

from ..io.checkpoint import checkpoint_files, read_safetensors_header
from ..models.paligemma_config import PaliGemmaConfig
from ..models.paligemma_schema import expected_shapes


def add_parser(sub):
    i = sub.add_parser("info", help="describe a model folder without loading its weights")
    i.add_argument("--model", "-m", metavar="DIR", default=None, help="model folder (default: the embedded shapes model)")
    i.add_argument("--json", action="store_true", help="print JSON")
    return i


def run(args) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:<24} {v}")
    return 0


def describe(model_dir: str | None = None, extra_tokens: int = 128) -> dict:
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
    total = sum(counts.values())
    t, v = cfg.text, cfg.vision
    seq = cfg.num_image_tokens + extra_tokens
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 4 * seq
    f32_on_disk = set(dtypes) == {"F32"}
    return {
        "model": model_dir,
        "decoder": f"{t.model_type}: {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads / "
                   f"{t.num_key_value_heads} kv, head dim {t.head_dim}, MLP {t.intermediate_size}, vocab {t.vocab_size}",
        "vision": f"SigLIP: {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads, MLP "
                  f"{v.intermediate_size}, {v.image_size}px / patch {v.patch_size} = {cfg.num_image_tokens} image tokens",
        "parameters": f"{total / 1e6:.2f} M (vision {counts['vision'] / 1e6:.2f} M, projector {counts['projector'] / 1e6:.2f} M, "
                      f"language {counts['language'] / 1e6:.2f} M)",
        "files": f"{len(files)} file(s), {disk / 2**20:.1f} MiB on disk, dtypes {dict(sorted(dtypes.items()))}",
        "memory (float32)": f"weights {total * 4 / 2**30:.2f} GiB "
                            + ("(memory-mapped from disk)" if f32_on_disk else "(widened from the file's dtype at load)")
                            + f" + KV cache {kv / 2**20:.1f} MiB for {seq} tokens",
        "max positions": t.max_position_embeddings,
    }
