"""The batching engine behind `npvlm serve`: continuous batching over the model's fixed-shape decode step.

One background thread owns the model. It keeps a running batch of `max_batch` rows in one KV cache of
`capacity` columns (DecodeState in npvlm/models/paligemma.py: fixed shapes, one column per row):

    admit:  a waiting request is prefilled alone (batch of 1, its own cache of T columns), its first
            token sampled, and its columns 0..T-1 copied into a free row of the running cache
    step:   one decode_step over all rows; each busy row samples its own next token with its own
            settings and its own random.Random(seed), exactly as `PaliGemmaModel.generate` does alone
    free:   a row that met a stop id, a stop string, its budget, or whose client went away

A request's prompt is one unpadded row, so its key_valid row is all True: a step sees the columns up to
its own (older occupants' columns beyond it are masked and overwritten as it advances).
Events go back to the asyncio side through `loop.call_soon_threadsafe(queue.put_nowait, event)`.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

from ..errors import CheckpointError, NpvlmError
from ..generation.sampling import sample
from ..io.scan import check_finite, checked_step
from ..kv_cache import KVCache
from ..models.paligemma import DecodeState, decode_step, image_attention, prefill


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 429)."""


@dataclass
class Request:
    """One chat completion, from admission to its last event. `emit(event)` is called on the engine thread."""

    batch: object  # PromptBatch of one row (npvlm.models.paligemma_inputs.prepare_prompts)
    rgb: object  # upright RGB PIL image
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple = ()
    emit: object = None  # callable(event: dict)
    cancelled: bool = False  # set by the client side; the row is freed at the next step
    attention: bool = False  # also send the attention maps (the "done" event's "attention": [tokens][L][N])
    # engine bookkeeping
    rng: object = None
    tokens: list = field(default_factory=list)
    shown: str = ""
    maps: list = field(default_factory=list)  # with attention: host [L, N] per token, as in generate()
    feed: tuple = (0, 1, 0)  # (id, position, column) the next decode step feeds
    t_submit: float = 0.0


