"""How much memory a load or a generation will take, checked against what the machine has, before allocating.

    available_bytes()                     min(cgroup limit - usage, MemAvailable, ulimit -v room, NPVLM_MEMORY_LIMIT)
    check_sizes(cfg, where)               the config sizes that drive allocations are sane (layers, positions)
    load_estimate(infos, mmap, weights, packed)   host bytes the weights take resident: float32, or the Linear
                                          weights kept in bfloat16 / int8 (`--weights`)
    generation_estimate(cfg, B, T, new)   KV cache + prefill activations for B rows of T prompt tokens + new
    check_fits(need, what, hint)          one MemoryError-free refusal line: needed, available, what would fit

A refusal is raised *before* the allocation, so a config or checkpoint that would not fit ends in one line
instead of numpy's _ArrayMemoryError (or the kernel's OOM killer). `NPVLM_MEMORY_LIMIT=BYTES` caps the
figure (a user sharing a machine; the tests), it never raises it.
"""

from __future__ import annotations

import os

from ..errors import ConfigError, NpvlmError

MAX_LAYERS = 1024  # the largest released Gemma has 62 layers, SigLIP so400m 27
MAX_POSITIONS = 1 << 20  # PaliGemma: 8192; a KV cache is sized from this
MAX_ADDED_TOKENS = 1 << 18  # more than PaliGemma's whole vocabulary (257 216)


