"""User-facing errors.

Anything a user can cause (a missing file, a bad flag, a malformed label map) raises
:class:`DiffMixError` with a message that names the file and the problem. Command-line entry
points wrap their ``main`` in :func:`run_cli`, which prints such errors without a traceback and
exits with status 2; genuine bugs still show their traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class DiffMixError(Exception):
    """An error caused by user input (files, flags, configs), reported without a traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run ``main()``; on :class:`DiffMixError` print ``error: ...`` to stderr and exit 2."""
    try:
        main()
    except DiffMixError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
