"""The bundled MobileNet-style model: builds, has depthwise convs and the expected output, prunes to
2x MACs with torch-pruning (depthwise groups and residual adds kept consistent) and exports to ONNX."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune import zoo
from edgeprune.prune import prune_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.fmnist_mobilenet().eval()


def test_builds_with_depthwise_convs_and_output_shape():
    import torch_pruning as tp

    m = _model()
    x = torch.randn(3, 1, 28, 28)
    assert m(x).shape == (3, 10)
    depthwise = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1 and c.groups == c.in_channels]
    assert len(depthwise) == 5  # one per inverted residual block
    macs, _ = tp.utils.count_ops_and_params(m, x[:1])
    assert 10e6 <= macs <= 40e6, macs
    assert zoo.fmnist_mobilenet(num_classes=7, in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_prunes_to_2x_macs_and_exports(tmp_path):
    import torch_pruning as tp

    from edgeprune.export import export_onnx, onnx_parity

    pytest.importorskip("onnxruntime")
    m = _model()
    x = torch.randn(16, 1, 28, 28)
    res = prune_model(m, x[:1], tp.importance.MagnitudeImportance(p=1), target_macs_reduction=2.0, round_to=None,
                      progress=False)
    assert res.macs_reduction == pytest.approx(2.0, rel=0.05)
    pruned = res.model.eval()
    assert pruned(x).shape == (16, 10)
    for c in pruned.modules():  # depthwise stays depthwise after pruning
        if isinstance(c, nn.Conv2d) and c.groups > 1:
            assert c.groups == c.in_channels == c.out_channels
    path = export_onnx(pruned, x[:1], tmp_path / "m.onnx")
    parity = onnx_parity(path, pruned, x)
    assert parity.top1_agreement == 1.0
