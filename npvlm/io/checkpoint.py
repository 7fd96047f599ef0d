"""Checkpoint folders: single or sharded safetensors, keys renamed to one scheme, checked against a schema.

This reader knows no model: the model family hands it a `Schema` (the tensors it needs, their
shapes, how the file's names map to its own). Each file is read by safetensors_file.py, which validates its
header before mapping a byte; shards.py finds the files (the shard index checked: every shard present, inside
the folder); here each tensor is checked to live in exactly one of them.

Loading is two-phase: every header of every shard is read and checked, the keys are renamed by the schema
and compared with the shapes it implies; only then is data mapped. F32 tensors are zero-copy read-only views of an mmap (the
arrays keep the map alive), so a 12 GB float32 checkpoint costs its size in page cache, not twice
that in RSS. BF16 and F16 are widened to float32 on the host, except the tensors the caller will keep
in fewer bits (`weights=` "bfloat16" | "int8", `packed(name)`): a BF16 one comes back as its raw uint16
bits, a view of the map like an F32 tensor (the caller wraps it, npvlm/packed.py; nothing is widened).
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import CheckpointError
from .safetensors_file import (TensorInfo, _array, _fail, _map_file, _p, _q,  # noqa: F401
                               read_safetensors, read_safetensors_header)
from .shards import INDEX_FILE, checkpoint_files, locate  # noqa: F401  (checkpoint_files: part of this API)

WEIGHT_DTYPES = ("F32", "BF16", "F16")
SCALE_SUFFIX = "_scale"  # `npvlm quantize`: NAME (I8 [out, in]) + NAME_scale (F32 [out]) is one int8 weight


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
# What the model family expects: a schema


@dataclass(frozen=True)
class Schema:
    """What a model family needs from a checkpoint, in its own canonical names.

    required   {name: shape} every tensor the model reads, in load order
    optional   {name: shape} tensors that may be present (shape-checked) and are dropped (a tied head)
    rename     file name -> canonical name, or None for a tensor to skip (a head the model never uses)
    source     what the shapes come from, for messages ("config.json")
    """

    required: dict
    optional: dict = field(default_factory=dict)
    rename: "Callable[[str], str | None] | None" = None  # None: the file's names are the canonical ones
    source: str = "config.json"


def _canonical_sources(sources, schema: Schema, where) -> dict[str, tuple[str, str, TensorInfo]]:
    """{canonical name: (raw name, file, info)}; two raw names for one canonical name is an error."""
    out: dict[str, tuple[str, str, TensorInfo]] = {}
    clashes = []
    for raw, (path, info) in sources.items():
        canon = schema.rename(raw) if schema.rename else raw
        if canon is None:
            continue
        if canon in out:
            clashes.append(f"{_q(out[canon][0])} and {_q(raw)} both name {canon}")
        out[canon] = (raw, path, info)
    if clashes:
        raise CheckpointError(f"{_p(where)}: the same weight is stored twice under different names: {_short(clashes, 3)}")
    return out


def _split_scales(sources, where) -> dict[str, tuple[str, TensorInfo]]:
    """Take the `NAME_scale` tensors of int8 weights (npvlm quantize) out of `sources`: {raw NAME: (file, info)}."""
    scales = {}
    for raw in [r for r in sources if r.endswith(SCALE_SUFFIX)]:
        base = raw[: -len(SCALE_SUFFIX)]
        if base in sources and sources[base][1].dtype == "I8":
            path, info = sources.pop(raw)
            q = sources[base][1]
            if info.dtype != "F32" or len(q.shape) != 2 or info.shape != q.shape[:1]:
                raise _fail(path, f"{_q(raw)} is {info.dtype} {list(info.shape)}; the scale of an I8 weight "
                                  f"{list(q.shape)} must be F32 [{q.shape[0] if q.shape else '?'}]")
            scales[base] = (path, info)
    return scales


def _check_against_schema(found, schema: Schema, where, quantized=frozenset()) -> None:
    """One error listing every missing, unexpected, mis-shaped and wrongly typed weight."""
    want = {**schema.required, **schema.optional}
    missing = [k for k in schema.required if k not in found]
    unexpected = [_q(raw) for k, (raw, _, _) in found.items() if k not in want]
    shapes = [f"{k} {list(t.shape)} ({schema.source} implies {list(want[k])})"
              for k, (_, _, t) in found.items() if k in want and t.shape != want[k]]
    dtypes = [f"{k} is {t.dtype}" for k, (raw, _, t) in found.items() if k in want and t.dtype not in WEIGHT_DTYPES
              and not (t.dtype == "I8" and raw in quantized)]
    problems = [f"{len(missing)} missing: {_short(missing)}" if missing else "",
                f"{len(unexpected)} unexpected: {_short(unexpected)}" if unexpected else "",
                f"{len(shapes)} with the wrong shape: {_short(shapes, 4)}" if shapes else "",
                f"{len(dtypes)} not F32/BF16/F16: {_short(dtypes, 4)}" if dtypes else ""]
    if any(problems):
        raise CheckpointError(f"{_p(where)}: weights do not match {schema.source}: " + "; ".join(p for p in problems if p))


def file_identity(path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) of a file: what says it is still the file that was mapped."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def read_headers(model_dir) -> tuple[dict[str, dict[str, TensorInfo]], dict | None]:
    """({file: {raw name: TensorInfo}}, index weight map or None): every header validated, no data read."""
    files, wmap = locate(model_dir)
    return {path: read_safetensors_header(path) for path in files}, wmap


def load_weights(model_dir, schema: Schema, *, progress=None, mmap: bool = True, headers=None,
                 identities: dict | None = None, weights: str = "float32",
                 packed: "Callable[[str, tuple], bool] | None" = None) -> dict[str, np.ndarray]:
    """The model's weights as {canonical name: float32 host array}, or a CheckpointError; never half a model.

    Every header is validated and the key set and shapes are checked against the model family's
    `schema` before any tensor data is mapped. `progress(done_bytes, total_bytes, filename)` is
    called after each tensor. The float32 memory the weights will take is checked against what is available
    (memory.py) before the first array is made. `mmap=False` reads every tensor into memory (the file may then
    change or vanish); with mmap, `identities` (if given) receives each file's (size, mtime_ns, inode).
    `headers` is read_headers(model_dir), when the caller has it already.
    `weights` != "float32": the tensors with `packed(canonical name, shape)` true will be kept in bfloat16 or
    int8 by the caller; BF16 ones come back as raw uint16 bits (mapped, not widened), and the memory check
    counts what stays resident in that form (a refusal names the `--weights` that would fit).
    """
    from .memory import WEIGHTS, available_bytes, check_fits, gib, load_estimate, weights_that_fit

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")

    headers, wmap = read_headers(model_dir) if headers is None else headers
    sources = _sources(headers, wmap, model_dir)
    scales = _split_scales(sources, model_dir)  # int8 checkpoints written by `npvlm quantize`
    found = _canonical_sources(sources, schema, model_dir)
    _check_against_schema(found, schema, model_dir, frozenset(scales))
    for name in schema.optional:
        found.pop(name, None)  # e.g. a head tied to the embedding: its shape was checked, its data is not needed
    total = sum(t.nbytes for _, _, t in found.values())
    names = list(found)
    infos = [found[k][2] for k in names]
    narrow = [weights != "float32" and packed is not None and packed(k, found[k][2].shape) for k in names]
    flags = [packed is not None and packed(k, found[k][2].shape) for k in names]
    anon, mapped = load_estimate(infos, mmap, weights, narrow)
    check_fits(anon, f"{_p(model_dir)}: loading {len(found)} tensors as {weights}" +
               (f" (plus {gib(mapped)} mapped from the file)" if mapped else ""),
               lambda: weights_that_fit(infos, mmap, flags, available_bytes(), weights) +
               ("" if mmap else "; try without --no-mmap"))
    raw = dict(zip(names, narrow))
    done, out, maps = 0, {}, {}

    def mapped(path):
        if path not in maps:
            if identities is not None:
                identities[path] = file_identity(path)
            maps[path] = _map_file(path)
            if maps[path][1] != headers[path]:
                raise _fail(path, "changed on disk while loading")
        return maps[path][0]

    for canon in schema.required:
        raw_name, path, info = found[canon]
        out[canon] = _array(path, mapped(path), raw_name, info, copy=not mmap, raw_bf16=raw[canon])
        if raw_name in scales:  # an int8 weight: (q int8 [out, in], scale float32 [out]), packed by the caller
            spath, sinfo = scales[raw_name]
            out[canon] = (out[canon], _array(spath, mapped(spath), raw_name + SCALE_SUFFIX, sinfo, copy=not mmap))
        done += info.nbytes
        if progress is not None:
            progress(done, total, path)
    if not mmap:  # every array is a copy: let go of the files now
        for mm, _ in maps.values():
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere keeps its map open; harmless
                pass
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
