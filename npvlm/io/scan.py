"""Weights that are not numbers: NaN, infinity, and magnitudes no trained model holds.

Two places look for them:

    weights_error(model, what, values)   after a model's outputs came out non-finite (the first generation
                                         step's logits, SigLIP's embeddings): scan the loaded weights then,
                                         once, and name the tensors at fault by file and by the file's names
    scan_folder(model_dir, max_abs)      `npvlm info --check`: every tensor of every file, read through the
                                         map a block at a time (pages given back after each block), so a
                                         12 GB folder is checked in a few MB of memory

The folder scan reads a float's bits, not the float: with the sign bit cleared, the IEEE-754 bit pattern of
a float orders like its magnitude (Goldberg 1991, "What every computer scientist should know about
floating-point arithmetic", §2.1.3), so one integer array per block answers NaN (bits above infinity's),
Inf (equal to it) and |w| > bound (above the bound's bits) for F32, BF16 and F16 alike; BF16 is never widened.
The loaded weights live on a backend, so that scan uses only the array API (isnan, isinf, integer masks).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
from array_api_compat import array_namespace

from ..errors import CheckpointError, show, show_path
from ..packed import Bf16Weight, Int8Weight

MAX_ABS = 1e4  # |w| above this is reported by --check (the README says why)
BLOCK = 1 << 22  # values per block: 16 MB of float32
# dtype: (unsigned view, sign-cleared mask, bits of +inf, the float type a magnitude's bits are read back as)
FLOAT_BITS = {"F32": ("<u4", 0x7FFFFFFF, 0x7F800000, np.float32), "F16": ("<u2", 0x7FFF, 0x7C00, np.float16),
              "BF16": ("<u2", 0x7FFF, 0x7F80, None)}
INT8_LEVELS = 127  # an int8 weight is q * scale with |q| <= 127 (npvlm quantize): its largest |w| is 127 * scale


# ---------------------------------------------------------------------------------------------
# The loaded weights (any backend)


def _count(mask, xp) -> int:
    return int(xp.sum(xp.astype(mask, xp.int64)))


def nonfinite_counts(w) -> tuple[int, int]:
    """(NaN, Inf) counts of one loaded weight: a backend array, a Bf16Weight (read from its bits), an Int8Weight
    or a (q, scale) pair (int8 is always finite: its scale is counted). A block of rows at a time."""
    if isinstance(w, Int8Weight):
        w = w.scale
    elif isinstance(w, tuple):  # (q, scale) of an int8 checkpoint, before packing
        w = w[1]
    bits = w.bits if isinstance(w, Bf16Weight) else w
    xp = array_namespace(bits)
    raw_bf16 = isinstance(w, Bf16Weight) or bits.dtype == xp.uint16  # load_weights hands BF16 over as its bits
    if not raw_bf16 and not xp.isdtype(bits.dtype, "real floating"):
        return 0, 0
    x = xp.reshape(bits, (1, -1)) if bits.ndim < 2 else bits
    step = max(1, BLOCK // max(1, x.size // x.shape[0]))
    nan = inf = 0
    for a in range(0, x.shape[0], step):
        blk = x[a:min(a + step, x.shape[0]), ...]  # in bounds: the array API does not clip a slice
        if raw_bf16:  # exponent all ones: infinity (mantissa 0) or NaN
            top = (blk & 0x7F80) == 0x7F80
            mant = (blk & 0x007F) != 0
            nan, inf = nan + _count(top & mant, xp), inf + _count(top & ~mant, xp)
        else:
            nan, inf = nan + _count(xp.isnan(blk), xp), inf + _count(xp.isinf(blk), xp)
    return nan, inf


def _leaves(tree, prefix=""):
    """(dotted name, leaf) of a params tree (dicts and lists, as unflatten builds) or a flat {name: array} dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def nonfinite_tensors(tree) -> list[tuple[str, int, int]]:
    """[(canonical name, NaN count, Inf count)] of the loaded weights holding any, in tree order."""
    out = []
    for name, w in _leaves(tree):
        nan, inf = nonfinite_counts(w)
        if nan or inf:
            out.append((name, nan, inf))
    return out


def _file_names(model_dir, rename) -> dict[str, tuple[str, str]]:
    """{canonical name: (file, the file's tensor name)} from the headers alone; {} if they cannot be read now.
    An I8 weight (npvlm quantize) is named by its F32 `_scale`: int8 values are finite, only a scale can be NaN."""
    from .checkpoint import SCALE_SUFFIX, read_headers

    try:
        headers, _ = read_headers(model_dir)
    except (CheckpointError, OSError):
        return {}
    out = {}
    for path, infos in headers.items():
        for raw, info in infos.items():
            canon = rename(raw) if rename else raw
            if canon is not None:
                out.setdefault(canon, (path, raw + SCALE_SUFFIX if info.dtype == "I8" else raw))
    return out


