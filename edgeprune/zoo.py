"""Architectures that ship with edgeprune (referenced as ``edgeprune.zoo:<name>``)."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FmnistCNN(nn.Module):
    """The bundled default: a small VGG-style CNN for 28x28 grayscale Fashion-MNIST.

    ``widths`` are the conv widths per stage (two convs in the first two stages, one in the last).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w1), *_conv_bn(w1, w1), nn.MaxPool2d(2),
            *_conv_bn(w1, w2), *_conv_bn(w2, w2), nn.MaxPool2d(2),
            *_conv_bn(w2, w3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, w3, H/4, W/4)
        x = self.pool(x).flatten(1)  # (B, w3)
        return self.classifier(self.dropout(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class FmnistResNet(nn.Module):
    """A small ResNet-style CNN for 28x28 inputs (residual adds couple channels across blocks)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn(in_channels, w1))
        self.layer1 = _Block(w1, w1, 1)
        self.layer2 = _Block(w1, w2, 2)
        self.layer3 = _Block(w2, w3, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # (B, w3, H/4, W/4)
        return self.fc(self.pool(x).flatten(1))


def fmnist_cnn(num_classes: int = 10, in_channels: int = 1, **kw) -> FmnistCNN:
    return FmnistCNN(num_classes=num_classes, in_channels=in_channels, **kw)


def fmnist_resnet(num_classes: int = 10, in_channels: int = 1, **kw) -> FmnistResNet:
    return FmnistResNet(num_classes=num_classes, in_channels=in_channels, **kw)


def fmnist_vgg(num_classes: int = 10, in_channels: int = 1, **kw) -> FmnistCNN:
    """A wider VGG-style variant for the benchmarks."""
    kw.setdefault("widths", (64, 128, 256))
    return FmnistCNN(num_classes=num_classes, in_channels=in_channels, **kw)
