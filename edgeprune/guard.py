"""The last line of defence in the CLI: an unexpected exception becomes one line.

The pipeline tells the guard which stage runs and where its run folder is (:func:`at_stage`).
When something that is not an :class:`~edgeprune.errors.EdgePruneError` escapes, the full
traceback is saved in the run folder (or a temporary file when there is none) and the user sees
one line naming the stage, the error and that file; the exit code is 1.
"""
from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Optional

TRACEBACK_FILE = "traceback.txt"
EXIT_CODE = 1
_where: dict[str, Optional[object]] = {"stage": None, "run_dir": None}


def at_stage(stage: str, run_dir: Optional[Path] = None) -> None:
    """Record the stage now running (and the run folder, once there is one)."""
    _where["stage"] = stage
    if run_dir is not None:
        _where["run_dir"] = Path(run_dir)


def reset(stage: Optional[str] = None) -> None:
    _where.update(stage=stage, run_dir=None)


def save_traceback(exc: BaseException) -> Optional[Path]:
    """The file the traceback went to (the run folder, else a temporary file); None when neither could be
    written (no file is left half-written)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    run_dir = _where["run_dir"]
    if isinstance(run_dir, Path) and run_dir.is_dir():
        path = (run_dir / TRACEBACK_FILE).resolve()
        try:
            path.write_text(text)
            return path
        except OSError:
            path.unlink(missing_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix="edgeprune-traceback-", suffix=".txt")
    except OSError:
        return None
    try:
        with open(fd, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        Path(name).unlink(missing_ok=True)
        return None


def crash_line(exc: BaseException) -> str:
    """``unexpected <Type> during <stage>: <message>; full traceback in <file>``."""
    path = save_traceback(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    stage = _where["stage"] or "start-up"
    where = f"full traceback in {path}" if path else "the traceback could not be saved"
    return (f"unexpected {type(exc).__name__} during {stage}: {first or '(no message)'} "
            f"(a bug, or an input edgeprune does not check yet; {where})")
