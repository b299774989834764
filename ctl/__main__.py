"""`orchctl`: the command-line client of orchd."""

from __future__ import annotations

import sys

from ctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
