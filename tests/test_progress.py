"""Progress for CI logs: a non-terminal stream gets a bounded number of plain lines; known noise is filtered."""
from __future__ import annotations

import io
import logging

import pytest

from edgeprune.progress import LineProgress, MessageFilter, filter_third_party_noise, progress_bar


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_non_tty_progress_writes_a_bounded_number_of_lines(monkeypatch):
    import edgeprune.progress as prog

    clock = FakeClock()
    monkeypatch.setattr(prog.time, "monotonic", clock)
    stream = io.StringIO()
    bar = progress_bar(total=1335, desc="fine-tune", unit="step", file=stream, interval_s=10.0)
    assert isinstance(bar, LineProgress)
    for _ in range(1335):  # 1335 steps at 0.1 s: 133.5 s
        clock.t += 0.1
        bar.update(1)
    bar.set_postfix(val="0.9")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 13 <= len(lines) <= 133.5 / 10 + 1  # one line per 10 s plus the closing one
    assert lines[-1].startswith("fine-tune: 1335/1335 step") and "val=0.9" in lines[-1]


def test_short_transient_loop_writes_nothing_and_iteration_works():
    stream = io.StringIO()
    out = list(progress_bar(range(50), desc="bench", leave=False, file=stream))
    assert out == list(range(50)) and stream.getvalue() == ""


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with progress_bar(total=10, desc="x", disable=True, file=stream, interval_s=0.0) as bar:
        for _ in range(10):
            bar.update(1)
    assert stream.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(total=3, desc="t", file=Tty())
    assert type(bar).__name__ == "tqdm" or "tqdm" in type(bar).__mro__[1].__name__
    bar.close()


def test_cuda_home_warning_is_filtered_other_warnings_kept():
    filter_third_party_noise()
    filter_third_party_noise()  # idempotent
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert sum(isinstance(f, MessageFilter) for f in logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


def test_nncf_info_chatter_is_dropped_warnings_kept():
    filter_third_party_noise()
    logger = logging.getLogger("nncf")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("Not adding activation input quantizer for operation: 1 conv")
        logger.warning("a real warning")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert seen == ["a real warning"]


NNCF_TRACK = """
import sys
from nncf.common.logging.track_progress import track
if sys.argv[1] == "quiet":
    from edgeprune.progress import quiet_nncf_progress_off_terminal
    assert quiet_nncf_progress_off_terminal()
assert list(track(range(5), description="Statistics collection")) == list(range(5))
"""


def test_nncf_progress_bars_stay_out_of_a_ci_log():
    """Off a terminal rich prints each finished NNCF bar as a line; edgeprune turns them off there."""
    import subprocess
    import sys

    pytest.importorskip("nncf")
    out = {mode: subprocess.run([sys.executable, "-c", NNCF_TRACK, mode], capture_output=True, text=True, timeout=120)
           for mode in ("plain", "quiet")}
    assert all(r.returncode == 0 for r in out.values()), {m: r.stderr[-500:] for m, r in out.items()}
    assert "Statistics collection" in out["plain"].stdout  # what a CI log got before
    assert "Statistics collection" not in out["quiet"].stdout + out["quiet"].stderr
