"""Throughput of `npvlm serve`: requests/s and time to first token at 1, 4, 8 concurrent clients.

    PYTHONPATH=. python -m tools.bench_serve [--model DIR] [--backend numpy] [--requests 32] [--max-tokens 32]

Starts the real server (uvicorn, 127.0.0.1, a free port) in this process, then each client streams
chat completions for synthetic scenes (npvlm.demo.scenes) back to back; prints one line per level.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn

import npvlm
from npvlm.demo.scenes import make_scene
from npvlm.serve.app import make_app
from npvlm.serve.engine import Engine

PROMPTS = ["caption en", "detect circle", "detect square ; triangle", "answer en how many shapes?"]


def _url(seed):
    buf = io.BytesIO()
    make_scene(seed).image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _one(base, seed, max_tokens):  # -> (seconds to first text, seconds in all, completion tokens)
    body = {"model": "npvlm", "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[seed % len(PROMPTS)]},
                                                      {"type": "image_url", "image_url": {"url": _url(seed)}}]}]}
    t0, first, n = time.perf_counter(), None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                n = msg["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in msg["choices"]):
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,4,8")
    a = ap.parse_args(argv)
    model = npvlm.load(a.model, backend=a.backend)
    levels = [int(x) for x in a.levels.split(",")]
    engine = Engine(model, max_batch=max(levels), max_queue=4 * max(levels))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(model, engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    _one(base, 0, a.max_tokens)  # warm up
    print(f"{model!r}, backend {a.backend}, {a.requests} requests per level, max_tokens {a.max_tokens}")
    for c in levels:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(c) as pool:
            res = list(pool.map(lambda i: _one(base, i, a.max_tokens), range(a.requests)))
        wall = time.perf_counter() - t0
        ttft = sorted(r[0] for r in res)
        toks = sum(r[2] for r in res)
        print(f"clients {c}: {a.requests / wall:6.1f} req/s, {toks / wall:7.1f} tokens/s, time to first token "
              f"median {statistics.median(ttft) * 1e3:6.1f} ms, p90 {ttft[int(0.9 * (len(ttft) - 1))] * 1e3:6.1f} ms, "
              f"peak batch {engine.load()['peak_running']}")
    server.should_exit = True
    thread.join(timeout=15)


if __name__ == "__main__":
    main()
