"""`npvlm quantize`: write a model folder whose Linear weights are stored as int8 or bfloat16.

    npvlm quantize --model DIR --out OUT --weights int8|bfloat16

The folder is the input's with the safetensors rewritten (one model.safetensors) and config.json
kept as it was plus one key, `npvlm_quantization`, that says what was done (HF's own
`quantization_config` is left alone: transformers would look for a quantizer it does not have).
The tensors keep their names; the weights npvlm.load(weights=...) narrows (backends/packing.py
is_packed: the 2-D Linear weights of both towers and the projector, and the tied token embedding) are stored as

    bfloat16   NAME                 BF16 [out, in]    (readable by any safetensors tool, HF included)
    int8       NAME                 I8   [out, in]    q, symmetric per output channel
               NAME_scale           F32  [out]        W ~= q * scale[:, None], scale = max|W_row| / 127

and everything else (the patch and position embeddings, norms, biases) as F32. npvlm.load reads either back to exactly the
weights that quantizing at load gives (tests/test_weights_resident.py).
"""

from __future__ import annotations

import json
import os
import shutil

QUANT_KEY = "npvlm_quantization"


def add_parser(sub):
    q = sub.add_parser("quantize", help="write a copy of a model folder with int8 or bfloat16 Linear weights")
    q.add_argument("--model", "-m", metavar="DIR|ORG/NAME", default=None,
                   help="model folder or a Hub id in the Hugging Face cache (default: the embedded shapes model)")
    q.add_argument("--out", "-o", required=True, help="the folder to write (must not exist, or be empty)")
    q.add_argument("--weights", choices=("int8", "bfloat16"), required=True, help="how to store the Linear weights")
    return q


def run(args) -> int:
    from ..io.hub import looks_like_hub_id, resolve_model

    model = resolve_model(args.model) if looks_like_hub_id(args.model) else args.model
    path = quantize(model, args.out, args.weights)
    print(f"wrote {path} ({os.path.getsize(os.path.join(path, 'model.safetensors')) / 2**20:.1f} MiB of weights, "
          f"{args.weights})")
    return 0


def quantize(model_dir: str | None, out_dir: str, weights: str) -> str:
    """Write `out_dir`: `model_dir`'s side files, config.json with a note, the weights stored as `weights`."""
    import numpy as np
    from safetensors.numpy import save_file

    from .. import api
    from ..backends.packing import pack_weights
    from ..errors import ConfigError
    from ..io.checkpoint import SCALE_SUFFIX, checkpoint_files, load_weights
    from ..models.paligemma_config import PaliGemmaConfig
    from ..models.paligemma_schema import paligemma_schema
    from ..packed import Bf16Weight, Int8Weight

    model_dir = model_dir or api.EMBEDDED_MODEL
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"{out_dir}: --out must be a new or empty folder")
    cfg = PaliGemmaConfig.from_dir(model_dir)
    from ..backends.packing import is_packed

    from ..io.scan import pack_naming_nonfinite

    schema = paligemma_schema(cfg)
    flat = pack_naming_nonfinite(lambda f: pack_weights(f, weights),  # NaN / Inf: one line naming the tensor
                                 load_weights(model_dir, schema, weights=weights, packed=is_packed), model_dir, schema.rename)
    tensors = {}
    for name, w in flat.items():
        if isinstance(w, Int8Weight):
            tensors[name], tensors[name + SCALE_SUFFIX] = np.asarray(w.q), np.asarray(w.scale)
        elif isinstance(w, Bf16Weight):
            tensors[name] = np.asarray(w.bits)
        else:
            tensors[name] = np.ascontiguousarray(w, dtype=np.float32)
    bf16 = {n for n, w in flat.items() if isinstance(w, Bf16Weight)}
    os.makedirs(out_dir, exist_ok=True)
    weights_files = {os.path.basename(p) for p in checkpoint_files(model_dir)} | {"model.safetensors.index.json"}
    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if name not in weights_files and name != "config.json" and os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config[QUANT_KEY] = {"weights": weights, "tensors": "2-D Linear weights of the vision tower, the language model "
                                                       "and the projector, the tied token embedding; the rest float32",
                         **({"scheme": "symmetric per output channel: W ~= q * scale[:, None], scale = max|W_row| / 127",
                             "scale_suffix": SCALE_SUFFIX} if weights == "int8" else {"rounding": "nearest even"})}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _save(tensors, bf16, os.path.join(out_dir, "model.safetensors"), save_file)
    return out_dir


def _save(tensors, bf16, path, save_file):
    """safetensors.numpy has no bfloat16: write uint16 bits as U16, then retag those tensors BF16 in the header
    (same bytes, same offsets; the header's JSON keeps its length because "U16" and "BF16" are padded alike)."""
    import struct

    save_file(tensors, path, metadata={"format": "pt"})
    if not bf16:
        return
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name in bf16:
            header[name]["dtype"] = "BF16"
        raw = json.dumps(header, separators=(",", ":")).encode()
        rest = f.read()
        pad = (-(8 + len(raw))) % 8
        raw += b" " * pad
        f.seek(0)
        f.write(struct.pack("<Q", len(raw)) + raw + rest)
        f.truncate()
