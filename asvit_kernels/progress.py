"""Progress of the long loops (search steps, scaling steps and candidates, epochs and steps,
evolution generations): a tqdm bar when stderr is a terminal, a plain log line at a fixed
interval otherwise (CI logs, batch jobs), nothing when switched off or on ranks other than 0.

``Progress(total, desc=..., progress=None)`` is used like a tqdm bar (``update``,
``set_postfix``, ``close``, a context manager). ``progress``: ``None`` or ``True`` = the mode
stderr calls for ("bar" on a terminal, "lines" otherwise), ``False`` = off; the environment
variable ``TQDM_DISABLE=1`` (what ``asvit --quiet`` sets) also switches it off.

Nesting: a ``Progress`` opened while another is open sits below it (tqdm ``position`` = its
depth; inner bars do not stay on screen when done, ``leave=False``). In "lines" mode one line
covers every open loop, outer first::

    12:03:07 asvit_kernels.progress: train 3/20 (15%, 0.05 epoch/s, ETA 5 min 40 s) val=91.2% >
             epoch 4/20 10/22 (45%, 2.1 step/s, ETA 6 s)          (one line, folded here)

at most one line per ``interval()`` seconds (``ASVIT_PROGRESS_INTERVAL``, default 30 s;
``asvit --progress-interval``), through the ``asvit_kernels.progress`` logger at INFO, plus one
line when an outermost loop ends. Library code only logs; the CLI decides where logs go.

``watch(desc, fn)`` calls ``fn(progress)`` after every ``update`` of a loop named ``desc`` while
it is in force, in every mode (off too): the pipeline estimates a stage's time from it.

Why bars sometimes never showed: a pseudo-terminal created without a window size (``script``
without a controlling terminal, ``pty.openpty()``, some container and CI ttys) reports 0 x 0, and
tqdm then treats every position as below the screen's last row and prints nothing. A terminal
that reports 0 columns or rows is taken as ``COLUMNS`` x ``LINES`` (default 80 x 24) here.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, TextIO

from tqdm.auto import tqdm

__all__ = ["Progress", "mode", "interval", "set_interval", "TqdmLoggingHandler", "format_duration", "watch",
           "INTERVAL_ENV", "DEFAULT_INTERVAL"]

log = logging.getLogger(__name__)
INTERVAL_ENV = "ASVIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
_interval_override: Optional[float] = None
_open: list["Progress"] = []  # the open loops, outermost first
_last_line = [0.0]  # monotonic time of the last "lines" line
_watchers: dict[str, list[Callable[["Progress"], None]]] = {}


@contextlib.contextmanager
def watch(desc: str, fn: Callable[["Progress"], None]) -> Iterator[None]:
    """Within the block, ``fn(progress)`` runs after every ``update`` of a loop named ``desc``."""
    _watchers.setdefault(desc, []).append(fn)
    try:
        yield
    finally:
        _watchers[desc].remove(fn)


def set_interval(seconds: Optional[float]) -> None:
    """Seconds between two progress lines in "lines" mode (None: back to the environment / default)."""
    global _interval_override
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"the progress interval must be a finite number of seconds >= 0, got {seconds!r}")
    _interval_override = None if seconds is None else float(seconds)


def interval() -> float:
    """The interval in force: ``set_interval``, else ``ASVIT_PROGRESS_INTERVAL``, else 30 s."""
    if _interval_override is not None:
        return _interval_override
    text = os.environ.get(INTERVAL_ENV)
    if text:
        try:
            v = float(text)
        except ValueError:
            v = -1.0
        if math.isfinite(v) and v >= 0:
            return v
        log.warning("%s=%r is not a number of seconds >= 0: using %g s", INTERVAL_ENV, text, DEFAULT_INTERVAL)
    return DEFAULT_INTERVAL


def _not_rank_0() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def mode(progress: Optional[bool] = None, stream: Optional[TextIO] = None) -> str:
    """"bar", "lines" or "off" for this process (module docstring)."""
    if progress is False or _not_rank_0():
        return "off"
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "bar" if tty else "lines"


def _terminal_size(stream: TextIO) -> dict[str, int]:
    """ncols / nrows for tqdm when the terminal reports a zero size (see the module docstring)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        cols, rows = size.columns, size.lines
    except (AttributeError, ValueError, OSError):
        return {}
    if cols > 0 and rows > 0:
        return {}  # tqdm reads the real size itself

    def env(name: str, default: int) -> int:
        try:
            return max(1, int(os.environ.get(name, default)))
        except ValueError:
            return default
    return {"ncols": cols if cols > 0 else env("COLUMNS", 80), "nrows": rows if rows > 0 else env("LINES", 24)}


def format_duration(seconds: Optional[float]) -> str:
    """"42 s", "3 min 12 s", "2 h 05 min" ("?" for None or not finite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """One long loop's progress (module docstring). ``total`` may be None (unknown length);
    ``initial``: steps already done (a resumed loop), not counted in the rate."""

    def __init__(self, total: Optional[int] = None, *, desc: str, unit: str = "it", initial: int = 0,
                 progress: Optional[bool] = None, leave: Optional[bool] = None, stream: Optional[TextIO] = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = int(initial)
        self.postfix: dict[str, Any] = {}
        self.stream = sys.stderr if stream is None else stream
        self.mode = mode(progress, self.stream)
        self.depth = len(_open)
        self.leave = self.depth == 0 if leave is None else bool(leave)
        self.start = time.perf_counter()
        self.closed = False
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, position=self.depth,
                             leave=self.leave, file=self.stream, **_terminal_size(self.stream))
        if self.mode != "off":
            if not _open:
                _last_line[0] = time.monotonic()
            _open.append(self)

    # -- measurements

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> Optional[float]:
        """Steps per second in this call (None before the first step)."""
        done = self.n - self.initial
        return done / self.elapsed if done > 0 and self.elapsed > 0 else None

    @property
    def remaining(self) -> Optional[float]:
        """Seconds left at the measured rate (None when unknown)."""
        if self.total is None or self.rate is None:
            return None
        return max(0, self.total - self.n) / self.rate

    def text(self) -> str:
        """"desc n/total (p%, r/s, ETA t) k=v" as the periodic line shows it."""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n} {self.unit}"
        stats = []
        if self.total:
            stats.append(f"{100.0 * self.n / self.total:.0f}%")
        if self.rate is not None:
            stats.append(f"{self.rate:.3g} {self.unit}/s")
        if self.remaining is not None:
            stats.append(f"ETA {format_duration(self.remaining)}")
        post = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc} {count}" + (f" ({', '.join(stats)})" if stats else "") + post

    # -- the tqdm-like interface

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - _last_line[0] >= interval():
                _last_line[0] = now
                log.info("%s", " > ".join(p.text() for p in _open))
        for fn in list(_watchers.get(self.desc, ())):
            fn(self)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = {k: v for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if self in _open:
            for inner in _open[_open.index(self) + 1:]:  # left open by an exception inside this loop
                inner.close()
            _open.remove(self)
            if self.mode == "lines" and self.depth == 0 and self.leave:
                rate = "" if self.rate is None else f", {self.rate:.3g} {self.unit}/s"
                post = "".join(f" {k}={v}" for k, v in self.postfix.items())
                log.info("%s done: %d/%s in %s%s%s", self.desc, self.n, "?" if self.total is None else self.total,
                         format_duration(self.elapsed), rate, post)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TqdmLoggingHandler(logging.StreamHandler):
    """A log handler that writes through ``tqdm.write``, so log lines appear above open bars
    instead of through them (the CLI installs it when stderr is a terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
