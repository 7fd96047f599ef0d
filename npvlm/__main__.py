import os
import sys

try:
    from .apps.cli import main

    code = main()
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
sys.exit(code)
