"""Checkpoint reading: safetensors headers validated before any data is mapped, keys renamed to one scheme.

The safetensors format (https://github.com/huggingface/safetensors): a u64 little-endian N, an N-byte
UTF-8 JSON header {name: {dtype, shape, data_offsets: [b, e]}} with an optional `__metadata__`
(str -> str), then the raw little-endian bytes, offsets relative to the end of the header.
We re-implement the reference's checks (tensor.rs, FIELD-NOTES.md §3.1) and add a few of our own
(duplicate keys, unknown dtypes, git-LFS pointers, shard index sanity), so that hostile or broken
files fail with one `CheckpointError` line instead of a NumPy traceback or a silently wrong model.

Loading is two-phase: every header of every shard is read and checked, the keys are renamed to the
hub layout of google/paligemma-3b-pt-224 (SPEC.md §12) and compared with the shapes config.json
implies; only then is data mapped. F32 tensors are zero-copy read-only views of an mmap (the
arrays keep the map alive), so a 12 GB float32 checkpoint costs its size in page cache, not twice
that in RSS. BF16 and F16 are widened to float32 on the host.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Callable, NamedTuple

import numpy as np

from .config import PaliGemmaConfig
from .errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference's cap on N
MAX_INDEX_BYTES = 100_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
LM_HEAD = "language_model.lm_head.weight"  # optional: tied to embed_tokens, dropped at load
WEIGHT_DTYPES = ("F32", "BF16", "F16")

# safetensors dtype -> (bytes per element, little-endian NumPy dtype; None where NumPy has none)
DTYPES = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, None),
    "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"),
    "U64": (8, "<u8"), "U32": (4, "<u4"), "U16": (2, "<u2"), "U8": (1, "u1"),
    "BOOL": (1, "?"), "C64": (8, "<c8"),
    "F8_E4M3": (1, None), "F8_E5M2": (1, None), "F8_E8M0": (1, None),
}


class TensorInfo(NamedTuple):
    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file, data = file[start:end]
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# ---------------------------------------------------------------------------------------------
# One file: header validation and mapping


def _q(x, limit: int = 80) -> str:
    """repr() of a value from the file, cut short: error messages stay on one line."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 4] + "..." + r[-1]


def _p(path) -> str:
    s = os.fspath(path)
    return s if s.isprintable() else repr(s)


def _fail(path, msg: str) -> CheckpointError:
    return CheckpointError(f"{_p(path)}: {msg}")


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


class _Duplicate(Exception):
    pass


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _load_json(path, raw: bytes, what: str):
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity; any failure is one CheckpointError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"{what} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _Duplicate as e:
        raise _fail(path, f"{what} has the key {_q(e.args[0])} twice") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # NaN, 5000-digit ints, 100k nested brackets
        raise _fail(path, f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def _json_type(x) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(x), "null")


def _is_uint(x) -> bool:
    return type(x) is int and x >= 0  # bool is an int subclass: excluded


