"""``python -m airtrace.cli``: the same command line as ``python -m airtrace``."""

import sys

from airtrace.cli import main

sys.exit(main())
