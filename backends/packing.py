"""NumPy side of the packed weights: float32 -> bf16 bits / int8 + scale, and back.

The containers (npvlm/packed.py) import no array library; what needs a bit view of a float32 lives
here, on the backend side, in plain NumPy so it works without numba:

    to_bf16_bits(w)      float32 -> uint16, round-to-nearest-even, bit-identical to torch's
                         `w.to(torch.bfloat16)` on the CPU (NaN -> 0xFFFF, as torch's CPU kernel
                         writes every NaN; overflow past bf16's largest finite -> +-inf; float32
                         subnormals round like any other value, no flush to zero)
    widen_bf16(bits)     uint16 -> float32: the bits are the top half of a float32, so exact
    quantize_int8(w)     float32 [out, in] (or bf16 bits) -> q int8 [out, in], scale float32 [out]:
                         scale = max|w_row| / 127, q = round-half-even(w / scale) in [-127, 127]
    bf16_weight(w), int8_weight(w)   the containers the loader builds for weights="bfloat16" | "int8"
    is_packed(name, shape)           which checkpoint tensors npvlm.load(weights=...) narrows: the 2-D
                                     Linear weights of both towers and the projector, and the tied
                                     token embedding / LM head
    pack_weights(flat, weights)      {name: float32 array | raw BF16 uint16 bits} -> the same with those
                                     tensors as Bf16Weight / Int8Weight

Each works a block of rows at a time so a 3B-parameter load holds no float32-sized temporaries.
"""

from __future__ import annotations

import mmap

import numpy as np

from npvlm.packed import Bf16Weight, Int8Weight

ROWS_PER_BLOCK_BYTES = 1 << 24  # 16 MiB of float32 per block of rows when converting


def _row_blocks(n_rows: int, row_len: int):
    step = max(1, ROWS_PER_BLOCK_BYTES // (4 * max(1, row_len)))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def to_bf16_bits(w) -> np.ndarray:  # float32 [...] -> uint16 [...]
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw bits, as torch does."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    flat = w.reshape(-1, w.shape[-1]) if w.ndim > 1 else w.reshape(1, -1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for a, b in _row_blocks(*flat.shape):
        u = flat[a:b].view(np.uint32)
        r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)  # ties to even
        out[a:b] = np.where(np.isnan(flat[a:b]), np.uint32(0xFFFF), r)  # NaN: torch's CPU kernel writes 0xFFFF
    return out.reshape(w.shape)


def widen_bf16(bits) -> np.ndarray:  # uint16 [...] -> float32 [...], exact
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(w) -> "tuple[np.ndarray, np.ndarray]":  # float32 or bf16 bits [out, in] -> int8 [out, in], float32 [out]
    """Symmetric per-output-channel int8 (absmax / 127 per row; a zero row gets scale 0 and q 0). A uint16 `w` is
    bfloat16 bits (a BF16 checkpoint's tensor), widened a block of rows at a time: never a float32 copy of it all."""
    w = np.asarray(w)
    w = w if w.dtype == np.uint16 else w.astype(np.float32, copy=False)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8: expected a weight [out, in], got shape {w.shape}")
    q = np.empty(w.shape, dtype=np.int8)
    scale = np.empty(w.shape[0], dtype=np.float32)
    for a, b in _row_blocks(*w.shape):
        blk = widen_bf16(w[a:b]) if w.dtype == np.uint16 else w[a:b]
        if not np.isfinite(blk).all():
            raise ValueError("quantize_int8: the weight holds NaN or infinity; int8 cannot represent it")
        s = (np.abs(blk).max(axis=1) / np.float32(127.0)).astype(np.float32)  # [rows]
        safe = np.where(s > 0, s, np.float32(1.0))[:, None]
        q[a:b] = np.clip(np.rint(blk / safe), -127, 127).astype(np.int8)
        scale[a:b] = s
    return q, scale


def bf16_weight(w) -> Bf16Weight:
    """A float32 Linear weight [out, in] -> Bf16Weight holding its rounded bits."""
    return Bf16Weight(to_bf16_bits(w), widen_bf16)


def int8_weight(w) -> Int8Weight:
    """A float32 Linear weight [out, in] (or its bf16 bits, uint16) -> Int8Weight (q, scale)."""
    return Int8Weight(*quantize_int8(w))


def release_pages(a) -> None:
    """`a` was read from a memory-mapped checkpoint and converted (rounded, quantized) into a new array: drop its
    file pages from this process's resident set (madvise DONTNEED on the whole pages inside it; the page cache
    keeps them, a later read faults them back in). Without this an int8 load of a bf16 file peaks at the int8
    weights plus every page of the file it read. Does nothing for an array that is not a view of an mmap."""
    base = a
    while isinstance(base, (np.ndarray, memoryview)):  # np.frombuffer(mm) -> array -> memoryview -> the mmap
        base = base.obj if isinstance(base, memoryview) else base.base
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise"):
        return
    start = a.ctypes.data - np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data  # byte offset in the map
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, ((start + a.nbytes) // page) * page
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def is_packed(name: str, shape) -> bool:
    """The tensors weights="bfloat16" | "int8" narrows: every 2-D `.weight` of a Linear (q/k/v/o_proj,
    gate/up/down_proj, fc1/fc2, out_proj, the projector) and the token embedding table embed_tokens [V, D]
    (tied: read whole by the head at every decode step, a fifth of the 3B model's bytes; the lookup widens
    only the rows it takes). Kept float32: biases and norms (1-D), the patch embedding (4-D) and the vision
    position embeddings (added whole to every image, a few hundred rows)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    module = name.rsplit(".", 2)[-2]
    return module == "embed_tokens" or "embed" not in module


def pack_weights(flat: dict, weights: str) -> dict:
    """The loader's {canonical name: array} with the is_packed tensors held as `weights`.

    A uint16 array is a BF16 tensor's raw bits (checkpoint.load_weights with raw BF16): for "bfloat16" it is
    wrapped as it is (still a view of the mapped file, nothing copied); for "int8" it is widened, exactly, then
    quantized. A float32 one is rounded to bfloat16 or quantized."""
    out = {}
    for name, a in flat.items():
        if isinstance(a, tuple):  # (q, scale) from an int8 checkpoint (npvlm quantize)
            w = Int8Weight(*a)
            out[name] = w if weights == "int8" else w.widen() if weights == "float32" else bf16_weight(w.widen())
        elif weights == "float32" or not is_packed(name, a.shape):
            out[name] = a
        elif a.dtype == np.uint16 and weights == "bfloat16":
            out[name] = Bf16Weight(a, widen_bf16)  # the file's bits, still mapped
        else:  # bf16 bits -> int8, float32 -> bf16 or int8: new arrays, the file's pages no longer needed
            out[name] = bf16_weight(a) if weights == "bfloat16" else int8_weight(a)
            release_pages(a)
    return out
