"""Text generation with a preallocated KV cache: encode the image once, prefill once, then one token a step.

    prefill:  image features + "<image>"*N <bos> prompt "\\n"  ->  cache rows 0..T-1, next-token logits
    decode:   each new token attends to every cached row and itself (causal), writes row T+i

Greedy and sampling both pick on the device and read back one integer per row: one host sync per
token. Sampling (temperature, top-k, top-p) inverts the cumulative distribution with uniform draws
from one host `random.Random(seed)`, so a seed gives the same text on every backend.
"""

from __future__ import annotations

import math
import numbers
import random
import resource
import sys
import time
from dataclasses import dataclass, field

from array_api_compat import array_namespace

from .errors import GenerationError
from .kv_cache import KVCache
from .paligemma import forward, prefix_lm_masks


@dataclass
class GenerationResult:
    text: str  # decoded answer, special tokens skipped (<locNNNN> / <segNNN> kept)
    token_ids: list  # generated ids, eos excluded
    finish_reason: str  # "eos" or "length"
    prompt: str = ""
    image_size: tuple = (0, 0)  # (width, height) of the original image, for mapping boxes back
    stats: dict = field(default_factory=dict)

    @property
    def detections(self):
        """Boxes parsed from `<locY1><locX1><locY2><locX2> label ; ...`, in original image pixels."""
        from .postprocess import parse_detections

        return parse_detections(self.text, *self.image_size)