class OutOfMemory(NpvlmError):
    """The work would need more memory than is available (reported before any of it is allocated)."""


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_path)
        if limit is not None and limit < 1 << 60:  # v1 writes 2**63 - page for "no limit"
            usage = _read_int(usage_path) or 0
            return max(0, limit - usage)
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_room() -> int | None:
    """Bytes left under `ulimit -v` (RLIMIT_AS) given this process's current VmSize, or None without a limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, soft - vm)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def available_bytes() -> int | None:
    """Memory this process may still allocate: the least of the cgroup room, MemAvailable, the room under
    `ulimit -v` and NPVLM_MEMORY_LIMIT; None where none of them is known (then nothing is refused)."""
    figures = [_cgroup_room(), _mem_available(), _address_space_room()]
    env = os.environ.get("NPVLM_MEMORY_LIMIT", "").strip()
    if env:
        if not env.isdigit():
            raise ConfigError(f"NPVLM_MEMORY_LIMIT must be a number of bytes, got {env[:40]!r}")
        figures.append(int(env))
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_sizes(cfg, where: str) -> None:
    """Layer counts and positions are bounded before any table or cache is built from them."""
    for name, val, cap in (("vision_config.num_hidden_layers", cfg.vision.num_hidden_layers, MAX_LAYERS),
                           ("text_config.num_hidden_layers", cfg.text.num_hidden_layers, MAX_LAYERS),
                           ("text_config.max_position_embeddings", cfg.text.max_position_embeddings, MAX_POSITIONS)):
        if val > cap:
            raise ConfigError(f"{where}: {name} = {val} is more than npvlm supports ({cap})")


WEIGHTS = ("float32", "bfloat16", "int8")  # how the 2-D Linear weights are held (npvlm/packed.py)


def load_estimate(infos, mmap: bool = True, weights: str = "float32", packed=None) -> tuple[int, int]:
    """(anonymous bytes at the peak of the load, file-backed bytes) for tensors given as TensorInfo, as `weights`.

    float32: BF16/F16 are widened into new float32 arrays; F32 ones are views of the mapped file (page cache)
    unless `mmap` is off. For the tensors flagged in `packed` (parallel to infos; the 2-D Linear weights and the
    tied embedding), bfloat16 keeps 2 bytes a weight (a BF16 file's bits stay mapped, others are rounded into
    new arrays) and int8 1 byte plus a float32 scale per row. Converting reads a BF16 or F32 tensor where it is
    mapped (bf16 bits are widened a block of rows at a time, backends/packing.py); what exists only while
    loading, and is counted in the peak: an F16 tensor widened whole by the reader, and without `mmap` the
    in-memory copy of every tensor that is then converted."""
    infos = list(infos)
    packed = [False] * len(infos) if packed is None else list(packed)
    anon = mapped = held = widest = 0  # held: copies that coexist while loading; widest: one tensor at a time
    for t, pk in zip(infos, packed):
        n = t.nbytes // {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}.get(t.dtype, 4)  # elements
        rows = t.shape[0] if t.shape else 1
        if t.dtype == "I8":  # an int8 weight of `npvlm quantize` (+ its F32 scale, 4 bytes a row)
            if weights == "int8":
                mapped, anon = (mapped + n + 4 * rows, anon) if mmap else (mapped, anon + n + 4 * rows)
            else:  # widened (q * scale), then rounded to bf16 for "bfloat16"
                anon += 2 * n if weights == "bfloat16" else 4 * n
                widest = max(widest, 4 * n if weights == "bfloat16" else 0)
        elif pk and weights == "bfloat16" and t.dtype == "BF16":
            mapped, anon = (mapped + 2 * n, anon) if mmap else (mapped, anon + 2 * n)
        elif pk and weights in ("bfloat16", "int8"):
            anon += 2 * n if weights == "bfloat16" else n + 4 * rows
            held += 4 * n if t.dtype == "F16" else 0 if mmap else t.nbytes
        elif t.dtype == "F32" and mmap:
            mapped += 4 * n
        else:
            anon += 4 * n
    return anon + held + widest, mapped


def weights_that_fit(infos, mmap: bool, packed, have: "int | None", current: str = "float32") -> str:
    """'; --weights X would fit (N GiB)' for the other weight modes whose whole resident size (new arrays and
    the weights mapped from the file, which decode reads at every token) fits in `have` bytes, or ''."""
    if have is None:
        return ""
    fits = []
    for w in (w for w in WEIGHTS if w != current):
        anon, mapped = load_estimate(infos, mmap, w, packed)
        if anon + mapped <= have:
            fits.append(f"--weights {w} would fit ({gib(anon + mapped)}" +
                        (f", {gib(mapped)} of it mapped from the file)" if mapped else ")"))
    return "; " + ", ".join(fits) if fits else ""


def generation_estimate(cfg, batch: int, prompt_tokens: int, max_new_tokens: int, itemsize: int = 4) -> int:
    """Bytes a generation allocates: the KV cache for prompt + new tokens, and the largest prefill
    activations (attention scores over the cache, the MLP's three hidden tensors, the residual stream)."""
    t = cfg.text
    B, T, C = batch, prompt_tokens, prompt_tokens + max_new_tokens
    kv = 2 * t.num_hidden_layers * B * t.num_key_value_heads * C * t.head_dim * itemsize
    scores = 2 * B * t.num_attention_heads * T * C * itemsize  # logits and their softmax
    mlp = 3 * B * T * t.intermediate_size * itemsize
    stream = 6 * B * T * max(t.hidden_size, t.num_attention_heads * t.head_dim) * itemsize
    return kv + scores + mlp + stream + 2 * B * t.vocab_size * itemsize


def check_fits(need: int, what: str, hint=None) -> None:
    """Raise OutOfMemory when `need` bytes exceed what is available; `hint()` may say what would fit."""
    have = available_bytes()
    if have is None or need <= have:
        return
    extra = hint() if hint is not None else ""
    raise OutOfMemory(f"{what} needs {gib(need)} of memory, {gib(have)} is available{extra}")


def check_generation(cfg, batch: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation whose KV cache and activations do not fit; name the max_new_tokens that would."""
    need = generation_estimate(cfg, batch, prompt_tokens, max_new_tokens)

    def hint():
        have = available_bytes() or 0
        lo, hi = 0, max_new_tokens  # the estimate grows with max_new_tokens: bisect for the largest that fits
        if generation_estimate(cfg, batch, prompt_tokens, 1) > have:
            return f" even for 1 new token ({batch} x {prompt_tokens} prompt tokens): use a shorter prompt or batch"
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if generation_estimate(cfg, batch, prompt_tokens, mid) <= have else (lo, mid - 1)
        return f"; --max-new-tokens {lo} would fit"

    check_fits(need, f"generating {max_new_tokens} tokens after a {prompt_tokens}-token prompt (batch {batch}; "
               f"KV cache {gib(2 * cfg.text.num_hidden_layers * batch * cfg.text.num_key_value_heads * (prompt_tokens + max_new_tokens) * cfg.text.head_dim * 4)})",
               hint)
