"""Safe handling of what users hand us: names that become paths, JSON read back from disk,
output locations, and files written so that a crash never leaves half of one.

- :func:`safe_component`: a run or target name is one path component (no ``..``, no ``/``).
- :func:`read_json`: a JSON object from a file, or a DataError naming the file and the problem.
- :func:`check_writable`: fail before any work when an output cannot be created.
- :func:`atomic_write` / :func:`atomic_path`: write to a temporary sibling, then rename; a full disk is
  a :class:`~edgeprune.errors.ResourceError` naming the folder, and the temporary file is removed.
- :func:`check_memory`: refuse a setting whose tensors cannot fit in this machine's memory.
- :class:`RunLock`: one process at a time in a run folder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .errors import ConfigError, DataError, ResourceError

_BAD_CHARS = ("/", "\\", "\x00")
NAME_MAX_BYTES = 200  # a run folder is <name>.partial and its bundle <name>-bundle.tar.gz: under 255 bytes


def _file_mode() -> int:
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def safe_component(name: str, what: str = "name") -> str:
    """``name`` if it is a single, ordinary path component; else ConfigError."""
    text = str(name)
    hint = "use letters, digits, '-', '_' or '.', without '/' or '..'"
    if (not text.strip() or text in (".", "..") or any(c in text for c in _BAD_CHARS)
            or any(ord(c) < 32 or ord(c) == 127 for c in text)):
        raise ConfigError(f"{what} {text!r} is not a single folder name (no '/', '..' or control characters such "
                          "as a newline or tab)", hint=hint)
    if len(text.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise ConfigError(f"{what} {text[:40]!r}... is {len(text.encode('utf-8', 'surrogateescape'))} bytes long; "
                          f"a folder name must stay under {NAME_MAX_BYTES} bytes", hint=hint)
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
    except RecursionError:
        raise DataError(f"{what} {p} is nested too deeply to be one of edgeprune's files", hint=hint) from None
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


# ----------------------------------------------------------------------------- a full disk

_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) says the disk or the quota is full: an OSError
    ENOSPC / EDQUOT, or a library's error carrying that text (safetensors writes through Rust)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(cur) for t in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def disk_full_error(folder: Path | str | None, *, clean: bool = False) -> ResourceError:
    """The one-line error for a full disk at ``folder`` (with the space left there); ``clean``: the failed
    write left nothing behind."""
    where = Path(folder) if folder else None
    free = ""
    with contextlib.suppress(OSError, TypeError):
        free = f" ({_bytes(shutil.disk_usage(where).free)} free)" if where else ""
    return ResourceError(f"no space left on {where or 'the device'}{free}"
                         f"{': the file being written was removed' if clean else ''}",
                         hint="free some space (or set output_dir elsewhere); an unfinished run carries on with "
                              "--resume")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed
    (a full disk becomes a ResourceError naming the folder)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield tmp
        os.replace(tmp, dest)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(dest.parent, clean=True) from exc
        raise
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


# ----------------------------------------------------------------------------- memory


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the least of the machine's available memory, the cgroup's
    limit less its usage and the address-space limit (ulimit -v) less what is mapped; None if unknown."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":  # the page cache counted in memory.current is reclaimed before the limit bites
            cache = next(int(line.split()[1]) for line in (cgroup / "memory.stat").read_text().splitlines()
                         if line.startswith("file "))
            found.append(int(limit) - int((cgroup / "memory.current").read_text()) + cache)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError):
            vm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize:"))
            found.append(soft - int(vm.split()[1]) * 1024)
    return max(min(found), 0) if found else None


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def check_memory(nbytes: float, what: str, *, setting: str) -> None:
    """ResourceError before allocating ``nbytes`` for ``what`` when this machine cannot hold them; ``setting``
    names what the user can lower."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise ResourceError(f"{what} needs {_bytes(nbytes)} of memory, and {_bytes(free)} is available here",
                            hint=f"lower {setting}")


def check_batch_memory(target: Any, chw: Iterable[int], what: str, batches: Iterable[int] = ()) -> None:
    """ResourceError when the largest batch ``target`` runs here (``batches``, else its batch_size, or
    max_batch_size when dynamic) of float32 inputs ``chw`` cannot fit in memory. Not for a remote target."""
    if getattr(target, "host", None) is not None:
        return
    largest = max(batches, default=target.max_batch_size if target.dynamic_batch else target.batch_size)
    shape = tuple(int(d) for d in chw)
    per_image = 4 * math.prod(shape)
    check_memory(largest * per_image, f"{what}: a batch of {largest:,} inputs of {'x'.join(map(str, shape))} "
                 f"float32", setting=f"batch_size / max_batch_size of target {target.name!r} (or bench.batch_sizes)")


# ----------------------------------------------------------------------------- one process per run folder


class RunLock:
    """An exclusive lock on ``path`` (``<run>.lock`` beside the run folder) for the life of a run.

    The lock is ``fcntl.flock`` on the file, so the kernel drops it when its process dies; the file holds the
    owner's pid for the message a second process gets. A file left by a process that died is taken over
    with a notice. :meth:`release` removes the file.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ResourceError(f"{self.what} is in use by another edgeprune process (pid {owner})",
                                    hint="wait until it ends, or choose another --name") from None
            try:  # the holder before us may have removed the file between our open and flock: lock the new one
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        left = os.read(fd, 32).decode(errors="replace").strip()
        if left:
            print(f"note: taking over the lock of {self.what} left by pid {left}, which is no longer running",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None
