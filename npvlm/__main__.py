"""`python -m npvlm ...`: the same command as the `npvlm` script (npvlm/apps/start.py)."""

import sys

from .apps.start import main

sys.exit(main())
