"""The `npvlm` command's first lines, run before numpy or any model code is imported.

Two things must happen this early:
- Ctrl-C at any moment is a clean stop: `npvlm: interrupted` and exit status 130, never a traceback. Importing
  numpy and the subcommands takes a few hundred ms, and numpy turns a KeyboardInterrupt inside its C extension's
  import into an ImportError with a page of advice; so SIGINT is held back (blocked) while they import and
  delivered, as a KeyboardInterrupt caught here, the moment they are in. (Before this module runs, Python itself
  starts and imports `site` and `runpy`: about 15 ms here in which a Ctrl-C meets the interpreter's own handling.)
- OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it. With packed weights (`--weights bfloat16|int8`)
  numba's threads and OpenBLAS's share the cores, and OpenBLAS's idle threads busy-wait for about 2^28 cycles after
  each call (its default), taking a core from numba's kernels. 4 (2^4 cycles, OpenBLAS's minimum) lets them sleep
  at once. Set only when the user has not set it, and only for packed weights: a float32 run has no numba threads.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

PACKED = ("bfloat16", "int8")


def early_environment(argv: list[str], environ=os.environ) -> None:
    """Settings that must be in the environment before numpy is imported (see the module docstring)."""
    weights = None
    for i, a in enumerate(argv):
        if a == "--weights" and i + 1 < len(argv):
            weights = argv[i + 1]
        elif a.startswith("--weights="):
            weights = a.split("=", 1)[1]
    if weights in PACKED:
        environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


@contextmanager
def sigint_held():
    """SIGINT blocked for the block's duration; one that arrived meanwhile is delivered as it ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    early_environment(sys.argv[1:] if argv is None else list(argv))
    try:
        with sigint_held():
            import numpy  # noqa: F401  (see the module docstring)

            from .cli import main as cli_main
        code = cli_main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the modules load: a clean stop, no traceback
        print("npvlm: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        # CPython kills itself with SIGINT at exit once a KeyboardInterrupt has passed through code run by exec()
        # (array_api_compat and numpy import that way), even when it was caught: flush and leave with 130 ourselves.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    return code