def _nbytes(shape, itemsize: int, limit: int) -> int:
    """prod(shape) * itemsize in Python ints, stopping once past `limit` (no giant products)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def _tensor_info(path, name: str, entry, base: int, size: int) -> TensorInfo:
    where = f"tensor {_q(name)}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: entry is a JSON {_json_type(entry)}, not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"{where}: unknown dtype {_q(dtype)} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise _fail(path, f"{where}: shape {_q(shape)} is not a list of non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs):
        raise _fail(path, f"{where}: data_offsets {_q(offs)} is not a pair [begin, end] of non-negative integers")
    b, e = offs
    if e < b:
        raise _fail(path, f"{where}: data_offsets [{b}, {e}] end before they begin")
    need = _nbytes(shape, DTYPES[dtype][0], max(e - b, size))
    if need != e - b:
        have = "more than the file holds" if need > size else f"{need} bytes"
        raise _fail(path, f"{where}: shape {_q(shape)} of {dtype} needs {have} but data_offsets [{b}, {e}] span {e - b}")
    return TensorInfo(dtype, tuple(shape), base + b, base + e)


def _check_layout(path, infos: dict[str, TensorInfo], base: int, size: int) -> None:
    """Sorted by offset, the tensors tile [0, last end) exactly, and the file ends there."""
    end, prev = 0, None
    for name, t in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        b = t.start - base
        if b != end:
            what = f"overlaps tensor {_q(prev)}" if b < end else f"leaves a gap of {b - end} bytes before it"
            raise _fail(path, f"tensor {_q(name)}: data_offsets begin at {b} but the previous data ends at {end}: it {what}")
        end, prev = t.end - base, name
    if base + end < size:
        raise _fail(path, f"{size - base - end} bytes of trailing data after the last tensor (data ends at byte {base + end}, file is {size} bytes)")
    if base + end > size:
        raise _fail(path, f"file is truncated: the header describes {base + end} bytes, the file has {size}")


def _parse_header(path, size: int, read_at: Callable[[int, int], bytes]):
    """Validate the header of a `size`-byte file; return ({name: TensorInfo}, metadata)."""
    if read_at(0, len(LFS_MAGIC)) == LFS_MAGIC:
        raise _fail(path, "is a git-LFS pointer, not the weights: run `git lfs pull` in the model folder")
    if size < 8:
        raise _fail(path, f"file is {size} bytes, too short for the 8-byte header length of a safetensors file")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES:,}-byte cap (not a safetensors file?)")
    if 8 + n > size:
        raise _fail(path, f"header length {n} runs past the end of the {size}-byte file")
    header = _load_json(path, read_at(8, n), "header")
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {_json_type(header)}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, f"__metadata__ {_q(meta)} is not an object of strings")
    infos = {name: _tensor_info(path, name, entry, 8 + n, size) for name, entry in header.items()}
    _check_layout(path, infos, 8 + n, size)
    return infos, meta


def _file_reader(f):
    def read_at(offset, count):
        f.seek(offset)
        return f.read(count)

    return read_at


def read_safetensors_header(path) -> dict[str, TensorInfo]:
    """The validated tensor table of one safetensors file; no tensor data is read or mapped."""
    try:
        with open(path, "rb") as f:
            return _parse_header(path, os.fstat(f.fileno()).st_size, _file_reader(f))[0]
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None


def _map_file(path):
    """mmap the whole file read-only and validate its header from the map: (map, infos)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:  # raises the right error (mmap also refuses an empty file)
                _parse_header(path, size, _file_reader(f))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise _fail(path, f"cannot map ({getattr(e, 'strerror', None) or e})") from None
    return mm, _parse_header(path, len(mm), lambda o, c: mm[o : o + c])[0]


def _array(path, mm, name: str, t: TensorInfo) -> np.ndarray:
    """One tensor: F32 (and other NumPy dtypes) as a view of the map, BF16/F16 widened to float32."""
    itemsize, code = DTYPES[t.dtype]
    count = t.nbytes // itemsize
    if t.dtype == "BF16":  # bfloat16 is the top half of a float32
        wide = np.frombuffer(mm, dtype="<u2", count=count, offset=t.start).astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32).reshape(t.shape)
    if code is None:
        raise _fail(path, f"tensor {_q(name)}: dtype {t.dtype} has no NumPy equivalent")
    a = np.frombuffer(mm, dtype=code, count=count, offset=t.start).reshape(t.shape)
    return a.astype(np.float32) if t.dtype == "F16" else a


def read_safetensors(path, *, names=None) -> dict[str, np.ndarray]:
    """Validated tensors of one file (all, or `names`): F32 zero-copy read-only, BF16/F16 as float32."""
    mm, infos = _map_file(path)
    wanted = list(infos) if names is None else list(names)
    for name in wanted:
        if name not in infos:
            raise _fail(path, f"no tensor {_q(name)} in this file ({len(infos)} tensors)")
    return {name: _array(path, mm, name, infos[name]) for name in wanted}


# ---------------------------------------------------------------------------------------------
# A model folder: which files, and which tensor lives where


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
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise _fail(index_path, f"cannot read ({e.strerror or e})") from None
    if raw.startswith(LFS_MAGIC):
        raise _fail(index_path, "is a git-LFS pointer, not the index: run `git lfs pull` in the model folder")
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


def _locate(model_dir) -> tuple[list[str], dict[str, str] | None]:
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
    return _locate(model_dir)[0]