class Engine:
    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 32, capacity: int | None = None):
        cfg = model.config
        self.model, self.cfg, self.backend = model, cfg, model.backend
        self.max_batch, self.max_queue = max_batch, max_queue
        limit = cfg.text.max_position_embeddings
        self.capacity = min(limit, capacity or cfg.num_image_tokens + 512)  # columns per row of the running cache
        t = cfg.text
        like = model.params["language_model"]["model"]["norm"]["weight"]  # float32 on the device (embed_tokens may be packed)
        self.cache = KVCache(like, t.num_hidden_layers, max_batch, t.num_key_value_heads, self.capacity, t.head_dim)
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting = collections.deque()
        self.lock = threading.Condition()
        self.running = threading.Event()  # cleared by pause(): admission and decoding wait (tests use it)
        self.running.set()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="npvlm-engine", daemon=True)
        self.completed = 0
        self.dropped = 0  # rows freed because their client went away
        self.peak_running = 0  # the most rows decoded together so far

    # -- the client side -------------------------------------------------------------------------
    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.lock:
            self.stopped = True
            self.running.set()
            self.lock.notify_all()
        self.thread.join(timeout=10)

    def pause(self):
        """Hold admission and decoding (after the step under way) until resume()."""
        with self.lock:
            self.running.clear()

    def resume(self):
        with self.lock:
            self.running.set()
            self.lock.notify_all()

    def submit(self, req: Request):
        """Queue `req`, or raise QueueFull when `max_queue` requests are already waiting."""
        T = req.batch.ids.shape[1]
        if T + req.max_new_tokens > self.capacity:
            raise NpvlmError(f"prompt of {T} tokens plus max_tokens {req.max_new_tokens} = {T + req.max_new_tokens} "
                             f"exceeds the server's context of {self.capacity} tokens")
        req.rng, req.t_submit = random.Random(req.seed), time.perf_counter()
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")
            self.waiting.append(req)
            self.lock.notify_all()

    def load(self) -> dict:
        with self.lock:
            return {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "completed": self.completed, "dropped": self.dropped,
                    "peak_running": self.peak_running}

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.lock:
                while not self.stopped and (not self.running.is_set()
                                            or (not self.waiting and all(r is None for r in self.rows))):
                    self.lock.wait()
                if self.stopped:
                    break
                admit = []
                free = [i for i, r in enumerate(self.rows) if r is None]
                while free and self.waiting:
                    req = self.waiting.popleft()
                    if not req.cancelled:
                        admit.append((free.pop(0), req))
            for row, req in admit:
                self._guard(req, row, self._admit)
            if any(r is not None for r in self.rows):
                try:
                    self._step()
                except Exception as e:  # a device failure: end every running request with an error, keep serving
                    for i, r in enumerate(self.rows):
                        if r is not None:
                            self._finish(i, r, None, error=f"generation failed: {type(e).__name__}: {e}")
        for i, r in enumerate(self.rows):
            if r is not None:
                self._finish(i, r, None, error="the server is shutting down")
        for r in self.waiting:
            r.emit({"type": "error", "status": 503, "message": "the server is shutting down"})

    def _guard(self, req, row, fn):
        try:
            fn(row, req)
        except CheckpointError as e:  # the served model's own files are broken: the server's fault, not the request's
            self._finish(row, req, None, error=str(e), status=500)
        except NpvlmError as e:
            self._finish(row, req, None, error=str(e), status=400)
        except Exception as e:
            self._finish(row, req, None, error=f"generation failed: {type(e).__name__}: {e}")

    def _admit(self, row: int, req: Request):
        m, cfg = self.model, self.cfg
        t0 = time.perf_counter()
        T = req.batch.ids.shape[1]
        t = cfg.text
        own = KVCache(self.cache.k[0], t.num_hidden_layers, 1, t.num_key_value_heads, T, t.head_dim)
        probs = [] if req.attention else None
        with checked_step():  # the check reports what numpy would only warn about
            feats = m.encode_images([req.rgb])  # [1, N, D]
            logits, _ = prefill(m.params, req.batch, feats, own, cfg=cfg, probs_out=probs)  # [1, V]
            check_finite(logits, m.not_finite("the first step's logits"))  # NaN / Inf weights: a 500 naming the tensor
        amap = None if probs is None else self.backend.to_host(image_attention(probs, req.batch.image_slot,
                                                                               feats.shape[1]))[0]  # [L, N]
        tok = int(self.backend.to_host(self._pick(logits, [req]))[0])
        for layer in range(t.num_hidden_layers):  # its columns 0..T-1 into row `row` of the running cache
            self.cache.k[layer][row:row + 1, :, :T, :] = own.k[layer]
            self.cache.v[layer][row:row + 1, :, :T, :] = own.v[layer]
        last_pos = int(req.batch.host["positions"][0][-1])
        req.feed = (tok, last_pos + 1, T)  # the first generated token goes to column T
        req.prompt_tokens, req.ttft = T, time.perf_counter() - req.t_submit
        req.prefill_seconds = time.perf_counter() - t0
        with self.lock:
            self.rows[row] = req
            self.peak_running = max(self.peak_running, sum(r is not None for r in self.rows))
        self._take(row, req, tok, amap)

    def _pick(self, logits, reqs):  # [B, V] device logits -> [B] device ids; one row at a time unless all greedy
        xp = self.backend.xp
        if all(r is None or r.temperature == 0.0 for r in reqs):
            return xp.argmax(logits, axis=-1)
        out = []
        for b, r in enumerate(reqs):
            if r is None or r.temperature == 0.0:
                out.append(xp.argmax(logits[b:b + 1, :], axis=-1))
            else:
                out.append(sample(logits[b:b + 1, :], r.temperature, r.top_k, r.top_p, [r.rng.random()]))
        return xp.concat(out, axis=0)

    def _step(self):
        xp, B, C = self.backend.xp, self.max_batch, self.capacity
        rows = list(self.rows)
        feeds = [r.feed if r is not None else (self.cfg.pad_token_id, 1, 0) for r in rows]  # a free row idles at col 0
        state = DecodeState(self.cache, ids=xp.asarray([[f[0]] for f in feeds], dtype=xp.int64),
                            positions=xp.asarray([[f[1]] for f in feeds], dtype=xp.int64),
                            cols=xp.asarray([f[2] for f in feeds], dtype=xp.int64),
                            key_valid=xp.ones((B, C), dtype=xp.bool))
        probs = [] if any(r is not None and r.attention for r in rows) else None
        with self.backend.decoding():  # the backend's thread plan for a decode step (numpy: one BLAS thread)
            logits = decode_step(self.model.params, state, cfg=self.cfg, probs_out=probs)  # [B, V]
        maps = None if probs is None else self.backend.to_host(self._image_maps(probs))  # [B, L, N]
        ids = [int(i) for i in self.backend.to_host(self._pick(logits, rows))]
        for b, r in enumerate(rows):
            if r is not None:
                _, pos, col = r.feed
                r.feed = (ids[b], pos + 1, col + 1)
                self._take(b, r, ids[b], maps[b] if maps is not None and r.attention else None)

    def _image_maps(self, probs):  # every row's prompt is unpadded: its N image tokens sit in columns 0..N-1
        xp, N = self.backend.xp, self.cfg.num_image_tokens
        slots = xp.broadcast_to(xp.reshape(xp.arange(N, dtype=xp.int64), (1, N)), (self.max_batch, N))
        return image_attention(probs, slots, N)

    def _take(self, row: int, req: Request, tok: int, amap=None):
        """Account one sampled token of `req` (and its attention map): emit the new text, or finish the row."""
        if req.cancelled:
            return self._finish(row, req, None, emit=False)
        m = self.model
        if tok in m.stop_ids:
            return self._finish(row, req, "stop", eos=True)
        req.tokens.append(tok)
        if amap is not None:
            req.maps.append(amap)
        text = m.tokenizer.decode(req.tokens)
        for s in req.stop:
            k = text.find(s)
            if k >= 0:
                req.final_text = text[:k]
                return self._finish(row, req, "stop")
        if len(req.tokens) >= req.max_new_tokens:
            req.final_text = text
            return self._finish(row, req, "length")
        hold = max((len(s) - 1 for s in req.stop), default=0)  # a stop string may be starting
        if not text.endswith("\ufffd") and len(text) - hold > len(req.shown):  # hold back half a UTF-8 character
            safe = text[:len(text) - hold]
            req.emit({"type": "delta", "text": safe[len(req.shown):]})
            req.shown = safe

    def _finish(self, row, req, reason, *, eos=False, error=None, status=500, emit=True):
        with self.lock:
            if row is not None and self.rows[row] is req:
                self.rows[row] = None
            if not emit:
                self.dropped += 1
                return
            self.completed += error is None
        if error is not None:
            return req.emit({"type": "error", "status": status, "message": error})
        text = getattr(req, "final_text", None)
        if text is None:
            text = self.model.tokenizer.decode(req.tokens)
        if len(text) > len(req.shown) and text.startswith(req.shown):
            req.emit({"type": "delta", "text": text[len(req.shown):]})
        req.emit({"type": "done", "text": text, "finish_reason": reason, "prompt_tokens": req.prompt_tokens,
                  "completion_tokens": len(req.tokens) + eos, "token_ids": list(req.tokens),
                  "maps": req.maps[:len(req.tokens)]})
