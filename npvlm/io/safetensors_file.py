"""The safetensors file format, read in NumPy and validated before a byte of data is mapped.

A file is a u64 little-endian N, an N-byte UTF-8 JSON header {name: {dtype, shape, data_offsets:
[b, e]}} with an optional `__metadata__` (str -> str), then the raw little-endian bytes, offsets
relative to the end of the header (https://github.com/huggingface/safetensors). We re-implement the
reference's checks (tensor.rs, FIELD-NOTES.md §3.1) and add a few of our own (duplicate keys,
unknown dtypes, git-LFS pointers), so that hostile or broken files fail with one `CheckpointError`
line instead of a NumPy traceback or a silently wrong model.

F32 tensors are zero-copy read-only views of an mmap (the arrays keep the map alive); BF16 and F16
are widened to float32 on the host, unless the caller asks for BF16 as raw bits (`raw_bf16`): then
a BF16 tensor is a zero-copy read-only uint16 view of the map, its bits as stored (bfloat16 is the
top half of a float32), for weights kept resident in bfloat16 (npvlm/packed.py Bf16Weight).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Callable, NamedTuple

import numpy as np

from ..errors import CheckpointError, show, show_path
from .files import LFS_MAGIC, check_regular, lfs_pointer_message, parse_json

MAX_HEADER_BYTES = 100_000_000  # the reference's cap on N
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


def _q(x) -> str:
    return show(x, 80)


def _p(path) -> str:
    return show_path(path)


def _fail(path, msg: str) -> CheckpointError:
    return CheckpointError(f"{show_path(path)}: {msg}")


def _load_json(path, raw: bytes, what: str):
    """Strict JSON (UTF-8, no duplicate keys, no NaN/Infinity); any failure is one CheckpointError."""
    return parse_json(raw, path, what, CheckpointError, strict=True)


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
        raise _fail(path, lfs_pointer_message("weights"))
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
    check_regular(path, CheckpointError)
    try:
        with open(path, "rb") as f:
            return _parse_header(path, os.fstat(f.fileno()).st_size, _file_reader(f))[0]
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None


def _map_file(path):
    """mmap the whole file read-only and validate its header from the map: (map, infos)."""
    check_regular(path, CheckpointError)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:  # raises the right error (mmap also refuses an empty file)
                _parse_header(path, size, _file_reader(f))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise _fail(path, f"cannot map ({getattr(e, 'strerror', None) or e})") from None
    return mm, _parse_header(path, len(mm), lambda o, c: mm[o : o + c])[0]


def _array(path, mm, name: str, t: TensorInfo, copy: bool = False, raw_bf16: bool = False) -> np.ndarray:
    """One tensor: F32 (and other NumPy dtypes) as a view of the map (a copy in memory with `copy`),
    BF16/F16 widened to float32; with `raw_bf16` a BF16 tensor is its uint16 bits, viewed like an F32 one."""
    itemsize, code = DTYPES[t.dtype]
    count = t.nbytes // itemsize
    if t.dtype == "BF16" and raw_bf16:
        code = "<u2"  # the stored bits, mapped (or copied) exactly as F32 data is
    elif t.dtype == "BF16":  # bfloat16 is the top half of a float32
        wide = np.frombuffer(mm, dtype="<u2", count=count, offset=t.start).astype(np.uint32)
        wide <<= 16
        _release(mm, t)
        return wide.view(np.float32).reshape(t.shape)
    if code is None:
        raise _fail(path, f"tensor {_q(name)}: dtype {t.dtype} has no NumPy equivalent")
    a = np.frombuffer(mm, dtype=code, count=count, offset=t.start).reshape(t.shape)
    if t.dtype == "F16":
        a = a.astype(np.float32)
        _release(mm, t)
    elif copy:
        a = a.copy()
        a.flags.writeable = False  # as read-only as the mapped view it replaces
        _release(mm, t)
    return a


def _release(mm, t: TensorInfo) -> None:
    """Unmap the pages of a tensor that was widened: its float32 copy is what stays in memory, so
    a bf16 checkpoint peaks at its float32 size, not that plus the file (the page cache keeps it)."""
    page = mmap.PAGESIZE
    lo, hi = -(-t.start // page) * page, (t.end // page) * page
    if hi > lo and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def read_safetensors(path, *, names=None, raw_bf16: bool = False) -> dict[str, np.ndarray]:
    """Validated tensors of one file (all, or `names`): F32 zero-copy read-only, BF16/F16 as float32
    (BF16 as its raw uint16 bits, zero-copy read-only, with `raw_bf16`)."""
    mm, infos = _map_file(path)
    wanted = list(infos) if names is None else list(names)
    for name in wanted:
        if name not in infos:
            raise _fail(path, f"no tensor {_q(name)} in this file ({len(infos)} tensors)")
    return {name: _array(path, mm, name, infos[name], raw_bf16=raw_bf16) for name in wanted}
