"""Progress that fits both a terminal and a CI log, and filters for known third-party noise.

:func:`progress_bar` takes tqdm's arguments. On a terminal it is a tqdm bar; otherwise (a CI log, a
pipe, a file) it writes one plain line at most every ``interval_s`` seconds (default 10 s,
``EDGEPRUNE_PROGRESS_INTERVAL_S`` overrides) and a last line when a kept bar (``leave=True``) closes,
so a loop of any length adds a bounded number of lines: at most ``elapsed / interval_s + 1``.

:func:`filter_third_party_noise` drops specific messages that say nothing about the run, by a
logging filter on the logger that emits each (never by silencing a whole library).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

DEFAULT_INTERVAL_S = 10.0

# logger name -> message fragments that are noise on the machines edgeprune runs on
NOISE = {
    # torch.utils.cpp_extension, imported by nncf: a CPU-only box has no CUDA runtime, by design
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}

# loggers whose INFO lines are per-layer chatter in a run log (nncf: "Not adding activation input
# quantizer for operation ...", one line per layer); their warnings and errors still show
CHATTY = ("nncf",)


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", disable: bool = False, leave: bool = True, initial: int = 0,
                 file: Optional[TextIO] = None, interval_s: Optional[float] = None, **tqdm_kwargs: Any):
    """A tqdm bar on a terminal, else a :class:`LineProgress` (same ``update``/``set_postfix``/``close``/iteration)."""
    stream = file if file is not None else sys.stderr
    if not disable and _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=stream,
                    **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, initial=initial,
                        stream=stream, interval_s=interval_s)


class LineProgress:
    """Plain progress lines (``desc: n/total unit, x unit/s, key=value``), rate-limited."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", disable: bool = False, leave: bool = True, initial: int = 0,
                 stream: Optional[TextIO] = None, interval_s: Optional[float] = None):
        self.iterable, self.desc, self.unit, self.disable, self.leave = iterable, desc, unit, disable, leave
        self.total = total if total is not None else _len(iterable)
        self.n = self.start_n = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s if interval_s is not None else _default_interval()
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self._write(now)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = kwargs

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.n > self.start_n:
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        self.last_line = now
        if self.disable:
            return
        elapsed = max(now - self.started, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {done} {self.unit}", f"{(self.n - self.start_n) / elapsed:.3g} {self.unit}/s",
                 f"{elapsed:.0f} s"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.lines += 1


class MessageFilter(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


class BelowWarningFilter(logging.Filter):
    """Drops INFO/DEBUG records (a library's chatter) and keeps its warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def filter_third_party_noise() -> None:
    """Install :data:`NOISE` filters and drop :data:`CHATTY` loggers' INFO lines (idempotent).
    Call before importing the library that logs."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) for f in logger.filters):
            logger.addFilter(MessageFilter(fragments))
    for name in CHATTY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BelowWarningFilter) for f in logger.filters):
            logger.addFilter(BelowWarningFilter())


def quiet_nncf_progress_off_terminal(stream: Optional[TextIO] = None) -> bool:
    """NNCF draws rich progress bars (statistics collection, bias correction); off a terminal rich prints
    each finished bar as a line, a few lines per quantized model in a CI log. Off a terminal, NNCF's
    ``track`` is created disabled (its iteration is unchanged). Call after importing nncf; returns
    whether the bars were turned off. Idempotent."""
    if _is_terminal(stream or sys.stdout):  # rich's console writes to stdout
        return False
    try:
        from nncf.common.logging import track_progress
    except ImportError:
        return False
    cls = track_progress.track
    if getattr(cls.__init__, "_edgeprune_quiet", False):
        return True
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    __init__._edgeprune_quiet = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _len(iterable: Optional[Iterable]) -> Optional[int]:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _default_interval() -> float:
    try:
        return float(os.environ.get("EDGEPRUNE_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
