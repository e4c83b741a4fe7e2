"""Calibration arrays for INT8: checks (size, shape), a summary recorded in the artifact, batching.

The caller passes the calibration images as float32 (N, C, H, W), already normalized exactly as
the model's input. A set that is too small or not shaped like the ONNX input is refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import CompileError, DataError

DEFAULT_MIN_CALIBRATION = 32


def onnx_input(onnx_path: Path) -> tuple[str, list[Optional[int]]]:
    """Name and dims of the (single) graph input; symbolic dims are None."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CompileError(f"{onnx_path} has {len(inputs)} inputs ({[i.name for i in inputs]}); edgeprune expects one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else None for d in dims]


def min_calibration(target: TargetConfig) -> int:
    return int(target.options.get("min_calibration", DEFAULT_MIN_CALIBRATION))


def check_calibration(calibration: Optional[np.ndarray], *, input_dims: list[Optional[int]], target: TargetConfig,
                      precision: Precision) -> np.ndarray:
    """Refuse a missing, too-small or wrong-shaped set for INT8; return it as float32 (N, C, H, W).
    Other precisions use no calibration: an empty (0, C, H, W)-less array comes back, whatever was given."""
    if precision != Precision.int8:
        return np.empty((0,), dtype=np.float32)
    if calibration is None:
        raise DataError(f"INT8 for target {target.name!r} needs a calibration set; none was given",
                        hint="pass calibration images (N, C, H, W), normalized like the model input")
    x = np.asarray(calibration)
    if x.ndim != 4:
        raise DataError(f"calibration array must be (N, C, H, W), got shape {x.shape}")
    want = tuple(input_dims[1:])
    got = tuple(x.shape[1:])
    if len(want) != 3 or any(w is not None and w != g for w, g in zip(want, got)):
        raise DataError(f"calibration images are {got} (C, H, W) but the ONNX input is {tuple(input_dims)}",
                        hint="preprocess the calibration set exactly like the model input")
    need = min_calibration(target)
    if len(x) < need:
        raise DataError(
            f"calibration set has {len(x)} images; INT8 for target {target.name!r} needs at least {need}",
            hint="add images, or set options.min_calibration in the target YAML to accept fewer",
        )
    if not np.isfinite(x).all():
        raise DataError("calibration array holds NaN or inf values")
    return np.ascontiguousarray(x, dtype=np.float32)


def calibration_summary(x: Optional[np.ndarray]) -> Optional[dict[str, Any]]:
    if x is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    return {"count": int(len(x)), "shape": list(x.shape[1:]), "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "mean": float(x.mean()), "std": float(x.std())}


def batches(x: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """(N, C, H, W) -> chunks (batch, C, H, W); a short last chunk is dropped unless it is the only one."""
    n_full = len(x) // batch
    if n_full == 0:
        yield x
        return
    for i in range(n_full):
        yield x[i * batch : (i + 1) * batch]


def static_batch(input_dims: list[Optional[int]]) -> Optional[int]:
    """The ONNX input's batch size when it is fixed, else None."""
    return input_dims[0] if input_dims and input_dims[0] else None


def make_ort_reader(x: np.ndarray, *, input_name: str, batch: int):
    """An onnxruntime CalibrationDataReader over the calibration array."""
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches(x, batch))

        def get_next(self):
            chunk = next(self._it, None)
            return None if chunk is None else {input_name: chunk}

        def rewind(self) -> None:
            self._it = iter(batches(x, batch))

    return ArrayCalibrationReader()
