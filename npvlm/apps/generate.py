"""`npvlm generate`: images and prompts in, the answers out (streamed for one pair, or as JSON).

    -i cat.jpg -p "caption en"                    the answer streamed to stdout as it is generated
    -i a.jpg -i photos/ -p "caption en" -p "detect cat"
                                                  every image x every prompt, run as batches; one line each,
                                                  `IMAGE [PROMPT]: answer`
    --json                                        one object (one pair) or a list of objects (several)

Ctrl-C stops the generation: the text so far is kept (finish_reason "interrupted"), the stats line is
printed, and the exit status is 130.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import warnings

from ..errors import GenerationError, ImageError
from .cli import Once, add_model_args, add_sampling_args, argv_text, check_output, format_stats, load_model


def add_parser(sub):
    g = sub.add_parser("generate", help="generate text for images and prompts")
    add_model_args(g)
    g.add_argument("--image", "-i", required=True, action="append",
                   help="image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM) or a folder of them; repeatable")
    g.add_argument("--prompt", "-p", action="append", default=None,
                   help='task prompt, e.g. "caption en", "detect cat" (default: caption en); repeatable')
    add_sampling_args(g)
    g.add_argument("--batch-size", type=int, default=8, action=Once, help="(image, prompt) pairs per batch (default 8)")
    g.add_argument("--json", action="store_true", help="print JSON (text, token ids, boxes, stats) instead of streaming")
    g.add_argument("--draw", metavar="OUT.png", action=Once, help="draw the detected boxes onto the image and save it here")
    g.add_argument("--attention-map", metavar="OUT.png", action=Once,
                   help="save a strip of heat maps, one per generated token: where the decoder looked in the image "
                        "when it chose that token (one image and one prompt)")
    g.add_argument("--attention-layer", type=int, default=None, metavar="L", action=Once,
                   help="decoder layer for --attention-map (negative counts from the end; default: the mean over layers)")
    g.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation tag")
    return g


def image_paths(items) -> list[str]:
    """--image values: files as given, folders replaced by their image files (sorted by name)."""
    from PIL import Image

    exts = set(Image.registered_extensions())
    out = []
    for item in items:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if os.path.splitext(n)[1].lower() in exts and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise ImageError(f"{item}: is a directory with no image files in it")
            out += found
        else:
            out.append(path)
    return out


def run(args) -> int:
    from ..generation.generate import Sampling
    from ..io.images import load_image

    # everything that can be checked without the model is checked before loading it (which may take minutes)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    if args.seed is not None and args.temperature == 0:
        warnings.warn("--seed has no effect without --temperature > 0: greedy decoding ignores it")
    if args.batch_size < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = [argv_text(p, "--prompt") for p in (args.prompt or ["caption en"])]
    paths = image_paths(args.image)
    if args.draw:
        if len(paths) > 1:
            raise ImageError(f"{args.draw}: --draw takes one image, got {len(paths)}; run one command per image")
        check_output(args.draw, "--draw")
    if args.attention_map:
        check_output(args.attention_map, "--attention-map")
    images = [load_image(p, exif=not args.no_exif) for p in paths]  # decoded, upright RGB
    if args.attention_map and (len(images) > 1 or len(prompts) > 1):
        raise GenerationError("--attention-map takes one image and one prompt")
    model = load_model(args)
    pairs = [(i, p) for i in range(len(images)) for p in prompts]
    stream = len(pairs) == 1 and not args.json
    results, stats, interrupted = [], None, False
    for k in range(0, len(pairs), args.batch_size):
        chunk = pairs[k:k + args.batch_size]
        res, stats, interrupted = run_batch(model, [images[i] for i, _ in chunk], [p for _, p in chunk], sampling,
                                            stream=stream)
        results += [(paths[i], r) for (i, _), r in zip(chunk, res)]
        last = res
        if interrupted:
            break
    if args.json:
        items = [dict(image=path, **_result_json(r)) for path, r in results]
        OUT.write(json.dumps(items[0] if len(pairs) == 1 else items, ensure_ascii=False) + "\n")
    elif not stream:
        for path, r in results:
            OUT.write(f"{path} [{r.prompt}]: {r.text}\n")
    sys.stdout.flush()
    if args.draw and results:
        _draw(images[0], [d for _, r in results for d in r.detections], args.draw)
    if args.attention_map and results and not interrupted:
        # the maps are asked for on a second, identical run, so the answer above costs what it costs without them
        kw = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                  top_k=sampling.top_k, seed=sampling.seed, exif=False)
        _attention_strip(images[0], model.generate(images[0], prompts[0], return_attention=True, **kw), model,
                         args.attention_layer, args.attention_map)
    if stats is not None:
        batches = -(-len(results) // args.batch_size)
        print((f"{batches} batches; the last: " if batches > 1 else "")
              + format_stats(stats, model, generated=sum(len(r.token_ids) for r in last)), file=sys.stderr)
    if interrupted:
        print(f"npvlm: interrupted after {len(results)} of {len(pairs)} answer(s)", file=sys.stderr)
        return 130
    return 0


def run_batch(model, images, prompts, sampling, *, stream=False):
    """Generate for one batch: (results, stats, interrupted). With `stream` (one pair), text goes to stdout as
    it comes. On Ctrl-C the tokens generated so far become the results, finish_reason "interrupted"; an
    interrupt before the prefill has finished propagates (there is nothing to report)."""
    from ..generation.generate import collect, finish_stats, stream_text

    steps, stats = model._run(images, prompts, sampling, False)  # EXIF already applied
    rows, interrupted, ended, wrote = [], False, False, False

    def recorded():
        for step in steps:
            rows.append(step)
            yield step

    try:
        if stream:
            for piece in stream_text(recorded(), model.tokenizer, model.stop_ids, prompts[0], stats["image_sizes"][0], stats):
                if isinstance(piece, str) and piece:
                    OUT.write(piece)
                    wrote = True
        else:
            for _ in recorded():
                pass
        ended = True
    except KeyboardInterrupt:
        interrupted = True
        steps.close()  # the decode time is recorded on the way out
        if "prompt_tokens" not in stats:
            raise
        ended = True
    finally:
        if stream and (ended or wrote):  # the text so far ends with a newline, interrupted or not; a first step
            OUT.write("\n")             # that failed (NaN weights) wrote nothing, and adds nothing to stdout
    results = collect(iter(rows), model.tokenizer, model.stop_ids, prompts, stats["image_sizes"], stats)
    if interrupted:
        for r in results:
            if r.finish_reason == "length":
                r.finish_reason = "interrupted"
    return results, finish_stats(stats, model.backend, model.load_seconds), interrupted


class _Console:
    """Writes to a stream whose encoding may not show the text (PYTHONIOENCODING=cp1252 and a CJK answer):
    what it cannot encode becomes '?', with one warning on stderr the first time."""

    def __init__(self, stream):
        self.stream, self.warned = stream, False

    def write(self, text: str) -> None:
        with _no_interrupt():  # a Ctrl-C during the write lands after it: the output is never torn
            self._write(text)

    def _write(self, text: str) -> None:
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


@contextlib.contextmanager
def _no_interrupt():
    """SIGINT held back for the duration (delivered on exit, as a KeyboardInterrupt after the block)."""
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if main_thread:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _Stdout:  # sys.stdout as it is at the time of the write (tests and the CLI may replace it)
    def __getattr__(self, name):
        return getattr(sys.stdout, name)


OUT = _Console(_Stdout())


def _result_json(res):
    return {"prompt": res.prompt, "text": res.text, "token_ids": [int(t) for t in res.token_ids],
            "finish_reason": res.finish_reason,
            "detections": [{"label": d.label, "box": [round(float(c), 1) for c in d.box]} for d in res.detections],
            "segments": [{"label": s.label, "box": [round(float(c), 1) for c in s.box], "codes": list(s.codes)}
                         for s in res.segments],
            "stats": {k: v for k, v in res.stats.items() if k != "image_sizes"}}


def _draw(image, detections, out):
    from ..postprocess import draw_detections

    img = draw_detections(image, detections)
    try:
        img.save(out)
    except (OSError, ValueError) as e:
        raise ImageError(f"{out}: cannot write the drawn image ({e})") from None
    print(f"drew {len(detections)} box(es) into {out}", file=sys.stderr)


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
