"""Outputs that count as complete only when a marker is written last, and refuse mixed settings.

One protocol for every resumable output set: a training checkpoint (weights, optimizer, state,
then ``checkpoint%06d.json``), a synthesised patch (PNG, HoVer-Net ``.npy``, then its record) and a
GradMix map (``.mat``, image, then its record):

1. :func:`write_marked` writes each file atomically (temporary name, then rename), then the JSON
   marker *last*. A killed process or a full disk therefore never leaves a marker beside missing
   or partial files; on a write error the files already written for the set are removed and
   nothing is marked.
2. :func:`is_marked`: the set is complete when its marker (and every required file) exists; a
   rerun skips complete sets and redoes the rest.
3. :func:`refuse_changed_settings`: a rerun whose output-changing settings differ from those
   recorded in an existing marker is refused, so a folder never mixes two runs.

Light (no torch): GradMix uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from . import fileio
from .errors import DiffMixError

Writer = Callable[[str], Any]
Marker = Union[Mapping[str, Any], Callable[[dict], Mapping[str, Any]]]


def file_size(path: str) -> Optional[int]:
    """Size of a local file in bytes (-1 when unreadable); None for remote paths (not checked)."""
    if fileio.is_remote(path):
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def write_marked(
    outputs: Sequence[tuple[str, Writer]],
    marker_path: str,
    marker: Marker,
    what: str = "",
    hint: Optional[Callable[[], str]] = None,
) -> dict:
    """Write ``outputs`` in order, then the JSON ``marker`` at ``marker_path``.

    Args:
        outputs: ``(path, write)`` pairs; ``write(path)`` writes one file atomically (e.g. through
            :func:`guided_diffusion.infra.fileio.atomic_open`).
        marker: the marker's content, or a callable given ``{path: size}`` of the written files
            (see :func:`file_size`) that returns it.
        what: names the set in error messages (e.g. "checkpoint of step 10").
        hint: called on failure for a sentence appended to the error (e.g. the last good checkpoint).

    Returns:
        ``{path: size}`` of the files written (the marker excluded).

    Raises:
        DiffMixError: ``<path>: cannot write <what> (<reason>)``; the set's files written so far
            are removed (local paths), the marker is not written, earlier sets are untouched.
    """
    sizes: dict = {}
    current = marker_path
    try:
        for path, write in outputs:
            current = path
            write(path)
            sizes[path] = file_size(path)
        current = marker_path
        fileio.write_json(marker_path, marker(sizes) if callable(marker) else marker)
    except (OSError, DiffMixError) as err:
        for path in sizes:
            with contextlib.suppress(OSError):
                if not fileio.is_remote(path):
                    os.remove(path)
        reason = (err.strerror or str(err)) if isinstance(err, OSError) else str(err)
        message = f"{current}: cannot write{' ' + what if what else ''} ({reason})"
        if hint is not None:
            message += f"; {hint()}"
        raise DiffMixError(message) from None
    return sizes


def is_marked(marker_path: str, required: Iterable[str] = ()) -> bool:
    """True when the set's marker exists and so does every path in ``required``."""
    return fileio.exists(marker_path) and all(fileio.exists(p) for p in required)


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str]) -> list:
    """The ``keys`` recorded in ``old`` whose values differ from ``new`` (compared as JSON stores
    them: tuples equal lists, ints equal floats)."""

    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    return [k for k in keys if k in old and norm(old[k]) != norm(new.get(k))]


def refuse_changed_settings(
    path: str, old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str], what: str, advice: str
) -> None:
    """Raise :class:`DiffMixError` when :func:`changed_settings` finds any key.

    The message names ``path`` (the marker holding the old settings) and each changed key, with
    ``old -> new`` values for plain ones: ``<path>: <what> was made with other settings (seed: 0
    -> 1, model_config differs); <advice>``.
    """
    changed = changed_settings(old, new, keys)
    if not changed:
        return
    detail = ", ".join(
        f"{k} differs" if isinstance(old[k], dict) or isinstance(new.get(k), dict) else f"{k}: {old[k]!r} -> {new.get(k)!r}"
        for k in changed
    )
    raise DiffMixError(f"{path}: {what} was made with other settings ({detail}); {advice}")
