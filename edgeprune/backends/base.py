"""One small base class for every runtime: compile an ONNX for a target, load it, run it.

A backend module imports its runtime only inside functions (see :func:`require`), so importing
``edgeprune.backends`` costs nothing and a missing runtime fails only when it is used, with the
package to install in the message.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Protocol

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import BackendUnavailableError, CompileError, DataError

ARTIFACT_JSON = "artifact.json"


@dataclass
class CompiledArtifact:
    """What a backend produced for one target and precision."""

    target: str
    backend: str
    precision: str
    device: str
    path: Path  # the main file (model.onnx, model.xml, model.engine)
    files: list[Path] = field(default_factory=list)  # every file of the artifact (e.g. .xml + .bin)
    meta: dict[str, Any] = field(default_factory=dict)  # runtime version, calibration summary, options

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["files"] = [str(p) for p in self.files]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompiledArtifact":
        return cls(target=d["target"], backend=d["backend"], precision=d["precision"], device=d["device"],
                   path=Path(d["path"]), files=[Path(p) for p in d.get("files", [])], meta=dict(d.get("meta", {})))

    def save(self, path: Optional[Path] = None) -> Path:
        """Write ``artifact.json`` next to the main file (or to ``path``), atomically; file paths in it
        are relative to its folder, so the folder can be moved and benchmarked from anywhere."""
        from ..safety import atomic_write

        out = Path(path) if path else Path(self.path).parent / ARTIFACT_JSON
        d = self.to_dict()
        d["path"] = _relative_to(self.path, out.parent)
        d["files"] = [_relative_to(p, out.parent) for p in self.files]
        atomic_write(out, json.dumps(d, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: Path) -> "CompiledArtifact":
        """Read ``artifact.json``; DataError when it is damaged. Paths are taken relative to its folder
        (older files with absolute or working-directory-relative paths still load)."""
        from ..safety import read_json

        p = Path(path)
        p = p / ARTIFACT_JSON if p.is_dir() else p
        d = read_json(p, "artifact file", keys=("target", "backend", "precision", "device", "path"))
        if not isinstance(d.get("files", []), list):
            raise DataError(f"artifact file {p}: 'files' must be a list of paths")
        d = {**d, "path": _resolve_from(d["path"], p.parent),
             "files": [_resolve_from(f, p.parent) for f in d.get("files", [])]}
        return cls.from_dict(d)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())

    def move_to(self, home: Path) -> "CompiledArtifact":
        """Move this artifact's folder to ``home`` (replacing whatever is there) and rewrite its paths."""
        src = Path(self.path).parent
        shutil.rmtree(home, ignore_errors=True)
        Path(home).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, home)
        self.path = Path(home) / Path(self.path).name
        self.files = [Path(home) / Path(f).name for f in self.files]
        return self


