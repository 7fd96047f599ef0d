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
    g.add_argument("--attention-map", metavar="OUT.png", help="save a strip of heat maps, one per generated token: "
                   "where the decoder looked in the image when it chose that token")
    g.add_argument("--attention-layer", type=int, default=None, metavar="L",
                   help="decoder layer for --attention-map (negative counts from the end; default: the mean over layers)")
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
    if args.attention_map:
        check_output(args.attention_map, "--attention-map")
    image = load_image(args.image, exif=not args.no_exif)  # decoded, upright RGB
    model = load_model(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, exif=False, return_attention=bool(args.attention_map))  # EXIF already applied
    if args.json:
        res = model.generate(image, prompt, **kw)
        print(json.dumps(_result_json(res), ensure_ascii=False))
    else:
        res = None
        for piece in model.stream(image, prompt, **kw):
            if isinstance(piece, str):
                sys.stdout.write(piece)
                sys.stdout.flush()
            else:
                res = piece
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.draw:
        _draw(image, res, args.draw)
    if args.attention_map:
        _attention_strip(image, res, model, args.attention_layer, args.attention_map)
    print(format_stats(res.stats, model), file=sys.stderr)
    return 0


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


def _attention_strip(image, res, model, layer, out, cell=128):
    """One tile per token: the image as the model saw it (squashed square), the map upsampled over it
    (bilinear, scaled to the tile's own maximum, black -> red -> yellow -> white), the token below."""
    import numpy as np
    from PIL import Image, ImageDraw

    L = model.config.text.num_hidden_layers
    if layer is not None and not -L <= layer < L:
        raise ImageError(f"--attention-layer {layer}: the decoder has {L} layers (0..{L - 1}, or -1..-{L})")
    maps = res.attention_maps(layer)  # [tokens, gh, gw]
    base = np.asarray(image.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), np.float32) / 255.0
    strip = Image.new("RGB", (max(1, len(maps)) * cell, cell + 18), "white")
    draw = ImageDraw.Draw(strip)
    for i, (m, tok) in enumerate(zip(maps, res.token_ids)):
        v = np.asarray(Image.fromarray(m / max(float(m.max()), 1e-12)).resize((cell, cell), Image.Resampling.BILINEAR))
        v = np.clip(v, 0.0, 1.0)[..., None]
        heat = np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0.0, 1.0)
        tile = (0.45 * base + 0.55 * heat) * 255.0
        strip.paste(Image.fromarray(np.rint(tile).astype(np.uint8), "RGB"), (i * cell, 0))
        draw.text((i * cell + 3, cell + 3), model.tokenizer.decode([tok]) or repr(tok), fill="black")
    try:
        strip.save(out)
    except (OSError, ValueError) as e:
        raise ImageError(f"{out}: cannot write the attention maps ({e})") from None
    which = "the mean over layers" if layer is None else f"layer {layer}"
    print(f"drew {len(maps)} attention map(s) ({which}) into {out}", file=sys.stderr)


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


