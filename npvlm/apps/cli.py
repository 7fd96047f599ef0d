"""The `npvlm` command: the parser, the error policy, and the helpers every subcommand shares.

    npvlm demo                                   make a scene, caption it, answer, detect, draw
    npvlm generate --image cat.jpg --prompt "caption en" [--model DIR|ORG/NAME] [--backend numpy|cupy]
    npvlm generate -i a.jpg -i photos/ -p "caption en" -p "detect cat"   every image x every prompt
    npvlm info --model DIR                       config, parameter counts, memory; loads no weights

One module per subcommand beside this one (generate.py, info.py, demo.py), each with `add_parser`
and `run`. Text goes to stdout as it is generated; timings, progress and warnings go to stderr.
Every error in the input is one line `npvlm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import warnings

from ..errors import ImageError, NpvlmError


def progress_printer(stream=None, min_bytes=64 << 20):
    """A progress callback for load(): on a terminal a one-line bar redrawn with \\r; into a file or pipe
    plain lines, one per quarter; nothing for checkpoints under 64 MiB. stream: sys.stderr as it is now."""
    stream = sys.stderr if stream is None else stream
    state = {"t0": time.perf_counter(), "last": 0.0, "quarter": -1}
    tty = hasattr(stream, "isatty") and stream.isatty()

    def progress(done, total, name):
        if total < min_bytes:
            return
        now = time.perf_counter()
        frac = done / total if total else 1.0
        if tty:
            if done < total and now - state["last"] < 0.2:
                return
            bar = "#" * int(30 * frac)
            stream.write(f"\rloading {os.path.basename(name):<34.34} [{bar:<30}] {frac:4.0%} "
                         f"{done / 1e9:.2f}/{total / 1e9:.2f} GB {now - state['t0']:.0f}s")
            if done >= total:
                stream.write("\n")
        else:
            quarter = int(4 * frac)
            if quarter <= state["quarter"]:
                return
            state["quarter"] = quarter
            stream.write(f"loading {frac:4.0%} {done / 1e9:.2f}/{total / 1e9:.2f} GB {now - state['t0']:.0f}s\n")
        state["last"] = now
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


class Once(argparse.Action):
    """An option that may be given once: a second value is an error, never silently dropped."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "_seen_" + self.dest, False):
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, then {values!r}); give it once")
        setattr(namespace, "_seen_" + self.dest, True)
        setattr(namespace, self.dest, values)


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """BLAS threads when --threads is not given: the cores free to this process (its CPU affinity), less the
    ones other processes keep busy (1-minute load average, rounded), at least 1. OpenBLAS threads busy-wait
    on each other, so one thread more than there are free cores makes every matmul wait for a descheduled one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on this platform
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def add_model_args(p):
    p.add_argument("--model", "-m", metavar="DIR|ORG/NAME", default=None, action=Once,
                   help="HF PaliGemma model folder (config.json, *.safetensors, tokenizer), or a Hub id such as "
                        "google/paligemma2-3b-mix-224 found in the Hugging Face cache; default: the embedded shapes model")
    p.add_argument("--download", action="store_true",
                   help="download a Hub id through huggingface_hub when it is not cached (never done otherwise)")
    p.add_argument("--backend", default="numpy", action=Once, help="numpy (CPU) or cupy (CUDA GPU); default numpy")
    p.add_argument("--threads", type=_threads, default=None, action=Once,
                   help="BLAS threads on the CPU (default: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set, else the cores "
                        "free to this process less those busy with other work, at least 1)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory instead of mapping the files (then they may change on disk)")
    p.add_argument("--weights", choices=("float32", "bfloat16", "int8"), default="float32", action=Once,
                   help="how the Linear weights stay in memory: float32 (default), bfloat16 (a bf16 checkpoint stays "
                        "mapped as stored; half the bytes read per token) or int8 (per-channel, quantized at load; a "
                        "quarter), the tied embedding / head too; norms stay float32. Fast with numba (npvlm[fast])")


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, action=Once, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, action=Once, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, action=Once, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, action=Once, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, action=Once, help="seed for sampling (needs --temperature > 0)")


SUBCOMMANDS = (
    "generate",
    "info",
    "demo",
    "label",
    "serve",
    "classify",
    "embed",
    "quantize",
    "finetune",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    ap = _Parser(prog="npvlm", description="PaliGemma in NumPy: image + prompt in, text out.")
    ap.add_argument("--version", action="version", version=f"npvlm {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:  # each a module of npvlm.apps with add_parser(sub) and run(args)
        module = importlib.import_module(f"{__package__}.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return ap


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"npvlm: warning: {message}", file=sys.stderr)


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():  # restores the caller's warning display on the way out
            warnings.showwarning = _warn_one_line
            return args.run(args)
    except NpvlmError as e:
        print(f"npvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npvlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `npvlm generate ... | head -1`: the reader is gone, nothing to say
        _quiet_stdout()
        return 0
    except OSError as e:  # stdout to /dev/full, a full disk under `> out.txt`
        if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EPIPE):
            _quiet_stdout()
            print(f"npvlm: error: cannot write the output ({e.strerror or e})", file=sys.stderr)
            return 1
        raise


def _quiet_stdout():
    """Point stdout at devnull so the interpreter's final flush has nowhere to fail (Python's docs, signal module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by something without a descriptor
        pass


def load_model(args, want="paligemma"):
    from ..api import load
    from ..backends import get_backend

    from ..io.hub import looks_like_hub_id, resolve_model

    backend = get_backend(args.backend)
    if args.threads is not None:
        backend.set_threads(args.threads)
    elif not any(os.environ.get(v) for v in _THREAD_VARS):  # a thread count set in the environment is kept
        backend.set_threads(default_threads())
    model = args.model
    if looks_like_hub_id(model):
        model = resolve_model(model, download=getattr(args, "download", False))
    return load(model, backend=backend, progress=progress_printer(), mmap=not getattr(args, "no_mmap", False),
                want=want, weights=getattr(args, "weights", "float32"))


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


def _seconds(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 1.0 else f"{t:.2f} s"


def format_stats(st, model, generated: int | None = None) -> str:
    """The closing line. `generated`: the tokens the results hold (default: the stats' new_tokens)."""
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    dev = f", device peak {mb(st['peak_device_bytes'])}" if st.get("peak_device_bytes") else ""
    n = st["new_tokens"] if generated is None else generated
    return (f"load {st['load_seconds']:.2f} s | image encode {_seconds(st['image_seconds'])} | "
            f"prefill {st['prompt_tokens']} tokens {_seconds(st['prefill_seconds'])} ({st['prefill_tokens_per_second']:.0f} tok/s) | "
            f"decode {n} token{'s' if n != 1 else ''} ({st['decode_tokens_per_second']:.1f} tok/s) | "
            f"peak RSS {mb(st['peak_rss_bytes'])}{dev} | backend {st['backend']}{_blas_info(model)}")


def _blas_info(model) -> str:
    if model.backend.name != "numpy":
        return ""
    try:
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        n = blas[0]["num_threads"] if blas else 0
        return f" ({blas[0]['internal_api']}, {n} thread{'s' if n != 1 else ''})" if blas else ""
    except Exception:  # noqa: BLE001 - informational only
        return ""


if __name__ == "__main__":
    sys.exit(main())
