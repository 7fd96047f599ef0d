import sys

try:
    from .apps.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: a clean stop, no traceback
    sys.exit(130)

sys.exit(main())
