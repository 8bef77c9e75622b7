"""An exclusive lock on a run folder, so two processes never write one folder at once.

A restarted cluster job whose old instance still runs would otherwise add checkpoints or
patches to the same folder from two processes. The lock is the file ``<folder>/.lock`` (or
``.lock-rank<r>`` for the other ranks of a synthesis job: ranks of one job share the folder
legitimately, the same rank of two jobs does not), created with O_EXCL and holding JSON
``{pid, host, started, heartbeat, what}``. A thread refreshes ``heartbeat`` every
:data:`HEARTBEAT_S` seconds while the lock is held.

A lock is stale, and taken over with a one-line notice, when its process is gone: on the same
host the pid no longer runs; on another host its heartbeat is older than :data:`STALE_AFTER_S`.
A lock that cannot be judged stale refuses the start with a message naming the holder and the
lock file. Local folders only (remote stores have no atomic create); remote folders are not locked.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import fileio
from .errors import DiffMixError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def lock_name(rank: int = 0) -> str:
    return ".lock" if rank == 0 else f".lock-rank{rank}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def stale_reason(holder: Optional[dict], now: Optional[float] = None) -> Optional[str]:
    """Why a lock's holder is gone (None: it may still run; "" for this very process)."""
    if holder is None:
        return "the lock file is empty or unreadable (a process killed while taking it)"
    now = time.time() if now is None else now
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and pid == os.getpid():
        return ""  # an earlier run of this same process that ended with an error (in-process callers)
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} on this host no longer runs"
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)) and now - beat > STALE_AFTER_S:
        return f"its heartbeat stopped {now - beat:.0f} s ago"
    return None


class RunLock:
    """A held lock; :meth:`release` (also run at exit) removes the lock file, and the folder if
    this lock created it and it is still empty."""

    def __init__(self, path: str, record: dict, created_folder: Optional[str]):
        self.path = path
        self.record = record
        self.created_folder = created_folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = _read(self.path)
            if holder is None or holder.get("token") != self.record["token"]:
                return  # taken over (this process is presumed gone): never overwrite the new holder
            self.record["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                fileio.write_json(self.path, self.record)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.record["token"]:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        if self.created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.created_folder)  # only if still empty (a start that failed early)


def _create(path: str, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _refuse(folder: str, path: str, holder: dict) -> DiffMixError:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return DiffMixError(
        f"{folder}: in use by {holder.get('what', 'another run')} (pid {holder.get('pid')} on "
        f"{holder.get('host')}, since {started}); two processes must not write one run folder. "
        f"If that process is gone, delete {path}"
    )


def check_available(folder: str, rank: int = 0, flag: str = "the run folder") -> None:
    """The cheap early check (before long work, writing nothing): ``folder`` can be written and no
    live process holds its lock. Raises DiffMixError otherwise."""
    fileio.check_output_dir(folder, flag)
    path = os.path.join(folder, lock_name(rank))
    if not fileio.is_remote(folder) and os.path.exists(path):
        holder = _read(path)
        if stale_reason(holder) is None:
            raise _refuse(folder, path, holder)


def acquire(folder: str, what: str, rank: int = 0, flag: str = "the run folder") -> Optional[RunLock]:
    """Take the lock of ``folder`` for this process (``what``: "training", "synthesis").

    Creates ``folder`` when missing (checked first with :func:`fileio.check_output_dir`, named by
    ``flag`` in errors). Returns None for remote folders.

    Raises:
        DiffMixError: another live process holds the lock (its pid, host and start time named).
    """
    fileio.check_output_dir(folder, flag)
    if fileio.is_remote(folder):
        return None
    created = None if os.path.isdir(folder) else os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, lock_name(rank))
    now = time.time()
    record = {
        "pid": os.getpid(), "host": socket.gethostname(), "what": what, "rank": rank,
        "started": now, "heartbeat": now, "token": f"{socket.gethostname()}:{os.getpid()}:{now}",
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        if _create(path, record):
            return RunLock(path, record, created)
        holder = _read(path)
        reason = stale_reason(holder)
        if reason is None:
            raise _refuse(folder, path, holder)
        if reason:
            print(f"note: {path}: taking over a stale lock ({reason})", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise DiffMixError(f"{path}: could not take the run-folder lock (another process keeps taking it)")


def acquire_on_rank0(folder: str, what: str, rank: int, broadcast: Callable[[Any], Any], flag: str,
                     check_only: bool = False) -> Optional[RunLock]:
    """:func:`acquire` (or with ``check_only`` :func:`check_available`) on rank 0 of a process group;
    every rank raises the same error on failure (``broadcast`` sends rank 0's object to all ranks,
    e.g. ``dist_util.broadcast_object``)."""
    lock, error = None, None
    if rank == 0:
        try:
            if check_only:
                check_available(folder, 0, flag)
            else:
                lock = acquire(folder, what, 0, flag)
        except DiffMixError as err:
            error = str(err)
    error = broadcast(error)
    if error is not None:
        raise DiffMixError(error)
    return lock
