"""ONNX export, checker and parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ExportError
from edgeprune.export import compare_outputs, export_onnx, onnx_parity, run_batched


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_export_and_parity(tiny_model, tmp_path, exporter):
    x = torch.randn(20, 1, 16, 16)
    path = export_onnx(tiny_model, x[:1], tmp_path / "m.onnx", exporter=exporter, opset=18)
    parity = onnx_parity(path, tiny_model, x)
    assert parity.max_abs_diff < 1e-4 and parity.top1_agreement == 1.0 and parity.n_images == 20
    assert not list(tmp_path.glob("*.tmp"))


def test_parity_failure_is_reported(tiny_model, tmp_path):
    x = torch.randn(8, 1, 16, 16)
    path = export_onnx(tiny_model, x[:1], tmp_path / "m.onnx")
    other = type(tiny_model)().eval()  # different random weights
    with pytest.raises(ExportError, match="parity failed"):
        onnx_parity(path, other, x)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_failure_leaves_nothing(tmp_path, exporter):
    class Bad(torch.nn.Module):  # eigvals has no ONNX operator
        def forward(self, x):
            return torch.linalg.eigvals(x[0, 0]).real

    with pytest.raises(ExportError, match="export of Bad failed"):
        export_onnx(Bad(), torch.randn(1, 1, 4, 4), tmp_path / "bad.onnx", exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_compare_and_run_batched_pads_static_batches():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    p = compare_outputs(ref, ref + 0.5)
    assert p.max_abs_diff == pytest.approx(0.5) and p.top1_agreement == 1.0
    seen = []
    out = run_batched(lambda x: (seen.append(len(x)), x.reshape(len(x), -1))[1], np.ones((5, 1, 2, 2), np.float32), 2)
    assert out.shape == (5, 4) and seen == [2, 2, 2]
