"""Export a task model to ONNX, compile it per target and precision, and run the artifact.

- Export: the task's export view (segmentation: logits; detection: the whole torchvision detector,
  transform, anchors, box decoding and NMS included, giving ``boxes``, ``scores``, ``labels``) with
  the TorchScript exporter at the config's opset (17 by default), then ``onnx.checker``. Detection
  is exported with a **fixed** input (batch 1, the data's H x W): torchvision's detection
  post-processing traces its sizes into the graph, and a dynamic H, W is not attempted here.
- Compile: the existing backends (:func:`edgeprune.backends.get_backend`). For detection INT8, the
  post-processing (every op outside the backbone and the heads, see
  :data:`edgeprune.tasks.det_ops.QUANTIZED_PREFIXES`) is kept in float: ORT ``nodes_to_exclude``,
  NNCF ``ignored_scope``, merged with an INT8 ladder rung's own exclusions (:mod:`edgeprune.tasks.int8`).
- Run: the backends' own runners return the first output only, so the artifact is run here with
  the same runtime session / compiled model, returning every output in order.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..backends import CompiledArtifact, get_backend
from ..config import Precision, TargetConfig
from ..errors import CompileError, ExportError

INPUT_NAME = "input"


def export_task_onnx(view: nn.Module, example: torch.Tensor, path: Path, output_names: tuple[str, ...], *,
                     opset: int = 17) -> Path:
    """Export ``view`` on ``example`` (1, C, H, W), fixed shapes, written atomically; onnx.checker run."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(view.eval().cpu(), (example.cpu(),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(output_names), do_constant_folding=True)
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {type(view).__name__} failed (opset {opset}): {exc}") from exc
    os.replace(tmp, path)
    return path


def op_names(onnx_path: Path, backend: str) -> list[tuple[str, str]]:
    """(name, type) of every op in graph order, as the backend's quantizer names them (OpenVINO: the
    converted model's friendly names, Parameter / Result / Constant left out; otherwise ONNX nodes)."""
    if backend == "openvino":
        import openvino as ov

        ops = ov.convert_model(str(onnx_path)).get_ordered_ops()
        return [(op.get_friendly_name(), op.get_type_name()) for op in ops
                if op.get_type_name() not in ("Parameter", "Result", "Constant")]
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.name]


def float_scope(onnx_path: Path, backend: str, kind: str) -> list[str]:
    """Names of the ops to keep in float in an INT8 detector (empty for other models)."""
    from .det_ops import QUANTIZED_PREFIXES

    keep = QUANTIZED_PREFIXES.get(kind)
    if keep is None:
        return []
    return [n for n, _ in op_names(onnx_path, backend) if n.startswith("/model/") and not n.startswith(keep)]


def merge_options(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` on top of ``base``; list values (names kept in float) are united, ``base``'s first."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, (list, tuple)) and isinstance(out.get(key), (list, tuple)):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        else:
            out[key] = value
    return out


def compile_artifact(onnx_path: Path, out_dir: Path, *, target: TargetConfig, precision: Precision,
                     calibration: Optional[np.ndarray], kind: str,
                     overrides: Optional[dict[str, Any]] = None) -> CompiledArtifact:
    """Compile one artifact. INT8: ``overrides`` (an INT8 ladder rung's options) on top of the target's
    options, and for a detector the post-processing float scope merged into the rung's exclusions."""
    backend = get_backend(target.backend.value)
    if precision == Precision.int8:
        options = merge_options(target.options, overrides or {})
        names = float_scope(onnx_path, backend.name, kind)
        if names:
            exclude = getattr(backend, "exclude_options", None)
            if exclude is None:
                raise CompileError(f"INT8 {kind} on {backend.name} needs ops kept in float, and the backend has no "
                                   "exclude_options", hint="use an onnxruntime or openvino target")
            options = merge_options(options, exclude(names))
        if names and backend.name == "openvino":
            # torchvision's batched NMS is scripted into an ONNX If; NNCF's full BiasCorrection refuses
            # models with If ("not supported for OpenVINO models with If operation"), the fast one runs
            options["fast_bias_correction"] = True
        target = target.model_copy(update={"options": options})
    return backend.compile(onnx_path, out_dir, target=target, precision=precision, calibration=calibration)


def load_runner(artifact: CompiledArtifact, target: TargetConfig) -> Callable[[np.ndarray], list[np.ndarray]]:
    """(1, C, H, W) float32 -> every output of the artifact, in order."""
    if artifact.backend == "openvino":
        from ..backends.openvino_backend import OpenVINOBackend, _ov

        core = _ov().Core()
        config = OpenVINOBackend()._config(core, target, Precision(artifact.precision))
        compiled = core.compile_model(str(artifact.path), target.device, config)

        def run_ov(x: np.ndarray) -> list[np.ndarray]:
            res = compiled(x)
            return [np.asarray(res[o]).copy() for o in compiled.outputs]

        return run_ov
    if artifact.backend == "onnxruntime":
        from ..backends.onnxruntime_backend import check_provider, session

        sess = session(Path(artifact.path), provider=check_provider(target.device), threads=target.threads,
                       optimization=str(target.options.get("graph_optimization", "all")))
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})
    raise ExportError(f"task artifacts run on onnxruntime or openvino; got {artifact.backend!r}")


def run_per_image(run: Callable[[np.ndarray], list[np.ndarray]], images: torch.Tensor) -> list[list[np.ndarray]]:
    """Each (C, H, W) image as a batch of one -> that image's outputs."""
    x = images.detach().cpu().numpy().astype(np.float32)
    return [run(x[i: i + 1]) for i in range(len(x))]
