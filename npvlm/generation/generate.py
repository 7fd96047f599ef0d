"""Text generation with a preallocated KV cache: encode the image once, prefill once, then one token a step.

    prefill:  image features + "<image>"*N <bos> prompt "\\n"  ->  cache columns 0..T-1, next-token logits
    decode:   each new token is written at its row's column and attends to every valid column up to it

`generate_tokens` is the loop, over the model functions `prefill`, `decode_step` and `advance`
(npvlm/models/paligemma.py); `collect` and `stream_text` turn its ids into results and text.
The chosen ids stay on the device between steps; only B integers per step come back, to check
for the end of each row.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass, field

from ..io.scan import check_finite, checked_step
from ..kv_cache import KVCache
from ..models.paligemma import advance, decode_step, image_attention, prefill
from .sampling import check_params, sample


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; checked when built, before any model work."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        check_params(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)


@dataclass
class GenerationResult:
    text: str  # decoded answer, special tokens skipped (<locNNNN> / <segNNN> kept)
    token_ids: list  # generated ids, eos excluded
    finish_reason: str  # "eos" or "length" ("interrupted" from the CLI on Ctrl-C)
    prompt: str = ""
    image_size: tuple = (0, 0)  # (width, height) of the original image, for mapping boxes back
    stats: dict = field(default_factory=dict)
    # with return_attention: float32 [tokens, layers, grid_h, grid_w], the weights the query that chose each
    # token put on the image patches (averaged over heads); row-major patch grid of the squashed square image
    attention: object = None

    def attention_maps(self, layer: int | None = None):  # -> [tokens, grid_h, grid_w]
        """One map per token: from decoder layer `layer` (negative counts from the end), or the mean over layers."""
        if self.attention is None:
            raise ValueError("no attention maps: call generate(..., return_attention=True)")
        return self.attention.mean(axis=1) if layer is None else self.attention[:, layer]

    @property
    def detections(self):
        """Boxes parsed from `<locY1><locX1><locY2><locX2> label ; ...`, in original image pixels."""
        from ..postprocess import parse_detections

        return parse_detections(self.text, *self.image_size)

    @property
    def segments(self):
        """`<loc>x4 <seg>x16 label` pieces: boxes in original image pixels and the 16 raw VQ-VAE codes (no masks)."""
        from ..postprocess import parse_segments

        return parse_segments(self.text, *self.image_size)


def generate_tokens(params, cfg, backend, prompt, feats, sampling: Sampling, stop_ids, stats: dict, maps=None,
                    not_finite=None):
    """Yield the next ids of every row (a host list of B ints) at each step, until every row has met a
    stop id or the budget is spent. `prompt` is a PromptBatch, `feats` the image features [B, N, D].
    With a list `maps`, each step also appends the attention of the query that chose its ids to the image
    tokens, host float32 [B, L, N] (image_attention); without one, no attention weights are computed.
    `not_finite(logits)` gives the error raised when the first step's logits hold NaN / Inf (NaN weights
    make every step NaN, and argmax would pick id 0 for ever); checked at that step only, never per token."""
    xp = backend.xp
    t = cfg.text
    B, T = prompt.ids.shape
    like = params["language_model"]["model"]["norm"]["weight"]  # float32 on the device (embed_tokens may be packed)
    cache = KVCache(like, t.num_hidden_layers, B, t.num_key_value_heads, T + sampling.max_new_tokens, t.head_dim)
    rng = random.Random(sampling.seed)
    t0 = time.perf_counter()
    probs = None if maps is None else []
    with checked_step(not_finite is not None):  # the check reports what numpy would only warn about
        logits, state = prefill(params, prompt, feats, cache, cfg=cfg, probs_out=probs)
        if not_finite is not None:
            check_finite(logits, not_finite)  # [B, V]: one reduction, once
    _keep_maps(maps, probs, prompt, feats, backend)
    chosen = _pick(logits, sampling, rng)  # [B] on the device
    ids = [int(i) for i in backend.to_host(chosen)]  # reading it back waits for the device
    t1 = time.perf_counter()
    # steps: tokens picked, the stop step included; new_tokens: the longest row's answer, as results return it
    stats.update(prompt_tokens=T, batch=B, prefill_seconds=t1 - t0, new_tokens=0, steps=0, kv_cache_bytes=cache.nbytes)
    done = [False] * B
    try:  # an interrupted run still has its decode time (the CLI reports what it generated)
        for i in range(sampling.max_new_tokens):
            ids = [cfg.pad_token_id if done[b] else ids[b] for b in range(B)]
            fresh = [not done[b] and ids[b] not in stop_ids for b in range(B)]
            done = [done[b] or ids[b] in stop_ids for b in range(B)]
            stats["steps"] = i + 1
            stats["new_tokens"] += any(fresh)
            yield ids
            if all(done) or i == sampling.max_new_tokens - 1:
                break
            state = advance(state, xp.astype(chosen, xp.int64))
            probs = None if maps is None else []
            with backend.decoding():  # the backend's thread plan for a decode step (numpy: one BLAS thread)
                chosen = _pick(decode_step(params, state, cfg=cfg, probs_out=probs), sampling, rng)
            _keep_maps(maps, probs, prompt, feats, backend)
            ids = [int(i) for i in backend.to_host(chosen)]
    finally:
        stats["decode_seconds"] = time.perf_counter() - t1


def _keep_maps(maps, probs, prompt, feats, backend):
    if maps is not None:
        maps.append(backend.to_host(image_attention(probs, prompt.image_slot, feats.shape[1])))  # [B, L, N]


def _pick(logits, sampling: Sampling, rng):  # [B, V] -> [B] ids on the device
    u = [rng.random() for _ in range(logits.shape[0])]  # host draws: a seed gives the same text on every backend
    return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, u)


def collect(steps, tokenizer, stop_ids, prompts, image_sizes, stats) -> list[GenerationResult]:
    """Run `steps` to the end: one GenerationResult per row."""
    rows = [[] for _ in prompts]
    for step in steps:
        for b, tok in enumerate(step):
            rows[b].append(tok)
    return [_result(tokenizer, stop_ids, r, stats, p, size) for r, p, size in zip(rows, prompts, image_sizes)]


def stream_text(steps, tokenizer, stop_ids, prompt, image_size, stats):
    """Yield text pieces of a one-row run as tokens arrive, then its GenerationResult as the last item."""
    row, ids, shown = [], [], ""
    for (tok,) in steps:
        row.append(tok)
        if tok in stop_ids:
            continue  # the last step: the iterator ends after it
        ids.append(tok)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back half a UTF-8 character
            yield text[len(shown):]
            shown = text
    result = _result(tokenizer, stop_ids, row, stats, prompt, image_size)
    if len(result.text) > len(shown):
        yield result.text[len(shown):]
    yield result


def _result(tokenizer, stop_ids, ids, stats, prompt, size) -> GenerationResult:
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    reason = "eos" if cut is not None else "length"
    ids = ids if cut is None else ids[:cut]
    return GenerationResult(tokenizer.decode(ids), ids, reason, prompt=prompt, image_size=size, stats=stats)


def finish_stats(stats: dict, backend, load_seconds: float) -> dict:
    """Throughput and memory, computed once the run has ended (the dict is shared by its results)."""
    stats["load_seconds"] = load_seconds
    dec = stats.get("decode_seconds", 0.0)
    stats["prefill_tokens_per_second"] = stats["prompt_tokens"] * stats["batch"] / max(stats["prefill_seconds"], 1e-9)
    stats["decode_tokens_per_second"] = max(stats["steps"] - 1, 0) * stats["batch"] / dec if dec > 0 else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    stats["peak_device_bytes"] = backend.peak_memory()
    stats["backend"] = backend.name
    return stats
