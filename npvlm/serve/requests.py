"""Reading an OpenAI chat-completions request: every field checked, one 4xx ApiError naming the first problem."""

from __future__ import annotations

import math

from ..errors import show


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers



def parse_chat_request(body, model_id: str):
    """The body -> (prompt text, image url, request settings), each checked."""
    if body.get("model") is not None and body["model"] != model_id:
        raise ApiError(404, f"model {_show(body['model'])} is not served here; this server has {model_id!r}",
                       param="model", code="model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    texts, urls = [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] must be an object with a role system, user or assistant",
                           param="messages")
        if msg["role"] != "user":
            continue
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), str):
                urls.append(part["image_url"])  # some clients send the URL itself
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                    and isinstance(part["image_url"].get("url"), str):
                urls.append(part["image_url"]["url"])
            else:
                raise ApiError(400, f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image_url', 'image_url': {'url': ...}}", param="messages")
    if len(urls) != 1:
        raise ApiError(400, f"a request needs exactly one image (an image_url part), got {len(urls)}",
                       param="messages")
    prompt = " ".join(t.strip() for t in texts if t.strip())
    if not prompt:
        raise ApiError(400, "no prompt text: give a text part such as 'caption en' or 'detect cat'", param="messages")
    opts = {"max_new_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": ()}
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v < 1:
                raise ApiError(400, f"{name} must be an integer >= 1, got {_show(v)}", param=name)
            opts["max_new_tokens"] = v
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = body.get(name)
        if v is not None:
            if not _is_real(v) or not lo <= v <= hi or (name == "top_p" and v == 0):
                raise ApiError(400, f"{name} must be a number in {'(' if name == 'top_p' else '['}{lo}, {hi}], "
                                    f"got {_show(v)}", param=name)
            opts[name] = float(v)
    for name in ("seed", "top_k"):
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v < 0:
                raise ApiError(400, f"{name} must be a non-negative integer, got {_show(v)}", param=name)
            opts[name] = v
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a non-empty string or a list of at most 4", param="stop")
        opts["stop"] = tuple(stop)
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n must be 1 (one answer per request), got {_show(body.get('n'))}", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_show(stream)}", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be {'include_usage': true|false}", param="stream_options")
    ext = body.get("npvlm") or {}  # npvlm's own options, in a field OpenAI clients never send
    if not isinstance(ext, dict) or set(ext) - {"attention"} or not isinstance(ext.get("attention", False), bool):
        raise ApiError(400, "npvlm must be {'attention': true|false}", param="npvlm")
    opts["attention"] = ext.get("attention", False)
    return prompt, urls[0], opts, stream, so.get("include_usage", False)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v, limit=40):
    return show(v, limit)


