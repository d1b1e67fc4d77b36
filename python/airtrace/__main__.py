"""``python -m airtrace``: the command line; imports only ``airtrace.cli``."""

import sys

from airtrace.cli import main

sys.exit(main())