def _short(items: list[str], n: int = 8) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _sources(headers: dict[str, dict], wmap: dict[str, str] | None, where) -> dict[str, tuple[str, TensorInfo]]:
    """{raw tensor name: (file, info)}; each tensor in exactly one file, and where the index says."""
    found: dict[str, tuple[str, TensorInfo]] = {}
    twice = []
    for path, infos in headers.items():
        for name, info in infos.items():
            if name in found:
                twice.append(f"{_q(name)} in {os.path.basename(found[name][0])} and {os.path.basename(path)}")
            found[name] = (path, info)
    if twice:
        raise CheckpointError(f"{_p(where)}: tensors stored twice: {_short(twice, 4)}")
    if wmap is None:
        return found
    index = os.path.join(where, INDEX_FILE)
    absent = [f"{_q(n)} (index: {os.path.basename(p)}, " + (f"found in {os.path.basename(found[n][0])})" if n in found else "in no shard)")
              for n, p in wmap.items() if n not in found or found[n][0] != p]
    if absent:
        raise _fail(index, f"tensors not in the shard the index names: {_short(absent, 4)}")
    unlisted = [f"{_q(n)} in {os.path.basename(p)}" for n, (p, _) in found.items() if n not in wmap]
    if unlisted:
        raise _fail(index, f"shards hold tensors the index does not list: {_short(unlisted, 4)}")
    return found


# ---------------------------------------------------------------------------------------------
# Names and shapes


# (prefix, replacement): transformers >= 4.52 in-memory names -> the hub's file names; first match wins
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_VISION = "vision_tower.vision_model."


def canonical_name(key: str, config: PaliGemmaConfig | None = None) -> str | None:
    """The hub name (vision_tower.vision_model.* / language_model.model.* / multi_modal_projector.*) of
    `key` in any supported scheme; None for a key to skip (the SigLIP pooling head, unless `config`
    says vision_use_head=false, in which case its keys come back named and are reported unexpected)."""
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith("vision_tower.") and not key.startswith(_VISION):  # transformers 5 flat SigLIP
        key = _VISION + key[len("vision_tower.") :]
    if key.startswith(_VISION + "head.") and (config is None or config.vision.use_head):
        return None
    return key


def _vision_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    v = config.vision
    Dv, Fv, P = v.hidden_size, v.intermediate_size, v.patch_size
    s = {
        _VISION + "embeddings.patch_embedding.weight": (Dv, v.num_channels, P, P),
        _VISION + "embeddings.patch_embedding.bias": (Dv,),
        _VISION + "embeddings.position_embedding.weight": (v.num_patches, Dv),
    }
    for i in range(v.num_hidden_layers):
        p = f"{_VISION}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            s[p + norm + ".weight"] = s[p + norm + ".bias"] = (Dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = (Dv, Dv), (Dv,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (Fv, Dv), (Fv,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (Dv, Fv), (Dv,)
    s[_VISION + "post_layernorm.weight"] = s[_VISION + "post_layernorm.bias"] = (Dv,)
    return s


def _text_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    t = config.text
    D, F, H, K, E = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.is_gemma2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    s = {"language_model.model.embed_tokens.weight": (t.vocab_size, D)}
    for j in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{j}."
        for norm in norms:
            s[f"{p}{norm}.weight"] = (D,)
        s[p + "self_attn.q_proj.weight"] = (H * E, D)
        s[p + "self_attn.k_proj.weight"] = s[p + "self_attn.v_proj.weight"] = (K * E, D)
        s[p + "self_attn.o_proj.weight"] = (D, H * E)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.up_proj.weight"] = (F, D)
        s[p + "mlp.down_proj.weight"] = (D, F)
    s["language_model.model.norm.weight"] = (D,)
    return s


