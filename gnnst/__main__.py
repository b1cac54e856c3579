"""``python -m gnnst <command>``."""

import sys

from gnnst.cli import main

sys.exit(main())
