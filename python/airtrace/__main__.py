"""``python -m airtrace``: the command line."""

import sys

from airtrace.cli import main

sys.exit(main())
