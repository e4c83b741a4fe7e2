"""Shared fixtures: tiny models and data so that every stage is tested in seconds."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_calibration_pngs(root, classes: int = 2, per_class: int = 8) -> None:
    """A tiny image-folder calibration set: ``root/c<k>/<i>.png``, 28x28 grayscale, brighter per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(28, 28, generator=g) * (60 + 150 * c)).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")


def export_bundled(out_dir, eval_images: int):
    """The bundled model exported to ``out_dir/model.onnx`` with the default config's settings, and
    (model, onnx path, calibration images (N, 1, 28, 28) numpy, eval images, eval labels); skips the
    test when the Fashion-MNIST test split is not installed."""
    from edgeprune.config import load_pipeline_config
    from edgeprune.data import load_calibration, load_split
    from edgeprune.errors import DataError
    from edgeprune.export import export_onnx
    from edgeprune.models import load_model

    cfg = load_pipeline_config(None, {"data.max_eval_images": eval_images})
    try:
        evaluation = load_split(cfg.data, "eval")
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST test split not installed: {exc.message}")
    model = load_model(cfg.model, cfg.data.preprocessing.channels)
    calib = load_calibration(cfg.data).data.images.numpy()
    path = export_onnx(model, evaluation.images[:1], out_dir / "model.onnx", opset=cfg.export.opset,
                       dynamic_batch=cfg.export.dynamic_batch)
    return model, path, calib, evaluation


class TinyNet(nn.Module):
    """Conv stem, a residual block, a depthwise-separable block, classifier: 1x16x16 input."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.res1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res1(x))
        x = self.head(self.dw(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_net(num_classes: int = 4, in_channels: int = 1, **_: object) -> TinyNet:
    return TinyNet(num_classes, in_channels)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_data():
    """64 images 1x16x16 in 4 classes whose label shows in the texture (learnable)."""
    from edgeprune.data import TensorData

    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = torch.randn(64, 1, 16, 16, generator=g) * 0.3
    freq = (y + 1).float().view(-1, 1, 1, 1)
    grid = torch.arange(16).float().view(1, 1, 1, 16)
    x = x + torch.sin(grid * freq * 0.8)
    return TensorData(x, y, ["a", "b", "c", "d"], "synthetic")
