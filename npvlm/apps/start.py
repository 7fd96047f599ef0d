"""The `npvlm` command's first lines, run before numpy or any model code is imported.

Two things must happen this early:
- Ctrl-C at any moment is a clean stop: `npvlm: interrupted` and exit status 130, never a traceback. Importing
  numpy and the subcommands takes a few hundred ms, and numpy turns a KeyboardInterrupt inside its C extension's
  import into an ImportError with a page of advice; so SIGINT is held back (blocked) while they import and
  delivered, as a KeyboardInterrupt caught here, the moment they are in. (Before this module runs, Python itself
  starts and imports `site` and `runpy`: about 15 ms here in which a Ctrl-C meets the interpreter's own handling.)
- OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it. numba's threads and OpenBLAS's share the cores
  whenever numba's kernels run: packed weights (`--weights bfloat16|int8`), and float32 models of 64 MiB or more,
  whose decode loop is timed against BLAS at load (backends/numba_kernels.dense_beats_blas). OpenBLAS's idle
  threads busy-wait for about 2^28 cycles after each call (its default), taking a core from numba's kernels: on
  `mid` the float32 calibration then chose BLAS in 6 loads of 6, and with the wait set, the loop in 4 of 4.
  4 (2^4 cycles, OpenBLAS's minimum) lets them sleep at once; decoding the tiny model through BLAS costs the same
  with it (0.33-0.38 against 0.33-0.34 ms a token). Set only when the user has not set it, before any numpy import.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager


def early_environment(environ=os.environ) -> None:
    """Settings that must be in the environment before numpy is imported (see the module docstring)."""
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
    early_environment()
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
