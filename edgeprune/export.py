"""ONNX export, then onnx.checker, then parity against PyTorch on held-out images (timm-style)."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .backends.base import run_batched  # noqa: F401 - re-exported: torch-free home for the box
from .config import Exporter, choices
from .errors import ExportError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTERS = choices(Exporter)


@dataclass
class Parity:
    max_abs_diff: float
    rel_max_abs_diff: float  # max abs diff / max |reference output|
    top1_agreement: float
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int = 17,
                dynamic_batch: bool = True, exporter: str = "torchscript") -> Path:
    """Export ``model`` (eval mode, CPU) to ``path``, written atomically, and run onnx.checker."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    model = model.eval().cpu()
    example = example.cpu()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dyn = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dyn,
                                  external_data=False)
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                                  do_constant_folding=True)
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {type(model).__name__} failed ({exporter}, opset {opset}): {exc}",
                          hint=f"try the other exporter ({', '.join(EXPORTERS)}) or another opset") from exc
    os.replace(tmp, path)
    return path


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Both (N, K) logits."""
    if reference.shape != candidate.shape:
        raise ExportError(f"output shape {candidate.shape} differs from the reference {reference.shape}")
    diff = float(np.max(np.abs(reference - candidate))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) or 1.0
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0
    return Parity(diff, diff / scale, agree, len(reference))


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model = model.eval().cpu()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def onnx_parity(path: Path, model: nn.Module, images: torch.Tensor, *, max_rel_diff: float = 1e-3,
                min_top1_agreement: float = 0.995, batch_size: Optional[int] = 64) -> Parity:
    """ONNX Runtime (CPU) against PyTorch on ``images``; raises ExportError beyond the tolerances."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = torch_logits(model, images)
    fixed = sess.get_inputs()[0].shape[0]
    bs = fixed if isinstance(fixed, int) else (batch_size or len(images))
    got = run_batched(lambda x: sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0], images.numpy(), bs)
    parity = compare_outputs(ref, got)
    if parity.rel_max_abs_diff > max_rel_diff or parity.top1_agreement < min_top1_agreement:
        raise ExportError(
            f"ONNX parity failed for {path}: max abs diff {parity.max_abs_diff:.3g} "
            f"({parity.rel_max_abs_diff:.3g} of the output scale, allowed {max_rel_diff:g}), "
            f"top-1 agreement {parity.top1_agreement:.4f} (required {min_top1_agreement})")
    return parity


# ----------------------------------------------------------------------------- checks of a given ONNX


def check_onnx_file(path: Path):
    """The parsed ONNX model at ``path``; ExportError when it is missing, empty, truncated or not ONNX."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"ONNX file not found: {p}")
    size = p.stat().st_size
    if size == 0:
        raise ExportError(f"{p} is empty (0 bytes), not an ONNX model", hint="export it again (`edgeprune export`)")
    external: set[str] = set()
    try:
        model = onnx.load(str(p), load_external_data=False)
        external = {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for kv in t.external_data if kv.key == "location"}
        # with external data the checker needs the file's path: it finds the data files next to it
        onnx.checker.check_model(str(p) if external else model)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if external:
            raise ExportError(f"{p} keeps its weights in external data ({', '.join(sorted(external))}), which is "
                              f"missing, unreadable or outside its folder: {first}",
                              hint="keep the data file(s) the exporter wrote in the same folder as the .onnx") from None
        raise ExportError(f"{p} ({size} bytes) is not a valid ONNX model (truncated or another format?): {first}",
                          hint="export it again (`edgeprune export`)") from None
    if not model.graph.node:
        raise ExportError(f"{p} holds an ONNX model without any operator")
    return model


def check_onnx_input(model, path: Path, *, shape: Optional[tuple[int, int, int]], batch_size: int,
                     dynamic_batch: bool, source: str = "the preprocessing") -> tuple[Optional[int], ...]:
    """The ONNX image input is (N, C, H, W) with C, H, W = ``shape`` (from ``source``; not checked when
    None), and its batch
    dimension fits the target: symbolic for a dynamic-batch target, else symbolic or ``batch_size``.
    Returns the input's (C, H, W), None where symbolic."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ExportError(f"{path} has {len(inputs)} inputs ({[i.name for i in inputs]}); edgeprune expects one "
                          "image input (N, C, H, W)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    shown = "x".join("N" if d is None else str(d) for d in dims)
    if len(dims) != 4:
        raise ExportError(f"{path}: input {inputs[0].name!r} is {shown}, not a 4-D image batch (N, C, H, W)")
    if shape is not None and any(d is not None and d != want for d, want in zip(dims[1:], shape)):
        raise ExportError(f"{path}: input {inputs[0].name!r} is {shown}, but {source} gives "
                          f"{'x'.join(map(str, shape))} (C, H, W)",
                          hint="pass --config with data.preprocessing (channels, height, width) matching the model")
    batch = dims[0]
    if batch is not None and (dynamic_batch or batch != batch_size):
        want = "a dynamic batch" if dynamic_batch else f"batch {batch_size}"
        raise ExportError(f"{path} has a static batch of {batch}, but the target needs {want}",
                          hint="export with --dynamic-batch, or with the target's batch size")
    return tuple(dims[1:])
