"""msflow's messages and progress: one home for how a run reports what it does.

Every message goes through :mod:`logging` (logger ``msflow`` and its children); only a command's result
(metrics, ``--json``) is printed on stdout. Progress depends on where stderr goes:

* a terminal: tqdm bars that redraw in place and vanish when done;
* anything else (a log file, a pipe, CI): no bars and no carriage returns, one INFO line when a phase
  ends (``features: 120 images in 8.1 s, 14.8 images/s``), and training logs one line per epoch.

:func:`configure` is for programs (the command line); a library user configures ``logging`` as usual.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from msflow.errors import MSFlowError

log = logging.getLogger("msflow")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_bars = True  # False after configure(quiet=True): nothing redraws on stderr


class _Stderr(logging.Handler):
    """Plain lines on whatever ``sys.stderr`` is at the time (pytest swaps it); above a bar if one runs."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - a log line must never end a run
            self.handleError(record)


def configure(level: str = "INFO", log_file: str | Path | None = None, quiet: bool = False) -> None:
    """Messages of level ``level`` and above on stderr (WARNING and above with ``quiet``, and no bars);
    with ``log_file``, the same messages with a time stamp appended to that file, whatever ``quiet``."""
    global _bars
    level = level.upper()
    if level not in LEVELS:
        raise MSFlowError(f"--log-level {level!r} is not one of {list(LEVELS)}")
    for handler in [h for h in log.handlers if getattr(h, "_msflow", False)]:
        log.removeHandler(handler)
        handler.close()
    _bars = not quiet
    _add(_Stderr(logging.WARNING if quiet else level))  # first: a bad log file is reported here
    if log_file:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as err:
            raise MSFlowError(f"cannot write the log file '{log_file}': {err.strerror or err}") from None
        to_file.setLevel(level)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        _add(to_file)


def _add(handler: logging.Handler) -> None:
    handler._msflow = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(min(h.level for h in log.handlers if getattr(h, "_msflow", False)))


def duration(seconds: float) -> str:
    """``0:42``, ``12:05`` or ``3:07:12`` (h:mm:ss)."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of one phase: a tqdm bar on a terminal, otherwise one log line when the phase ends.

    Use it like tqdm (iterate, or ``update``; ``set_postfix``; ``close``); with ``total`` it closes
    itself when ``update`` reaches it. ``enabled=False`` reports nothing; ``summary=False`` leaves the
    closing line to the caller (training writes its own, per epoch).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        enabled: bool = True,
        summary: bool = True,
    ) -> None:
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.enabled, self.summary, self.count = enabled, summary, 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and _bars and sys.stderr.isatty() and total != 0:  # bars redraw in place on a terminal
            from tqdm import tqdm

            self.bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)

    def __iter__(self) -> Iterator[Any]:
        source = self.bar if self.bar is not None else self.iterable
        try:
            for item in source or ():
                self.count += 1
                yield item
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        if self.total is not None and self.count >= self.total:
            self.close()  # done: a generator that is never exhausted still reports its phase now

    def set_postfix(self, **values: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled and self.summary and self.count:
            self.enabled = False  # one line, however often close() is called
            seconds = time.perf_counter() - self.start
            rate = self.count / max(seconds, 1e-9)
            log.info(f"{self.desc}: {self.count} {self.unit} in {seconds:.1f} s, {rate:.1f} {self.unit}/s")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
