"""A model folder's weight files: model.safetensors, or the shards a model.safetensors.index.json lists (each
one checked: present, inside the folder, a plain file), or any *.safetensors, in HF's order of preference.
What is inside each file is safetensors_file.py's business; which tensor is which, checkpoint.py's.
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError
from .files import LFS_MAGIC, check_regular, lfs_pointer_message
from .safetensors_file import _fail, _load_json, _p, _q

MAX_INDEX_BYTES = 100_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _shard_path(model_dir, rel, index_path, tensor) -> str:
    """A shard named by the index, kept inside the model folder."""
    where = f"weight_map[{_q(tensor)}]"
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise _fail(index_path, f"{where} = {_q(rel)} is not a file name")
    if os.path.isabs(rel) or rel[:1] in "/\\" or re.match(r"^[A-Za-z]:", rel):
        raise _fail(index_path, f"{where} = {_q(rel)} is an absolute path; shards must be inside {_p(model_dir)}")
    if ".." in re.split(r"[\\/]", rel):
        raise _fail(index_path, f"{where} = {_q(rel)} leaves the model folder ('..')")
    path = os.path.join(model_dir, rel)
    if not os.path.isfile(path):
        raise _fail(index_path, f"shard {_q(rel)} (listed for tensor {_q(tensor)}) does not exist")
    return path


def _read_index(model_dir, index_path) -> dict[str, str]:
    """model.safetensors.index.json -> {tensor name: shard path}."""
    check_regular(index_path, CheckpointError)
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise _fail(index_path, f"cannot read ({e.strerror or e})") from None
    if raw.startswith(LFS_MAGIC):
        raise _fail(index_path, lfs_pointer_message("shard index"))
    if len(raw) > MAX_INDEX_BYTES:
        raise _fail(index_path, f"larger than {MAX_INDEX_BYTES:,} bytes, not a shard index")
    index = _load_json(index_path, raw, "index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict):
        raise _fail(index_path, "has no 'weight_map' object {tensor name: shard file}")
    if not wmap:
        raise _fail(index_path, "weight_map lists no tensors")
    shards: dict[str, str] = {}  # validate each distinct shard name once
    for name, rel in wmap.items():
        if not isinstance(rel, str) or rel not in shards:
            shards[rel] = _shard_path(model_dir, rel, index_path, name)
    return {name: shards[rel] for name, rel in wmap.items()}


def locate(model_dir) -> tuple[list[str], dict[str, str] | None]:
    """(safetensors files, index weight map or None), in HF's order of preference."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{_p(model_dir)}: not a directory")
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        wmap = _read_index(model_dir, index_path)
        return sorted(set(wmap.values())), wmap
    names = sorted(os.listdir(model_dir))
    others = [os.path.join(model_dir, n) for n in names if n.endswith(".safetensors")]
    others = [p for p in others if os.path.isfile(p)]
    if others:
        return others, None
    unsafe = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".npz", ".gguf"))]
    hint = f"; found {', '.join(unsafe[:3])}, which npvlm does not read (convert to safetensors)" if unsafe else ""
    raise CheckpointError(f"{_p(model_dir)}: no weights: looked for {SINGLE_FILE}, {INDEX_FILE} and *.safetensors{hint}")


def checkpoint_files(model_dir) -> list[str]:
    """The safetensors files of a model folder: model.safetensors, the index's shards, or any *.safetensors."""
    return locate(model_dir)[0]
