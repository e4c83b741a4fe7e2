"""Deployment bundle: what ships to the box, with a manifest that proves it is intact.

Layout of ``<run>-bundle/`` (and the same inside ``<run>-bundle.tar.gz``)::

    manifest.json            sha256 + size of every other file, versions, input spec, classes, config
    model.onnx               the pruned, fine-tuned FP32 ONNX (source of every artifact)
    config.yaml              the exact pipeline config of the run
    artifacts/<target>/<precision>/...   compiled artifacts, one folder per target and precision
    report.json / report.md / report.html

``edgeprune verify BUNDLE`` recomputes every hash.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .errors import DataError
from .safety import atomic_path, atomic_write, check_writable

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RUN_FILES = ("model.onnx", "config.yaml", "report.json", "report.md", "report.html")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def make_bundle(run_dir: Path, out: Optional[Path] = None) -> tuple[Path, Path]:
    """Copy a finished run's shippable files into a folder, write its manifest, and tar.gz it."""
    run_dir = Path(run_dir)
    report = _read_report(run_dir)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-bundle"
    tar_path = out.with_name(out.name + ".tar.gz")
    check_writable(out, "bundle output")
    for p in (out, tar_path):
        if p.exists():
            raise DataError(f"bundle output {p} already exists", hint="remove it or pass another --out")
    out.mkdir(parents=True)
    try:
        _copy_run_files(run_dir, out)
        atomic_write(out / MANIFEST, json.dumps(build_manifest(out, report), indent=1, default=str))
        _make_tar(out, tar_path)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        tar_path.unlink(missing_ok=True)
        raise
    return out, tar_path


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a finished run directory: report.json is missing",
                        hint="run `edgeprune run` first, or pass the run folder (not a .partial one)")
    from .report_model import validate_report
    from .safety import read_json

    report = read_json(path, "run report")
    validate_report(report, str(path))  # a key of the wrong type is named here, not met as a crash later
    return report


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` when it is a mapping, else empty (free-form parts of a report, e.g. the config it records)."""
    return value if isinstance(value, dict) else {}


def _copy_run_files(run_dir: Path, out: Path) -> None:
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    if (run_dir / "artifacts").is_dir():
        shutil.copytree(run_dir / "artifacts", out / "artifacts")


def build_manifest(folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    from . import __version__
    from .envinfo import runtime_versions

    run = _mapping(report.get("run"))
    cfg = _mapping(run.get("config"))
    data_cfg = _mapping(cfg.get("data"))
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgeprune_version": __version__,
        "tool_versions": runtime_versions(),
        "run": {k: v for k, v in run.items() if k != "config"},
        "input": {"preprocessing": data_cfg.get("preprocessing"), "layout": "NCHW", "dtype": "float32",
                  "export": {k: v for k, v in _mapping(report.get("export")).items() if k != "parity"}},
        "class_names": data_cfg.get("class_names") or report.get("class_names"),
        "calibration": report.get("calibration"),
        "artifacts": [_artifact_entry(a) for a in report.get("artifacts") or []],
        "config": cfg,
        "targets_config": run.get("targets_config"),
        "files": file_hashes(folder),
    }


def _artifact_entry(a: dict[str, Any]) -> dict[str, Any]:
    keys = ("target", "backend", "device", "precision", "path", "size_bytes", "status", "accuracy", "latency_ms")
    entry = {k: a.get(k) for k in keys}
    entry["runtime_versions"] = _mapping(a.get("env")).get("runtimes")
    return entry


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "size"}}`` for every file under ``folder`` but the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def _make_tar(folder: Path, tar_path: Path) -> None:
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


# ----------------------------------------------------------------------------- verify


def verify_bundle(path: Path) -> list[str]:
    """Recompute every hash in the manifest; raise DataError naming each bad file; return the files."""
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path)
    if path.is_file() and tarfile.is_tarfile(path):
        with tempfile.TemporaryDirectory(prefix="edgeprune-verify-") as tmp:
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.FilterError as exc:  # "../" or absolute member names, links out of the folder
                raise DataError(f"refusing to unpack bundle {path}: {exc}; an edgeprune bundle has none",
                                hint="this archive was not written by `edgeprune bundle`; do not unpack it") from None
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(f"bundle {path} is a damaged archive: {exc}",
                                hint="copy it again from where `edgeprune bundle` wrote it") from None
            roots = [p for p in Path(tmp).iterdir()]
            folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(tmp)
            return _verify_folder(folder)
    raise DataError(f"bundle not found or not a folder / tar.gz: {path}")


def _verify_folder(folder: Path) -> list[str]:
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{folder} has no {MANIFEST}; not an edgeprune bundle")
    from .safety import read_json

    listed = read_json(mpath, "bundle manifest", keys=("files",))["files"]
    if not isinstance(listed, dict) or not all(isinstance(e, dict) for e in listed.values()):
        raise DataError(f"bundle manifest {mpath} is malformed: 'files' must map each path to its sha256 and size",
                        hint="the manifest is damaged; make the bundle again (`edgeprune bundle`)")
    problems = _compare(folder, listed)
    if problems:
        raise DataError(f"bundle {folder} failed verification ({len(problems)} problem(s)):\n  "
                        + "\n  ".join(problems))
    return sorted(listed)


def _compare(folder: Path, listed: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for rel, entry in sorted(listed.items()):
        p = folder / rel
        if not p.resolve().is_relative_to(folder.resolve()):
            problems.append(f"outside the bundle: {rel}")
        elif not p.is_file():
            problems.append(f"missing: {rel}")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"sha256 mismatch: {rel}")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems += [f"not in manifest: {rel}" for rel in sorted(present - set(listed))]
    return problems
