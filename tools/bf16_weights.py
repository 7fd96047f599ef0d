"""Write a model folder's weights as one all-BF16 model.safetensors, the layout the embedded model ships in.

    python tools/bf16_weights.py FOLDER/model.safetensors npvlm/demo/shapes_model/model.safetensors

`npvlm finetune` saves float32; the embedded model (npvlm/demo/shapes_model) stores every tensor in
bfloat16, as tools/train_shapes.py saves it. Each float32 is rounded to the nearest bfloat16, ties to even
(what torch's `.to(torch.bfloat16)` does; tests/test_shapes_multi.py checks it bit for bit), and the
tensors keep their names and order. NumPy only: the safetensors layout is written here (an 8-byte
little-endian header size, the JSON header, the tensors' bytes back to back), since numpy has no bfloat16.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of the nearest bfloat16, ties to even (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def write_bf16(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """{name: float32 array} -> a safetensors file with every tensor BF16, in the dict's order."""
    header, blobs, offset = {}, [], 0
    for name, x in tensors.items():
        blob = to_bf16_bits(x).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    from safetensors.numpy import load_file

    tensors = load_file(argv[0])
    if any(x.dtype != np.float32 for x in tensors.values()):
        print(f"{argv[0]}: expected float32 tensors only", file=sys.stderr)
        return 1
    write_bf16(tensors, argv[1], {"format": "pt"})
    print(f"{argv[1]}: {len(tensors)} tensors in BF16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