def corrupt_weights(tree, model_dir, rename=None) -> CheckpointError | None:
    """The error naming the weights of `tree` that hold NaN / Inf (by file and the file's own tensor name,
    mapped back through the schema's `rename`, with the counts the file holds), or None when all are finite."""
    bad = nonfinite_tensors(tree)
    if not bad:
        return None
    where = _file_names(model_dir, rename)

    (name, nan, inf), rest = bad[0], bad[1:]
    path, raw = where.get(name, (model_dir, name))
    counts = _file_counts(path, raw)  # the file's own numbers (a widened int8 row repeats its scale's NaN)
    held = f"{nan} NaN / {inf} Inf values as loaded" if counts is None or counts == (0, 0) else \
        f"{counts[0]} NaN / {counts[1]} Inf values"
    more = f" (and {len(rest)} more: {', '.join(show(where.get(n, (0, n))[1], 80) for n, _, _ in rest[:3])}" \
           f"{', ...' if len(rest) > 3 else ''})" if rest else ""
    return CheckpointError(f"{show_path(path)}: tensor {show(raw, 100)} holds {held}{more}: the checkpoint is corrupt")


def _file_counts(path, raw) -> tuple[int, int] | None:
    """(NaN, Inf) of tensor `raw` as stored in `path`, or None when that cannot be read now."""
    from .safetensors_file import _map_file

    try:
        mm, infos = _map_file(path)
    except (CheckpointError, OSError):
        return None
    try:
        info = infos.get(raw)
        if info is None or info.dtype not in FLOAT_BITS:
            return None
        st = tensor_stats(mm, info, float("inf"))
        return st["nan"], st["inf"]
    finally:
        mm.close()


def pack_naming_nonfinite(pack, flat: dict, model_dir, rename=None) -> dict:
    """pack(flat) (the loader's weights narrowed to int8 / bfloat16), with int8's refusal of NaN / Inf (a
    ValueError from the quantizer) turned into the CheckpointError naming the tensor: a scan only on that path."""
    try:
        return pack(flat)
    except ValueError:
        err = corrupt_weights(flat, model_dir, rename)
        if err is None:
            raise
        raise err from None


def weights_error(model, rename, what: str, values) -> CheckpointError:
    """Why `values` (device outputs named `what`) hold NaN / Inf: the weights at fault, found by one scan of the
    loaded weights (kept on the model, so a server or a batch job asking again does not scan again); or, with
    every weight finite, the counts and what else overflows."""
    cached = getattr(model, "_weights_error", None)
    if cached is not None:
        return CheckpointError(cached)
    err = corrupt_weights(model.params, model.model_dir, rename)
    if err is None:
        xp = array_namespace(values)
        nan, inf = _count(xp.isnan(values), xp), _count(xp.isinf(values), xp)
        err = CheckpointError(f"{show_path(model.model_dir)}: {what} hold {nan} NaN / {inf} Inf values of {values.size} "
                              f"though every weight is finite: weights of absurd magnitude overflow float32 (`npvlm info "
                              f"--check --model {show_path(model.model_dir)}` lists those above {MAX_ABS:g})")
    else:
        model._weights_error = str(err)
    return err


def check_finite(values, on_bad):
    """`values` (a device array) when every entry is finite, else raise `on_bad(values)`. One reduction and one
    bool back to the host."""
    xp = array_namespace(values)
    if not bool(xp.all(xp.isfinite(values))):
        raise on_bad(values)
    return values


def checked_step(on: bool = True):
    """numpy's own floating-point warnings ("invalid value encountered in matmul": an Inf weight times 0) held
    back while a step runs whose outputs `check_finite` then checks. A NaN / Inf that reaches them is reported by
    that check, in one line naming the tensor, so the warning would only be a second, vaguer line before it.
    Nowhere else: a decode step is not checked (never per token), and there numpy's warning is the one sign of a
    NaN that only a later token reaches. (np.errstate is per thread; cupy does not warn.)"""
    return np.errstate(all="ignore") if on else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# A model folder's files (npvlm info --check)


def _bound_bits(bound: float, dtype: str) -> int:
    """The sign-cleared bits of the largest value of `dtype` that is <= bound (so bits > it <=> |w| > bound)."""
    _, _, inf_bits, kind = FLOAT_BITS[dtype]
    if dtype == "BF16":  # truncating a float32's bits rounds its magnitude down to a bfloat16
        return min(int(np.float32(_at_most(bound, np.float32)).view(np.uint32)) >> 16, inf_bits - 1)
    return min(int(np.asarray(_at_most(bound, kind), dtype=kind).view(FLOAT_BITS[dtype][0])), inf_bits - 1)


