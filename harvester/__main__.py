"""``python -m harvester``: the same as ``lsn`` (kept for the scripts that run it so). An entry point,
never imported: the one place below :mod:`lsn` that names it."""

import sys

from lsn.cli import main

sys.exit(main())
