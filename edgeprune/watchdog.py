"""A time budget on one stage that runs on the calling thread (tracing, dependency-graph build).

On POSIX, on the main thread, ``signal.setitimer`` interrupts the stage; elsewhere a timer thread
raises the timeout asynchronously in the calling thread. Either way the timer is always cleared
(and a previous alarm restored) when the stage ends. Only Python code is interrupted: a single
long call into C finishes first, then the timeout is raised.
"""
from __future__ import annotations

import ctypes
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from .errors import PruneError


class StageTimeout(PruneError):
    """A stage ran past its time budget."""


class _Expired(BaseException):
    """Raised inside the stage; a BaseException so that ``except Exception`` in library code cannot swallow it."""


TRACE_HINT = ("raise prune.trace_timeout_s (--trace-timeout) if the model is just large, use a smaller --input-shape, "
              "or --ignore the part of the model that loops")


def _stage_error(stage: str, seconds: float, hint: str) -> StageTimeout:
    return StageTimeout(f"{stage} did not finish within {seconds:g} s and was stopped", hint=hint)


@contextmanager
def _posix_alarm(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):  # noqa: ANN001, ARG001 - signal handler signature
        raise _Expired()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_delay and old_delay < seconds:  # an outer budget ends first: keep its deadline
        signal.setitimer(signal.ITIMER_REAL, old_delay)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:  # an outer alarm keeps its remaining time
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


@contextmanager
def _thread_alarm(seconds: float) -> Iterator[None]:
    target = threading.get_ident()
    done = threading.Event()

    def fire() -> None:
        if not done.is_set():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_Expired))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()


@contextmanager
def time_budget(seconds: Optional[float], stage: str, *, hint: str = TRACE_HINT) -> Iterator[None]:
    """Run the ``with`` body for at most ``seconds`` (None or <= 0: no limit); past it, StageTimeout naming
    ``stage`` (with ``hint``: what to change)."""
    if not seconds or seconds <= 0:
        yield
        return
    posix = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    try:
        with (_posix_alarm if posix else _thread_alarm)(seconds):
            yield
    except _Expired:
        raise _stage_error(stage, seconds, hint) from None
