"""`npvlm generate`: one image and a prompt in, the answer streamed to stdout (or one JSON object)."""

from __future__ import annotations

import json
import sys

from ..errors import ImageError
from .cli import add_model_args, add_sampling_args, argv_text, check_output, format_stats, load_model


def add_parser(sub):
    g = sub.add_parser("generate", help="generate text for an image and a prompt")
    add_model_args(g)
    g.add_argument("--image", "-i", required=True, help="image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM)")
    g.add_argument("--prompt", "-p", default="caption en", help='task prompt, e.g. "caption en", "detect cat" (default: caption en)')
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, boxes, stats) instead of streaming")
    g.add_argument("--draw", metavar="OUT.png", help="draw the detected boxes onto the image and save it here")
    g.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation tag")
    return g


def run(args) -> int:
    from ..generation.sampling import check_params
    from ..io.images import load_image

    # everything that can be checked without the model is checked before loading it (which may take minutes)
    check_params(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    prompt = argv_text(args.prompt, "--prompt")
    if args.draw:
        check_output(args.draw, "--draw")
    image = load_image(args.image, exif=not args.no_exif)  # decoded, upright RGB
    model = load_model(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, exif=False)  # EXIF already applied
    out = _Console(sys.stdout)
    if args.json:
        res = model.generate(image, prompt, **kw)
        out.write(json.dumps(_result_json(res), ensure_ascii=False) + "\n")
    else:
        res = None
        for piece in model.stream(image, prompt, **kw):
            if isinstance(piece, str):
                out.write(piece)
            else:
                res = piece
        out.write("\n")
    if args.draw:
        _draw(image, res, args.draw)
    print(format_stats(res.stats, model), file=sys.stderr)
    return 0


class _Console:
    """Writes to a stream whose encoding may not show the text (PYTHONIOENCODING=cp1252 and a CJK answer):
    what it cannot encode becomes '?', with one warning on stderr the first time."""

    def __init__(self, stream):
        self.stream, self.warned = stream, False

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError as e:
            enc = getattr(self.stream, "encoding", None) or "ascii"
            if not self.warned:
                self.warned = True
                print(f"npvlm: warning: stdout's encoding {enc} cannot show {e.object[e.start:e.end]!r}; such "
                      f"characters are written as '?' (set PYTHONIOENCODING=utf-8)", file=sys.stderr)
            self.stream.write(text.encode(enc, "replace").decode(enc))
        self.stream.flush()


def _result_json(res):
    return {"prompt": res.prompt, "text": res.text, "token_ids": [int(t) for t in res.token_ids],
            "finish_reason": res.finish_reason,
            "detections": [{"label": d.label, "box": [round(float(c), 1) for c in d.box]} for d in res.detections],
            "stats": {k: v for k, v in res.stats.items() if k != "image_sizes"}}


def _draw(image, res, out):
    from ..postprocess import draw_detections

    img = draw_detections(image, res.detections)
    try:
        img.save(out)
    except (OSError, ValueError) as e:
        raise ImageError(f"{out}: cannot write the drawn image ({e})") from None
    print(f"drew {len(res.detections)} box(es) into {out}", file=sys.stderr)


def format_stats(st, model) -> str:
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    dev = f", device peak {mb(st['peak_device_bytes'])}" if st.get("peak_device_bytes") else ""
    return (f"load {st['load_seconds']:.2f} s | image encode {st['image_seconds'] * 1e3:.0f} ms | "
            f"prefill {st['prompt_tokens']} tokens {st['prefill_seconds']:.2f} s ({st['prefill_tokens_per_second']:.0f} tok/s) | "
            f"decode {st['new_tokens']} tokens ({st['decode_tokens_per_second']:.1f} tok/s) | "
            f"peak RSS {mb(st['peak_rss_bytes'])}{dev} | backend {st['backend']}{_blas_info(model)}")


def _blas_info(model) -> str:
    if model.backend.name != "numpy":
        return ""
    try:
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        return f" ({blas[0]['internal_api']}, {blas[0]['num_threads']} threads)" if blas else ""
    except Exception:  # noqa: BLE001 - informational only
        return ""


