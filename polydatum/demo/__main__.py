"""``python -m polydatum.demo``: the same as ``polydatum demo``."""

import sys

from polydatum.demo.cli import main

sys.exit(main())
