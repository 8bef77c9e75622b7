"""User-facing errors.

Anything a user can cause (a missing file, a bad flag, a malformed label map) raises
:class:`DiffMixError` with a message that names the file and the problem. Command-line entry
points wrap their ``main`` in :func:`run_cli`, which prints such errors without a traceback and
exits with status 2; genuine bugs still show their traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable

# OS errors that are environment faults or user mistakes, not bugs: reported in one line.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_USER_ERRNOS = _WRITE_ERRNOS | {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class DiffMixError(Exception):
    """An error caused by user input (files, flags, configs), reported without a traceback."""


def describe_os_error(err: OSError, kept: str = "") -> str:
    """One line for a failed file operation: the file, the reason, and what is kept (``kept``, or
    for a failed write the generic promise of the atomic writes)."""
    line = f"{err.filename or 'output'}: {err.strerror or err}"
    if kept:
        return f"{line}; {kept}"
    if err.errno in _WRITE_ERRNOS:
        # Every output goes through a temporary name and a rename (fileio.atomic_open).
        line += "; outputs completed before it are kept whole, the one being written was discarded"
    return line


def run_cli(main: Callable[[], object]) -> None:
    """Run ``main()``; on :class:`DiffMixError` print ``error: ...`` to stderr and exit 2.

    OS errors caused by the environment (full disk, quota, read-only or unwritable folders,
    missing paths) are reported the same way, naming the file; other exceptions keep their
    traceback (they are bugs).
    """
    try:
        main()
    except DiffMixError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as err:
        if err.errno not in _USER_ERRNOS:
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