def _at_most(bound: float, kind) -> float:
    """The largest value of float type `kind` that is <= bound (its largest finite value past its range)."""
    with np.errstate(over="ignore"):
        f = kind(bound)  # to nearest: may round up
    return float(np.nextafter(f, kind(0)) if float(f) > bound else f)  # compared as Python floats, not in `kind`


def _value(bits: int, dtype: str) -> float:  # sign-cleared bits -> the magnitude they stand for
    if dtype == "BF16":
        return float(np.uint32(bits << 16).view(np.float32))
    code, _, _, kind = FLOAT_BITS[dtype]
    return float(np.asarray(bits, dtype=code).view(kind))


def _drop(mm, lo: int, hi: int) -> None:
    """Give back the pages of a block already read (file-backed: the page cache keeps them, RSS does not)."""
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, (hi // page) * page
    if hi > lo and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def tensor_stats(mm, info, bound: float, progress=None) -> dict:
    """{nan, inf, above, max_abs} of one F32 / BF16 / F16 tensor of a mapped file, a block at a time.
    max_abs is the largest finite |w| (None when no value is finite); `progress(bytes)` after each block."""
    code, mask, inf_bits, _ = FLOAT_BITS[info.dtype]
    size = np.dtype(code).itemsize
    thr = _bound_bits(bound, info.dtype)
    n, nan, inf, above, top = info.nbytes // size, 0, 0, 0, -1
    for a in range(0, n, BLOCK):
        count = min(BLOCK, n - a)
        m = np.frombuffer(mm, dtype=code, count=count, offset=info.start + a * size) & np.array(mask, dtype=code)
        over = int(np.count_nonzero(m > thr))  # |w| > bound, NaN and Inf included (their bits lie above it)
        if over:  # the rare block: tell NaN, Inf and large finite values apart
            bad_nan, bad_inf = int(np.count_nonzero(m > inf_bits)), int(np.count_nonzero(m == inf_bits))
            nan, inf, above = nan + bad_nan, inf + bad_inf, above + over - bad_nan - bad_inf
            if bad_nan + bad_inf < count:  # some value of the block is finite
                top = max(top, int(np.where(m < inf_bits, m, 0).max()))
        elif count:
            top = max(top, int(m.max()))
        _drop(mm, info.start + a * size, info.start + (a + count) * size)
        if progress is not None:
            progress((a + count) * size)
    return {"nan": nan, "inf": inf, "above": above, "max_abs": None if top < 0 else _value(top, info.dtype)}


def scan_folder(model_dir, max_abs: float = MAX_ABS, progress=None) -> dict:
    """Every float tensor of a model folder checked for NaN, Inf and |w| > max_abs (the scale of an int8 weight
    as 127 * scale). Returns numbers: {"files", "tensors", "values", "bytes", "seconds", "max_abs", "largest":
    {"tensor", "file", "value"}, "problems": [{"file", "tensor", "dtype", "shape", "nan", "inf", "above",
    "max_abs"}]}. `progress(done_bytes, total_bytes, file)` is called after each block of each tensor."""
    from .checkpoint import SCALE_SUFFIX, read_headers
    from .safetensors_file import _map_file

    t0 = time.perf_counter()
    headers, _ = read_headers(model_dir)
    total = sum(t.nbytes for infos in headers.values() for t in infos.values())
    out = {"model": model_dir, "files": len(headers), "tensors": 0, "values": 0, "bytes": total, "max_abs": max_abs,
           "largest": None, "problems": []}
    done = 0
    for path, infos in headers.items():
        mm, infos = _map_file(path)  # validated again from the map itself
        try:
            for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
                step = None if progress is None else lambda b, at=done: progress(at + b, total, path)
                done += info.nbytes
                scale = name.endswith(SCALE_SUFFIX) and infos.get(name[:-len(SCALE_SUFFIX)], info).dtype == "I8"
                if info.dtype in FLOAT_BITS:
                    k = INT8_LEVELS if scale else 1
                    st = tensor_stats(mm, info, max_abs / k, step)
                    st["max_abs"] = None if st["max_abs"] is None else st["max_abs"] * k
                    out["tensors"] += 1
                    out["values"] += info.nbytes // np.dtype(FLOAT_BITS[info.dtype][0]).itemsize
                    if st["max_abs"] is not None and (out["largest"] is None or st["max_abs"] > out["largest"]["value"]):
                        out["largest"] = {"file": path, "tensor": name, "value": st["max_abs"]}
                    if st["nan"] or st["inf"] or st["above"]:
                        out["problems"].append({"file": path, "tensor": name, "dtype": info.dtype,
                                                "shape": list(info.shape), "int8_scale": scale, **st})
                elif info.dtype == "I8":  # int8 values are finite; their magnitude is their scale's
                    out["tensors"] += 1
                    out["values"] += info.nbytes
                if progress is not None:
                    progress(done, total, path)
        finally:
            mm.close()
    out["seconds"] = time.perf_counter() - t0
    return out
