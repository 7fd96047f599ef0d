"""The `npvlm` command.

    npvlm demo                                   make a scene, caption it, answer, detect, draw
    npvlm generate --image cat.jpg --prompt "caption en" [--model DIR] [--backend numpy|cupy]
    npvlm info --model DIR                       config, parameter counts, memory; loads no weights

Text goes to stdout as it is generated; timings, progress and warnings go to stderr. Every
error in the input is one line `npvlm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from .errors import ImageError, NpvlmError, TokenizerError


def _progress_printer(stream=sys.stderr, min_bytes=64 << 20):
    """A progress callback for load(): a one-line bar on stderr for checkpoints of 64 MiB or more."""
    state = {"t0": time.perf_counter(), "last": 0.0}

    def progress(done, total, name):
        if total < min_bytes:
            return
        now = time.perf_counter()
        if done < total and now - state["last"] < 0.2:
            return
        state["last"] = now
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        stream.write(f"\rloading {os.path.basename(name):<34.34} [{bar:<30}] {frac:4.0%} "
                     f"{done / 1e9:.2f}/{total / 1e9:.2f} GB {now - state['t0']:.0f}s")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return progress


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit status 2)."""

    def error(self, message):
        self.exit(2, f"npvlm: error: {message} (see `{self.prog} --help`)\n")


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _add_model_args(p):
    p.add_argument("--model", "-m", metavar="DIR", default=None,
                   help="HF PaliGemma model folder (config.json, *.safetensors, tokenizer); default: the embedded shapes model")
    p.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (CUDA GPU); default numpy")
    p.add_argument("--threads", type=_threads, default=None, help="BLAS threads on the CPU (default: the library's own)")


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="npvlm", description="PaliGemma in NumPy: image + prompt in, text out.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for an image and a prompt")
    _add_model_args(g)
    g.add_argument("--image", "-i", required=True, help="image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM)")
    g.add_argument("--prompt", "-p", default="caption en", help='task prompt, e.g. "caption en", "detect cat" (default: caption en)')
    _add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, boxes, stats) instead of streaming")
    g.add_argument("--draw", metavar="OUT.png", help="draw the detected boxes onto the image and save it here")
    g.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation tag")

    i = sub.add_parser("info", help="describe a model folder without loading its weights")
    i.add_argument("--model", "-m", metavar="DIR", default=None, help="model folder (default: the embedded shapes model)")
    i.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("demo", help="run the embedded shapes model on a synthetic scene")
    _add_model_args(d)
    d.add_argument("--seed", type=int, default=7, help="which scene to make (default 7)")
    d.add_argument("--out", default=None, help="where to write the picture with boxes (default: a temp file)")
    return ap


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"npvlm: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display on the way out
            warnings.showwarning = _warn_one_line
            return {"generate": cmd_generate, "info": cmd_info, "demo": cmd_demo}[args.command](args)
    except NpvlmError as e:
        print(f"npvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npvlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `npvlm generate ... | head -c 10`
        return 0


def _load(args):
    from . import load

    from .backends import get_backend

    backend = get_backend(args.backend)
    if args.threads is not None:
        backend.set_threads(args.threads)
    return load(args.model, backend=backend, progress=_progress_printer())


def _argv_text(text: str, flag: str) -> str:
    """A command-line string as UTF-8 text. Python decodes argv with surrogateescape, so bytes that are not
    UTF-8 arrive as lone surrogates: turn them back into bytes and say which one, at which byte offset."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{flag} is not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at offset {e.start})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{flag} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _check_output(path: str, flag: str) -> None:
    """Refuse an image output path that cannot be written, before any work is done."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ImageError(f"{path}: {flag} names a directory, not an image file")
    if not os.path.isdir(folder):
        raise ImageError(f"{path}: {flag}: the folder {folder} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise ImageError(f"{path}: {flag}: unknown image file extension {ext or '(none)'!r}; use .png or .jpg")
    if not os.access(folder, os.W_OK):
        raise ImageError(f"{path}: {flag}: the folder {folder} is not writable")


def cmd_generate(args) -> int:
    from .generate import check_params
    from .processor import load_image

    # everything that can be checked without the model is checked before loading it (which may take minutes)
    check_params(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    prompt = _argv_text(args.prompt, "--prompt")
    if args.draw:
        _check_output(args.draw, "--draw")
    image = load_image(args.image, exif=not args.no_exif)  # decoded, upright RGB
    model = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, exif=False)  # EXIF already applied
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
    print(format_stats(res.stats, model), file=sys.stderr)
    return 0


def _result_json(res):
    return {"prompt": res.prompt, "text": res.text, "token_ids": [int(t) for t in res.token_ids],
            "finish_reason": res.finish_reason,
            "detections": [{"label": d.label, "box": [round(float(c), 1) for c in d.box]} for d in res.detections],
            "stats": {k: v for k, v in res.stats.items() if k != "image_sizes"}}


def _draw(image, res, out):
    from .postprocess import draw_detections

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


def cmd_info(args) -> int:
    from .info import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:<24} {v}")
    return 0


def cmd_demo(args) -> int:
    import tempfile

    from .postprocess import draw_detections
    from .shapes import make_scene

    if args.out:
        _check_output(args.out, "--out")
    model = _load(args)
    scene = make_scene(args.seed)
    img = scene.image
    print(f"scene {args.seed}: {len(scene.shapes)} shape(s); truth: {scene.caption}")
    prompts = ["caption en", "answer en how many shapes?"] + list(dict.fromkeys(f"detect {s.name}" for s in scene.shapes))
    dets, t0 = [], time.perf_counter()
    for p in prompts:
        res = model.generate(img, p, max_new_tokens=32)
        print(f"  {p:<28} -> {res.text}")
        dets += res.detections
    out = args.out or os.path.join(tempfile.gettempdir(), f"npvlm-demo-{args.seed}.png")
    try:
        draw_detections(img, dets).save(out)
    except (OSError, ValueError) as e:
        raise ImageError(f"{out}: cannot write the demo image ({e})") from None
    print(f"boxes drawn: {out}")
    print(f"{len(prompts)} prompts in {time.perf_counter() - t0:.2f} s; last: " + format_stats(res.stats, model),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
