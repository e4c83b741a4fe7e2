"""Calibration images for INT8 as the float32 (N, C, H, W) array the backends take.

Sources: a ``.npy`` array (already normalized) or an image folder read through
:func:`edgeprune.data.load_calibration` with the pipeline's preprocessing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import DataConfig
from .errors import DataError


def load_calibration_array(path: Optional[Path], *, data: DataConfig,
                           count: Optional[int] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(images (N, C, H, W) float32, summary with path, count and sha256). Size checks are the backend's."""
    src = Path(path) if path else data.calibration
    if src.suffix == ".npy":
        if not src.is_file():
            raise DataError(f"calibration array not found: {src}")
        x = np.load(src, allow_pickle=False)
        if count:
            x = x[:count]
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x, {"path": str(src), "count": int(len(x)), "source": "npy"}
    from .data import load_calibration

    cfg = data.model_copy(update={"calibration": src, "min_calibration": 1})
    calib = load_calibration(cfg, count)
    return calib.data.images.numpy().astype(np.float32), calib.summary()
