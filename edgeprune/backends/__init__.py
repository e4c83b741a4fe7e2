"""Runtimes that compile an ONNX for a target: one module per runtime, registered by name.

Each registry entry is a small factory that imports its module only when called, so importing
``edgeprune.backends`` imports no runtime (onnxruntime, openvino, nncf, tensorrt).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..registry import Registry
from .base import Backend, CompiledArtifact, Runner

__all__ = ["BACKENDS", "Backend", "CompiledArtifact", "Runner", "get_backend", "doctor"]

BACKENDS: Registry[Callable[[], Backend]] = Registry("backend")


def _lazy(module: str, cls: str) -> Callable[[], Backend]:
    def factory() -> Backend:
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()

    factory.__doc__ = f"{__name__}.{module}.{cls}"
    return factory


BACKENDS.add("onnxruntime", _lazy("onnxruntime_backend", "OnnxRuntimeBackend"),
             help="ONNX Runtime (any execution provider): fp32, fp16, int8 QDQ")
BACKENDS.add("openvino", _lazy("openvino_backend", "OpenVINOBackend"),
             help="OpenVINO IR for Intel CPU/GPU/NPU: fp32, fp16, int8 (NNCF)")
BACKENDS.add("tensorrt", _lazy("tensorrt_backend", "TensorRTBackend"),
             help="NVIDIA TensorRT engines for a GPU or Jetson DLA: fp16, int8")


def get_backend(name: str) -> Backend:
    """A backend instance by name; an unknown name fails listing the valid ones."""
    return BACKENDS.get(str(getattr(name, "value", name)))()


def doctor() -> list[dict[str, Any]]:
    """Per backend: installed?, version, devices, and the precisions each device can run here."""
    rows = []
    for name in BACKENDS.names():
        backend = get_backend(name)
        ok, why = backend.available()
        devices = backend.devices() if ok else []
        precisions = {d: [p.value for p in backend.precisions if backend.supports(p, d)[0]] for d in devices}
        rows.append({"backend": name, "installed": ok, "reason": why, "version": backend.version() if ok else None,
                     "requires": backend.requires, "devices": devices, "precisions": precisions})
    return rows