def expected_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every required weight (hub names) and its shape; the tied lm_head is not required."""
    Dv = config.vision.hidden_size
    proj = {"multi_modal_projector.linear.weight": (config.projection_dim, Dv),
            "multi_modal_projector.linear.bias": (config.projection_dim,)}
    return {**_vision_shapes(config), **proj, **_text_shapes(config)}


def _canonical_sources(sources, config, where) -> dict[str, tuple[str, str, TensorInfo]]:
    """{canonical name: (raw name, file, info)}; two raw names for one canonical name is an error."""
    out: dict[str, tuple[str, str, TensorInfo]] = {}
    clashes = []
    for raw, (path, info) in sources.items():
        canon = canonical_name(raw, config)
        if canon is None:
            continue
        if canon in out:
            clashes.append(f"{_q(out[canon][0])} and {_q(raw)} both name {canon}")
        out[canon] = (raw, path, info)
    if clashes:
        raise CheckpointError(f"{_p(where)}: the same weight is stored twice under different names: {_short(clashes, 3)}")
    return out


def _check_against_config(found, config: PaliGemmaConfig, where) -> None:
    """One error listing every missing, unexpected, mis-shaped and wrongly typed weight."""
    want = dict(expected_shapes(config), **{LM_HEAD: (config.text.vocab_size, config.text.hidden_size)})
    missing = [k for k in want if k not in found and k != LM_HEAD]
    unexpected = [_q(raw) for k, (raw, _, _) in found.items() if k not in want]
    shapes = [f"{k} {list(t.shape)} (config.json implies {list(want[k])})"
              for k, (_, _, t) in found.items() if k in want and t.shape != want[k]]
    dtypes = [f"{k} is {t.dtype}" for k, (_, _, t) in found.items() if k in want and t.dtype not in WEIGHT_DTYPES]
    problems = [f"{len(missing)} missing: {_short(missing)}" if missing else "",
                f"{len(unexpected)} unexpected: {_short(unexpected)}" if unexpected else "",
                f"{len(shapes)} with the wrong shape: {_short(shapes, 4)}" if shapes else "",
                f"{len(dtypes)} not F32/BF16/F16: {_short(dtypes, 4)}" if dtypes else ""]
    if any(problems):
        raise CheckpointError(f"{_p(where)}: weights do not match config.json: " + "; ".join(p for p in problems if p))


def load_weights(model_dir, config: PaliGemmaConfig, *, progress=None) -> dict[str, np.ndarray]:
    """The model's weights as {hub name: float32 host array}, or a CheckpointError; never half a model.

    Every header is validated and the key set and shapes are checked against `config` before any
    tensor data is mapped. `progress(done_bytes, total_bytes, filename)` is called after each tensor.
    """
    files, wmap = _locate(model_dir)
    headers = {path: read_safetensors_header(path) for path in files}
    found = _canonical_sources(_sources(headers, wmap, model_dir), config, model_dir)
    _check_against_config(found, config, model_dir)
    found.pop(LM_HEAD, None)  # tied to embed_tokens: its shape was checked, its data is not needed
    total = sum(t.nbytes for _, _, t in found.values())
    done, out, maps = 0, {}, {}
    for canon in expected_shapes(config):
        raw, path, info = found[canon]
        if path not in maps:
            maps[path] = _map_file(path)
            if maps[path][1] != headers[path]:
                raise _fail(path, "changed on disk while loading")
        out[canon] = _array(path, maps[path][0], raw, info)
        done += info.nbytes
        if progress is not None:
            progress(done, total, path)
    return out


def unflatten(flat: dict) -> dict:
    """{"a.b.0.c": x} -> {"a": {"b": [{"c": x}]}}: numeric parts become list indices 0..n-1."""
    root = _Node()
    for key, value in flat.items():
        node, parts = root, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, _Node())
            if not isinstance(node, _Node):
                raise CheckpointError(f"key {_q(key)}: {_q(part)} is both a tensor and a group of tensors")
        if parts[-1] in node:
            raise CheckpointError(f"key {_q(key)} is both a tensor and a group of tensors")
        node[parts[-1]] = value
    return _listify(root, "")


class _Node(dict):
    """An inner node built by unflatten (so a leaf that happens to be a dict is left alone)."""


def _listify(node, path: str):
    if not isinstance(node, _Node):
        return node
    kids = {k: _listify(v, f"{path}{k}.") for k, v in node.items()}
    numeric = [k for k in kids if k.isascii() and k.isdigit()]
    if not numeric:
        return dict(kids)
    where = path[:-1] or "<root>"
    if len(numeric) != len(kids):
        raise CheckpointError(f"{where}: mixes numbered and named children ({_short(sorted(kids), 6)})")
    if sorted(kids, key=lambda k: (len(k), k)) != [str(i) for i in range(len(kids))]:
        gap = next(i for i in range(len(kids) + 1) if str(i) not in kids)
        raise CheckpointError(f"{where}: numbered children are not 0..{len(kids) - 1} (no {gap}; have {_short(sorted(kids, key=lambda k: (len(k), k)), 6)})")
    return [kids[str(i)] for i in range(len(kids))]
