"""The OpenAI-compatible HTTP API of `npvlm serve` (Starlette): routes, request checks, JSON errors.

    POST /v1/chat/completions   one image (a data: URL) + the PaliGemma prompt text -> the answer
                                (stream: true -> server-sent chat.completion.chunk events, then [DONE])
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", running, waiting, ...}

Every bad request is a JSON error `{"error": {"message", "type", "param", "code"}}` with a 4xx status
naming the problem; the server keeps answering. The generation itself runs in the Engine thread
(npvlm/serve/engine.py); handlers wait on an asyncio.Queue it fills with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import re
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import NpvlmError
from .engine import QueueFull, Request
from .requests import ApiError, parse_chat_request


def _error(status, message, param=None, code=None, headers=None):
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


def make_app(model, engine, *, model_id: str = "npvlm", api_key: str | None = None, max_body_bytes: int = 16 << 20,
             max_image_pixels: int = 16_000_000, allow_remote_images: bool = False, default_max_tokens: int = 128,
             retry_after: int = 1) -> Starlette:
    """The ASGI app over a loaded PaliGemmaModel and its Engine (started and stopped with the app)."""

    def check_auth(request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        want = f"Bearer {api_key}"
        if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), want.encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    async def read_json(request):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {max_body_bytes} bytes")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:120]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def image_bytes(url: str) -> bytes:
        if url.startswith(("http://", "https://")):
            if not allow_remote_images:
                raise ApiError(400, "remote image URLs are refused (start the server with --allow-remote-images); "
                                    "send the image inline as a data:image/...;base64 URL", param="image_url")
            return _fetch(url, max_body_bytes)
        m = _DATA_URL.match(url)
        if not m:
            raise ApiError(400, "image_url.url must be a data:image/...;base64,... URL", param="image_url")
        if not (m.group("mime") or "").startswith("image/"):
            raise ApiError(400, f"image_url data URL has media type {m.group('mime') or '(none)'!r}, not image/*",
                           param="image_url")
        if not m.group("b64"):
            raise ApiError(400, "image_url data URL must be base64-encoded (data:image/png;base64,...)", param="image_url")
        try:
            return base64.b64decode(url[m.end():], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_url data URL holds invalid base64", param="image_url") from None

    def decode_image(data: bytes):
        from PIL import Image

        from ..io.images import load_image

        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                w, h = probe.size
        except Exception as e:
            raise ApiError(400, f"image_url does not hold a readable image ({type(e).__name__})", param="image_url") from None
        if w * h > max_image_pixels:
            raise ApiError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_image_pixels}",
                           param="image_url")
        try:
            return load_image(data)
        except NpvlmError as e:
            raise ApiError(400, f"image_url: {e}", param="image_url") from None
        except Exception as e:
            raise ApiError(400, f"image_url does not hold a readable image ({type(e).__name__})", param="image_url") from None

    def prepare(prompt, url, opts):  # runs in a worker thread: image decoding and tokenizing
        from ..models.paligemma_inputs import prepare_prompts

        rgb = decode_image(image_bytes(url))
        try:
            batch = prepare_prompts(model.tokenizer, model.config, model.backend, [prompt])
        except NpvlmError as e:
            raise ApiError(400, str(e), param="messages") from None
        T = batch.ids.shape[1]
        room = engine.capacity - T
        if room < 1:
            raise ApiError(400, f"prompt of {T} tokens leaves no room in the server's context of {engine.capacity}",
                           param="messages")
        n = opts["max_new_tokens"] if opts["max_new_tokens"] is not None else min(default_max_tokens, room)
        if n > room:
            raise ApiError(400, f"prompt of {T} tokens plus max_tokens {n} exceeds the server's context of "
                                f"{engine.capacity} tokens (at most {room} here)", param="max_tokens")
        return Request(batch, rgb, n, opts["temperature"], opts["top_p"], opts["top_k"], opts["seed"], opts["stop"],
                       attention=opts["attention"])

    async def chat(request):
        check_auth(request)
        prompt, url, opts, stream, include_usage = parse_chat_request(await read_json(request), model_id)
        req = await run_in_threadpool(prepare, prompt, url, opts)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req.emit = lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry after {retry_after} s", code="queue_full",
                           headers={"Retry-After": str(retry_after)}) from None
        except NpvlmError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        size = req.rgb.size
        try:
            first = await events.get()
        except BaseException:
            req.cancelled = True
            raise
        if first["type"] == "error":
            return _error(first["status"], first["message"])
        if not stream:
            return await answer(req, events, first, cid, created, size)
        return StreamingResponse(sse(req, events, first, cid, created, size, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def answer(req, events, e, cid, created, size):
        try:
            while e["type"] == "delta":
                e = await events.get()
        finally:
            req.cancelled = e["type"] == "delta"  # the client went away before the end
        if e["type"] == "error":
            return _error(e["status"], e["message"])
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": e["text"]},
                         "finish_reason": e["finish_reason"], "logprobs": None}],
            "usage": _usage(e), "detections": _detections(e["text"], size), "image_size": list(size),
            **extension(req, e)})

    async def sse(req, events, e, cid, created, size, include_usage):
        def chunk(delta, finish=None, **extra):
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if e["type"] == "delta":
                    yield chunk({"content": e["text"]})
                elif e["type"] == "error":
                    yield _sse({"error": {"message": e["message"], "type": "server_error", "param": None, "code": None}})
                    break
                else:
                    yield chunk({}, e["finish_reason"], detections=_detections(e["text"], size), image_size=list(size),
                                **extension(req, e))
                    if include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model_id, "choices": [], "usage": _usage(e)})
                    break
                e = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = e["type"] == "delta"  # a disconnect cancels this generator mid-stream: free the row

    def extension(req, e):  # {"npvlm": {"attention": ...}} when the request asked for the maps, else nothing
        if not req.attention:
            return {}
        v = model.config.vision
        side = v.image_size // v.patch_size
        return {"npvlm": {"attention": {
            "grid": [side, side], "layers": model.config.text.num_hidden_layers,
            "tokens": [model.tokenizer.decode([t]) for t in e["token_ids"]],
            "maps": [[[round(float(x), 6) for x in layer] for layer in m] for m in e["maps"]]}}}  # [tokens][L][N]

    async def models(request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "npvlm"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, **engine.load()})

    async def index(request):
        from starlette.responses import HTMLResponse

        page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
        if not os.path.isfile(page):
            raise ApiError(404, "no page here; the API is under /v1")
        with open(page, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    async def on_api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    async def on_http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    async def on_any_error(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}")

    from contextlib import asynccontextmanager

    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        if not engine.thread.is_alive():
            engine.start()
        yield
        engine.stop()

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/", index, methods=["GET"])]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_any_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(e):
    return {"prompt_tokens": e["prompt_tokens"], "completion_tokens": e["completion_tokens"],
            "total_tokens": e["prompt_tokens"] + e["completion_tokens"]}


def _detections(text, size):
    from ..postprocess import parse_detections

    return [{"label": d.label, "box": [round(float(c), 2) for c in d.box]} for d in parse_detections(text, *size)]


def _fetch(url: str, limit: int) -> bytes:
    """GET a remote image (only with --allow-remote-images), at most `limit` bytes, 10 s, no redirects."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as r:
            if r.status_code != 200:
                raise ApiError(400, f"image URL answered HTTP {r.status_code}", param="image_url")
            data = b""
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, f"remote image exceeds {limit} bytes", param="image_url")
            return data
    except httpx.HTTPError as e:
        raise ApiError(400, f"image URL could not be fetched: {type(e).__name__}", param="image_url") from None
