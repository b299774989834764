"""orchctl's exit codes for what happens on its own side (usage, an unreachable daemon, a
damaged state directory); a daemon's refusals map through protocol.EXIT_CODES. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_WRONG_STATE: Final = 5
EXIT_UNREACHABLE: Final = 7
EXIT_CORRUPT: Final = 65