def _relative_to(path: Path | str, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else absolute."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p.relative_to(f).as_posix() if p.is_relative_to(f) else str(p)


def _resolve_from(value: str, folder: Path) -> str:
    p = Path(str(value))
    if p.is_absolute():
        return str(p)
    here = folder / p
    return str(here) if here.exists() or not p.exists() else str(p)  # old files: relative to the cwd


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 normalized -> (N, K) logits float32."""
        ...


class Backend(ABC):
    """A runtime. Subclasses set ``name``, ``precisions``, ``requires`` and ``default_device``."""

    name: str = ""
    precisions: tuple[Precision, ...] = ()
    requires: str = ""  # pip extra / package to install
    default_device: str = "CPU"

    # ------------------------------------------------------------------ what is available here
    @abstractmethod
    def _probe(self) -> tuple[bool, str]:
        """(ok, reason) after importing the runtime; no exception."""

    def available(self) -> tuple[bool, str]:
        try:
            return self._probe()
        except BackendUnavailableError as exc:
            return False, exc.message

    def version(self) -> Optional[str]:
        return None

    def devices(self) -> list[str]:
        return []

    def supports(self, precision: Precision, device: str) -> tuple[bool, str]:
        """Whether ``precision`` can be compiled and run on ``device`` on this machine."""
        ok, why = self.available()
        if not ok:
            return False, why
        if precision not in self.precisions:
            valid = ", ".join(p.value for p in self.precisions)
            return False, f"{self.name} does not build {precision.value}; valid: {valid}"
        return self._supports_device(precision, device)

    def _supports_device(self, precision: Precision, device: str) -> tuple[bool, str]:
        devs = self.devices()
        if device not in devs:
            return False, f"{self.name} device {device!r} is not available here; available: {', '.join(devs) or '(none)'}"
        return True, ""

    # ------------------------------------------------------------------ compile / load
    @abstractmethod
    def compile(self, onnx_path: Path, out_dir: Path, *, target: TargetConfig, precision: Precision,
                calibration: np.ndarray | None = None) -> CompiledArtifact:
        """Build the artifact for ``target`` at ``precision`` into ``out_dir``."""

    @abstractmethod
    def load(self, artifact: CompiledArtifact, *, target: TargetConfig) -> Runner:
        """A callable running the artifact on ``target.device``."""

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_precision(self, precision: Precision) -> None:
        if precision not in self.precisions:
            valid = ", ".join(p.value for p in self.precisions)
            raise CompileError(f"{self.name} cannot build precision {precision.value!r}; valid: {valid}")

    def _artifact(self, *, target: TargetConfig, precision: Precision, path: Path, files: list[Path],
                  meta: dict[str, Any]) -> CompiledArtifact:
        art = CompiledArtifact(target=target.name, backend=self.name, precision=precision.value,
                               device=target.device, path=path, files=files,
                               meta={"runtime_version": self.version(), **meta})
        art.save()
        return art


def require(module: str, *, backend: str, package: str) -> ModuleType:
    """Import an optional runtime, or fail naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {backend!r} needs the Python package {package!r}, which is not installed ({exc})",
            hint=f"pip install {package}  (or: pip install 'edgeprune[{backend}]')",
        ) from exc


def prepare_out_dir(out_dir: Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_onnx(onnx_path: Path, dest: Path) -> Path:
    """Copy the ONNX (and external data, if any) to ``dest`` as one self-contained file."""
    onnx = require("onnx", backend="onnx", package="onnx")
    src = Path(onnx_path)
    if not src.is_file():
        raise CompileError(f"ONNX file not found: {src}")
    model = onnx.load(str(src))
    if model.ByteSize() < 1_800_000_000:
        onnx.save(model, str(dest))
    else:
        shutil.copy(src, dest)
    return dest


def run_in_batches(infer: Callable[[np.ndarray], np.ndarray], x: np.ndarray, fixed_batch: Optional[int],
                   max_batch: Optional[int] = None) -> np.ndarray:
    """Run ``infer`` over ``x`` (N, C, H, W) in chunks; pad the last chunk to a static batch size."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    step = fixed_batch or max_batch or len(x)
    if len(x) <= step and (fixed_batch is None or len(x) == fixed_batch):
        return np.asarray(infer(x), dtype=np.float32)
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]  # (b, C, H, W), b <= step
        n = len(chunk)
        if fixed_batch and n < fixed_batch:
            pad = np.zeros((fixed_batch - n, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])  # (fixed_batch, C, H, W)
        outs.append(np.asarray(infer(chunk), dtype=np.float32)[:n])
    return np.concatenate(outs)  # (N, K)


def run_batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run a runner over (N, C, H, W) in batches of ``batch_size`` (the last one padded if needed)."""
    outs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        n = len(chunk)
        if n < batch_size:  # static-batch artifacts need full batches
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        outs.append(np.asarray(fn(np.ascontiguousarray(chunk, dtype=np.float32)))[:n])
    return np.concatenate(outs)
