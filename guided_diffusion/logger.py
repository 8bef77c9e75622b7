"""Run logging: key/value metrics to ``progress.csv`` and ``log.txt``, messages to the terminal.

The function names follow guided-diffusion's logger (``configure``, ``log``, ``logkv``,
``logkv_mean``, ``dumpkvs``, ``get_dir``) so existing scripts keep working. The run folder is, in
order of precedence, the ``dir`` argument, ``$OPENAI_LOGDIR``, or ``runs/train-<timestamp>``.

Only rank 0 writes files; other ranks log nothing. :func:`dumpkvs` is a collective: every rank must
call it at the same step, and the means it reports are averaged over all ranks (weighted by how
many values each rank accumulated). Terminal output goes through ``tqdm.write`` so it does not
break a progress bar.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import sys
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch.distributed as dist

from .infra import fileio

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50

# Keys shown in the one-line terminal summary (when present); the files get every key.
_SUMMARY_KEYS = ("step", "loss", "mse", "vb", "lr", "grad_norm", "steps_per_sec")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<8.4g}" if value != 0 else "0"
    return str(value)


def _terminal_write(text: str) -> None:
    try:
        from tqdm import tqdm  # lazy: only terminal writes under a bar need it

        tqdm.write(text, file=sys.stdout)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(text, flush=True)


class TerminalFormat:
    """One compact line per dump (the main keys), and messages, on stdout."""

    def writekvs(self, kvs: dict[str, Any]) -> None:
        parts = [f"{k} {_fmt(kvs[k]).strip()}" for k in _SUMMARY_KEYS if k in kvs]
        _terminal_write(" | ".join(parts))

    def writeseq(self, text: str) -> None:
        _terminal_write(text)

    def close(self) -> None:
        pass


class HumanFormat:
    """``log.txt``: messages and a full key/value table per dump (appends, so resumes keep history)."""

    def __init__(self, path: str):
        fileio.makedirs(os.path.dirname(path) or ".")
        self.file = open(path, "at")

    def writekvs(self, kvs: dict[str, Any]) -> None:
        if not kvs:
            return
        keys = sorted(kvs)
        kw = max(len(k) for k in keys)
        vw = max(len(_fmt(kvs[k]).strip()) for k in keys)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {_fmt(kvs[k]).strip():<{vw}} |" for k in keys] + [rule]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVFormat:
    """``progress.csv``: one row per dump; the header grows when new keys appear.

    With ``resume_step`` set, an existing file is kept up to and including that step (rows logged
    after the checkpoint we resume from would otherwise appear twice); without it the file starts over.
    """

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        self.keys: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or [])
                for row in reader:
                    try:
                        if int(float(row.get("step") or 0)) > resume_step:
                            continue
                    except ValueError:
                        pass
                    rows.append(row)
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.keys, extrasaction="ignore", restval="")
        if self.keys:
            writer.writeheader()
        writer.writerows(rows)
        fileio.write_bytes(self.path, buf.getvalue().encode())

    def _read_rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def writekvs(self, kvs: dict[str, Any]) -> None:
        new = [k for k in sorted(kvs) if k not in self.keys]
        if new:
            # A new key (a timestep quartile seen for the first time): rewrite with the wider header.
            rows = self._read_rows() if self.keys else []
            self.keys.extend(new)
            self._rewrite(rows)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys, extrasaction="ignore", restval="")
            writer.writerow({k: kvs.get(k, "") for k in self.keys})

    def writeseq(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class Logger:
    """Accumulates key/value pairs between dumps and writes them to the configured outputs."""

    def __init__(self, dir: Optional[str], formats: Sequence[Any], level: int = INFO):
        self.dir = dir
        self.formats = list(formats)
        self.level = level
        self.values: dict[str, Any] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def logkv(self, key: str, value: Any) -> None:
        self.values[key] = value

    def logkv_mean(self, key: str, value: float) -> None:
        self.sums[key] += float(value)
        self.counts[key] += 1

    def dumpkvs(self) -> dict[str, Any]:
        """Write and clear the accumulated values; returns what was written (same on every rank)."""
        sums, counts = _reduce_means(dict(self.sums), dict(self.counts))
        out: dict[str, Any] = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
        out.update(self.values)
        for fmt in self.formats:
            fmt.writekvs(out)
        self.values.clear()
        self.sums.clear()
        self.counts.clear()
        return out

    def log(self, *args: Any, level: int = INFO) -> None:
        if self.level <= level:
            text = " ".join(str(a) for a in args)
            for fmt in self.formats:
                fmt.writeseq(text)

    def close(self) -> None:
        for fmt in self.formats:
            fmt.close()


def _reduce_means(sums: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Sum the per-key (sum, count) pairs over ranks (keys may differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums, counts
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sums, counts))
    total_s: dict[str, float] = defaultdict(float)
    total_c: dict[str, int] = defaultdict(int)
    for s, c in gathered:
        for k, v in s.items():
            total_s[k] += v
            total_c[k] += c[k]
    return dict(total_s), dict(total_c)


_CURRENT: Optional[Logger] = None


def default_dir() -> str:
    return os.environ.get("OPENAI_LOGDIR") or os.path.join(
        "runs", datetime.datetime.now().strftime("train-%Y%m%d-%H%M%S")
    )


def configure(
    dir: Optional[str] = None,
    format_strs: Optional[Sequence[str]] = None,
    resume_step: Optional[int] = None,
    rank: Optional[int] = None,
) -> Logger:
    """Start logging into ``dir`` (see module doc for the default).

    ``format_strs`` picks outputs among "stdout", "log" (log.txt), "csv" (progress.csv); default all
    three on rank 0 and none on other ranks. ``resume_step`` keeps progress.csv rows up to that step.
    """
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    dir = dir or default_dir()
    if format_strs is None:
        format_strs = ("stdout", "log", "csv") if rank == 0 else ()
    formats: list[Any] = []
    if format_strs:
        fileio.makedirs(dir)
    for name in format_strs:
        if name == "stdout":
            formats.append(TerminalFormat())
        elif name == "log":
            formats.append(HumanFormat(os.path.join(dir, "log.txt")))
        elif name == "csv":
            formats.append(CSVFormat(os.path.join(dir, "progress.csv"), resume_step))
        else:
            raise ValueError(f"unknown log format {name!r} (expected stdout, log or csv)")
    _CURRENT = Logger(dir, formats)
    return _CURRENT


def get_current() -> Logger:
    global _CURRENT
    if _CURRENT is None:
        # Logging before configure() (a run still checking its inputs): messages reach rank 0's
        # terminal, nothing is written to disk; configure() replaces this logger.

        rank = dist.get_rank() if dist.is_initialized() else 0
        _CURRENT = Logger(None, [TerminalFormat()] if rank == 0 else [])
    return _CURRENT


def get_dir() -> Optional[str]:
    return get_current().dir


def logkv(key: str, value: Any) -> None:
    get_current().logkv(key, value)


def logkv_mean(key: str, value: float) -> None:
    get_current().logkv_mean(key, value)


def logkvs(values: dict[str, Any]) -> None:
    for k, v in values.items():
        logkv(k, v)


def dumpkvs() -> dict[str, Any]:
    return get_current().dumpkvs()


def log(*args: Any, level: int = INFO) -> None:
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    log("warning:", *args, level=WARN)


def error(*args: Any) -> None:
    log("error:", *args, level=ERROR)


def set_level(level: int) -> None:
    get_current().level = level


def close() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
        _CURRENT = None
