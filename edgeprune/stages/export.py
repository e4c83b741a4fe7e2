"""Export stage: the fine-tuned model to ONNX (``export.*``), onnx.checker, then parity against PyTorch
on held-out images with the config's tolerances."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..context import RunContext
from ..export import Parity
from ..report_model import ExportSection


@dataclass
class ExportInput:
    model: torch.nn.Module
    images: torch.Tensor  # (N, C, H, W) held-out inputs: the first traces, the first export.parity_images check
    path: Optional[Path] = None  # default ctx.dir / "model.onnx"


@dataclass
class ExportOutput:
    path: Path
    parity: Parity


def run(ctx: RunContext, inp: ExportInput) -> ExportOutput:
    """Write the ONNX file, check it and its parity; the report's ``export`` section."""
    from ..export import export_onnx, onnx_parity

    ec = ctx.cfg.export
    path = inp.path or ctx.dir / "model.onnx"
    export_onnx(inp.model, inp.images[:1], path, opset=ec.opset, dynamic_batch=ec.dynamic_batch,
                exporter=ec.exporter)
    parity = onnx_parity(path, inp.model, inp.images[: ec.parity_images], max_rel_diff=ec.max_rel_diff,
                         min_top1_agreement=ec.min_top1_agreement)
    shown = path.relative_to(ctx.dir) if path.is_relative_to(ctx.dir) else path
    ctx.report["export"] = ExportSection(path=str(shown), opset=ec.opset, exporter=ec.exporter,
                                         size_bytes=path.stat().st_size, parity=parity.to_dict()).dump()
    return ExportOutput(path, parity)
