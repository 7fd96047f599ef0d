"""The `npvlm` command: the parser, the error policy, and the helpers every subcommand shares.

    npvlm demo                                   make a scene, caption it, answer, detect, draw
    npvlm generate --image cat.jpg --prompt "caption en" [--model DIR] [--backend numpy|cupy]
    npvlm info --model DIR                       config, parameter counts, memory; loads no weights

One module per subcommand beside this one (generate.py, info.py, demo.py), each with `add_parser`
and `run`. Text goes to stdout as it is generated; timings, progress and warnings go to stderr.
Every error in the input is one line `npvlm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from ..errors import ImageError, NpvlmError


def progress_printer(stream=sys.stderr, min_bytes=64 << 20):
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


def add_model_args(p):
    p.add_argument("--model", "-m", metavar="DIR", default=None,
                   help="HF PaliGemma model folder (config.json, *.safetensors, tokenizer); default: the embedded shapes model")
    p.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (CUDA GPU); default numpy")
    p.add_argument("--threads", type=_threads, default=None, help="BLAS threads on the CPU (default: the library's own)")


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    from . import classify, demo, embed, generate, info

    ap = _Parser(prog="npvlm", description="PaliGemma in NumPy: image + prompt in, text out.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in (generate, info, demo, classify, embed):
        module.add_parser(sub).set_defaults(run=module.run)
    return ap


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"npvlm: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display on the way out
            warnings.showwarning = _warn_one_line
            return args.run(args)
    except NpvlmError as e:
        print(f"npvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npvlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `npvlm generate ... | head -c 10`
        return 0


def load_model(args, want="paligemma"):
    from ..api import load
    from ..backends import get_backend

    backend = get_backend(args.backend)
    if args.threads is not None:
        backend.set_threads(args.threads)
    return load(args.model, backend=backend, progress=progress_printer(), want=want)


def argv_text(text: str, flag: str) -> str:
    """A command-line string as UTF-8 text. Python decodes argv with surrogateescape, so bytes that are not
    UTF-8 arrive as lone surrogates: turn them back into bytes, and let `as_text` say which one and where."""
    from ..io.tokenizer import as_text

    try:
        return as_text(os.fsencode(text), flag)
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return as_text(text, flag)


def check_output(path: str, flag: str) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
