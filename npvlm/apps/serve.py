"""`npvlm serve`: an OpenAI-compatible HTTP server (POST /v1/chat/completions) over one loaded model.

    npvlm serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--backend numpy|cupy] [--max-batch 8] [--api-key KEY]

Binds loopback by default; with --api-key every /v1 request needs `Authorization: Bearer KEY`.
Needs the `serve` extra (starlette, uvicorn).
"""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError
from .cli import add_model_args, load_model


def _positive(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _port(text: str) -> int:
    import argparse

    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}")
    return int(text)


def add_parser(sub):
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=_positive, default=32, help="requests waiting beyond those; more get 429 (default 32)")
    p.add_argument("--context", type=_positive, default=None,
                   help="tokens per request, prompt + answer (default: image tokens + 512, at most the model's positions)")
    p.add_argument("--api-key", default=os.environ.get("NPVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $NPVLM_API_KEY, else no key)")
    p.add_argument("--model-name", default="npvlm", help="the model id clients send (default npvlm)")
    p.add_argument("--max-body-bytes", type=_positive, default=16 << 20, help="largest request body (default 16 MiB)")
    p.add_argument("--max-image-pixels", type=_positive, default=16_000_000, help="largest decoded image (default 16 Mpx)")
    p.add_argument("--allow-remote-images", action="store_true", help="let image_url fetch http(s) URLs (off: SSRF)")
    return p


def build(args):
    """(app, engine) for parsed args: the model loaded, the engine made (the app starts it)."""
    try:
        from ..serve.app import make_app
        from ..serve.engine import Engine
    except ImportError as e:
        raise ConfigError(f"npvlm serve needs starlette and uvicorn (pip install 'npvlm[serve]'): {e}") from None
    model = load_model(args)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, capacity=args.context)
    app = make_app(model, engine, model_id=args.model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                   max_image_pixels=args.max_image_pixels, allow_remote_images=args.allow_remote_images)
    return app, engine


def run(args) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"npvlm serve needs starlette and uvicorn (pip install 'npvlm[serve]'): {e}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"npvlm: warning: binding {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app, engine = build(args)
    print(f"npvlm: serving {args.model_name} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, "
          f"context {engine.capacity})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