def _show(x) -> str:  # a value for a message: never huge, never failing
    try:
        r = repr(x)
    except ValueError:  # ints over 4300 digits refuse repr()
        return f"<{type(x).__name__} too large to print>"
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def check_params(max_new_tokens, temperature, top_p, top_k, seed):
    """Refuse bad generation parameters with a GenerationError naming the parameter and the value."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {_show(max_new_tokens)}")
    if not _is_real(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0, got {_show(temperature)}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {_show(top_p)}")
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {_show(top_k)}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise GenerationError(f"seed must be a non-negative integer, got {_show(seed)}")


def sample(logits, temperature: float, top_k: int, top_p: float, u):
    """logits [B, V] (any namespace) and B uniform draws u in [0, 1) -> next ids [B], on the device.

    As HF orders it: temperature, then top-k, then top-p (the smallest set of most likely tokens
    whose mass reaches top_p), then a draw by inverting the cumulative distribution with u.
    Only the B ids leave the device, never the V-wide distribution.
    """
    xp = array_namespace(logits)
    if temperature == 0.0:
        return xp.argmax(logits, axis=-1)
    B, V = logits.shape
    z = xp.astype(logits, xp.float64) / temperature
    order = xp.argsort(z, axis=-1, descending=True, stable=True)  # [B, V] token ids, most likely first
    z = xp.sort(z, axis=-1, descending=True)
    if 0 < top_k < V:
        z = xp.where(xp.arange(V) < top_k, z, xp.full_like(z, -math.inf))
    p = xp.exp(z - z[:, :1])
    p = p / xp.sum(p, axis=-1, keepdims=True)
    if top_p < 1.0:
        p = xp.where(xp.cumulative_sum(p, axis=-1) - p < top_p, p, xp.zeros_like(p))  # the first token always stays
    cdf = xp.cumulative_sum(p, axis=-1)  # [B, V], last column = the kept mass
    draw = xp.asarray([[x] for x in u], dtype=xp.float64) * cdf[:, -1:]
    rank = xp.minimum(xp.sum(xp.astype(cdf <= draw, xp.int64), axis=-1), V - 1)  # [B] position in `order`
    return xp.take(xp.reshape(order, (B * V,)), xp.arange(B) * V + rank, axis=0)


def check_length(model, prompt_tokens: int, max_new_tokens: int):
    limit = model.config.text.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        n = model.config.num_image_tokens
        what = f"prompt of {prompt_tokens} tokens ({n} image + {prompt_tokens - n} text)"
        if max_new_tokens:
            what += f" plus max_new_tokens {max_new_tokens} = {prompt_tokens + max_new_tokens}"
        raise GenerationError(f"{what} exceeds the model's {limit} positions")


def decode_steps(model, images, prompts, *, max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 exif=True, stats=None):
    """An iterator of the next token ids (a list, one per row) at each step, until every row ends or the
    budget is spent. The parameters are checked now, at the call; the work starts at the first step."""
    check_params(max_new_tokens, temperature, top_p, top_k, seed)
    stats = {} if stats is None else stats
    return _steps(model, images, prompts, max_new_tokens, temperature, top_p, top_k, seed, exif, stats)


def _steps(model, images, prompts, max_new_tokens, temperature, top_p, top_k, seed, exif, stats):
    be, cfg, xp = model.backend, model.config, model.xp
    rng = random.Random(seed)
    batch, cache, logits, t_prefill = prefill(model, images, prompts, max_new_tokens, exif, stats)
    nxt = pick(be, logits, temperature, top_k, top_p, rng)  # reading it back waits for the device
    t0 = time.perf_counter()
    stats["prefill_seconds"] = t0 - t_prefill
    B, T = batch.ids.shape
    # every token generated is real (valid) and causal (not prefix): extend the masks' inputs once
    valid = xp.concat([batch.valid, xp.ones((B, max_new_tokens), dtype=xp.bool)], axis=1)
    prefix = xp.concat([batch.prefix, xp.zeros((B, max_new_tokens), dtype=xp.bool)], axis=1)
    last_pos = [row[-1] for row in batch.host["positions"]]
    done = [False] * B
    for i in range(max_new_tokens):
        nxt = [cfg.pad_token_id if done[b] else int(nxt[b]) for b in range(B)]
        done = [done[b] or nxt[b] in model.stop_ids for b in range(B)]
        stats["new_tokens"] = i + 1
        yield nxt
        if all(done) or i == max_new_tokens - 1:
            break
        s = T + i  # cache row of the token being fed
        ids = xp.asarray([[tok] for tok in nxt], dtype=xp.int64)
        pos = xp.asarray([[p + 1 + i] for p in last_pos], dtype=xp.int64)
        masks = prefix_lm_masks(valid[:, : s + 1], prefix[:, : s + 1], s, cfg=cfg)
        logits = forward(model.params, ids, pos, masks, cfg=cfg, cache=cache, start=s, last_only=True)
        nxt = pick(be, logits, temperature, top_k, top_p, rng)
    stats["decode_seconds"] = time.perf_counter() - t0


def prefill(model, images, prompts, max_new_tokens, exif, stats):
    """Encode the images once and run the whole prompt into a fresh KV cache.

    Returns (batch, cache, last-position logits [B, 1, V], the time the decoder pass started)."""
    be, cfg = model.backend, model.config
    batch = model.prepare([model.prompt_ids(p) for p in prompts])
    B, T = batch.ids.shape
    check_length(model, T, max_new_tokens)
    t0 = time.perf_counter()
    rgb = model.load_images(images, exif=exif)
    feats = model.encode_images(rgb)  # [B, N, D]
    be.synchronize()
    t1 = time.perf_counter()
    t = cfg.text
    embed_w = model.params["language_model"]["model"]["embed_tokens"]["weight"]
    cache = KVCache(embed_w, t.num_hidden_layers, B, t.num_key_value_heads, T + max_new_tokens, t.head_dim)
    masks = prefix_lm_masks(batch.valid, batch.prefix, 0, cfg=cfg)
    logits = forward(model.params, batch.ids, batch.positions, masks, cfg=cfg, image_slot=batch.image_slot, feats=feats,
                     cache=cache, start=0, last_only=True)  # [B, 1, V]
    stats.update(prompt_tokens=T, batch=B, image_sizes=[im.size for im in rgb], image_seconds=t1 - t0, new_tokens=0,
                 kv_cache_bytes=cache.nbytes)
    return batch, cache, logits, t1


def pick(be, logits, temperature, top_k, top_p, rng):  # [B, 1, V] device -> host ids [B]
    u = [rng.random() for _ in range(logits.shape[0])]  # host draws: a seed gives the same text on every backend
    return be.to_host(sample(logits[:, -1, :], temperature, top_k, top_p, u))  # one small read-back per step


def _finish(model, ids, stats, prompt, size):
    cut = next((i for i, t in enumerate(ids) if t in model.stop_ids), None)
    reason = "eos" if cut is not None else "length"
    ids = ids if cut is None else ids[:cut]
    return GenerationResult(model.tokenizer.decode(ids), ids, reason, prompt=prompt, image_size=size, stats=stats)


def _as_batch(image, prompt):
    """(images, prompts, batched): a batch only when both are lists (or tuples) of the same length."""
    many = lambda x: isinstance(x, (list, tuple))  # noqa: E731
    if not many(prompt):
        if many(image):
            raise GenerationError(f"{len(image)} images for 1 prompt: give a list of prompts, one per image")
        return [image], [prompt], False
    images = list(image) if many(image) else [image]
    if len(images) != len(prompt):
        raise GenerationError(f"{len(images)} images for {len(prompt)} prompts: give one image per prompt")
    if not prompt:
        raise GenerationError("no prompts: a batch needs at least one image and prompt")
    return images, list(prompt), True


def generate(model, image, prompt, **kw):
    """One image + prompt -> GenerationResult; lists of images and prompts -> a list (left-padded batch)."""
    images, prompts, batched = _as_batch(image, prompt)
    stats = {}
    rows = [[] for _ in prompts]
    for step in decode_steps(model, images, prompts, stats=stats, **kw):
        for b, tok in enumerate(step):
            rows[b].append(tok)
    _finish_stats(model, stats)
    results = [_finish(model, r, stats, p, size) for r, p, size in zip(rows, prompts, stats["image_sizes"])]
    return results if batched else results[0]


def stream(model, image, prompt, **kw):
    """Yield text pieces as tokens arrive, then the GenerationResult as the last item.

    The parameters are checked at the call, before the first item is asked for."""
    stats = {}
    return _stream(model, decode_steps(model, [image], [prompt], stats=stats, **kw), stats, prompt)


def _stream(model, steps, stats, prompt):
    row, ids, shown = [], [], ""
    for (tok,) in steps:
        row.append(tok)
        if tok in model.stop_ids:
            continue  # the last step: the iterator ends after it
        ids.append(tok)
        text = model.tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back half a UTF-8 character
            yield text[len(shown):]
            shown = text
    _finish_stats(model, stats)
    result = _finish(model, row, stats, prompt, stats["image_sizes"][0])
    if len(result.text) > len(shown):
        yield result.text[len(shown):]
    yield result


def _finish_stats(model, stats):
    stats["load_seconds"] = model.load_seconds
    dec = stats.get("decode_seconds", 0.0)
    stats["prefill_tokens_per_second"] = stats["prompt_tokens"] * stats["batch"] / max(stats["prefill_seconds"], 1e-9)
    stats["decode_tokens_per_second"] = max(stats["new_tokens"] - 1, 0) * stats["batch"] / dec if dec > 0 else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    stats["peak_device_bytes"] = model.backend.peak_memory()
    stats["backend"] = model.backend.name
