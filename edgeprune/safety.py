"""Safe handling of what users hand us: names that become paths, JSON read back from disk,
output locations, and files written so that a crash never leaves half of one.

- :func:`safe_component`: a run or target name is one path component (no ``..``, no ``/``).
- :func:`read_json`: a JSON object from a file, or a DataError naming the file and the problem.
- :func:`check_writable`: fail before any work when an output cannot be created.
- :func:`atomic_write` / :func:`atomic_path`: write to a temporary sibling, then rename.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .errors import ConfigError, DataError

_BAD_CHARS = ("/", "\\", "\x00")


def _file_mode() -> int:
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def safe_component(name: str, what: str = "name") -> str:
    """``name`` if it is a single, ordinary path component; else ConfigError."""
    text = str(name)
    if not text.strip() or text in (".", "..") or any(c in text for c in _BAD_CHARS):
        raise ConfigError(f"{what} {text!r} is not a single folder name",
                          hint="use letters, digits, '-', '_' or '.', without '/' or '..'")
    return text


def read_json(path: Path, what: str = "file", *, keys: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path``; DataError when missing, not UTF-8, not JSON, not an object,
    or lacking one of ``keys``."""
    p = Path(path)
    hint = f"the {what} is damaged; recreate it (or remove it to start over)"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} {p} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {p} is not valid JSON: {exc}", hint=hint) from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {p}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} {p} must hold a JSON object, found {type(data).__name__}", hint=hint)
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(f"{what} {p} lacks the key(s) {', '.join(missing)}", hint=hint)
    return data


def check_writable(path: Path, what: str = "output", *, folder: bool = True) -> Path:
    """Fail (ConfigError) unless ``path`` (a folder, or a file when ``folder`` is False) can be created
    or written. Nothing is left behind: the probe file is removed at once."""
    p = Path(path)
    if p.exists() and folder and not p.is_dir():
        raise ConfigError(f"{what} {p} is a file, but a folder is needed there")
    if p.exists() and not folder and p.is_dir():
        raise ConfigError(f"{what} {p} is a folder, but a file is needed there")
    anchor = p if p.is_dir() else p.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise ConfigError(f"cannot create {what} {p}: {anchor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgeprune-probe-", dir=anchor)
    except OSError as exc:
        raise ConfigError(f"cannot write {what} {p}: {anchor} is not writable ({exc.strerror or exc})",
                          hint="choose an output location you can write to") from None
    os.close(fd)
    os.unlink(probe)
    return p


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes, *, encoding: Optional[str] = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically (readers see the old file or the whole new one)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return Path(path)
