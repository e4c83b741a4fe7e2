"""Architectures that ship with edgeprune (referenced as ``edgeprune.zoo:<name>``)."""
from __future__ import annotations

import torch
from torch import nn

# The factories a model folder, bundle or YAML may name as ``edgeprune.zoo:<name>`` without --trust-code.
BUILDERS = ("fmnist_cnn", "fmnist_resnet", "fmnist_vgg", "fmnist_mobilenet")


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


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when ``expand`` is 1), 3x3 depthwise, linear 1x1 project;
    the input is added back when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_act(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), _conv_bn_act(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class FmnistMobileNet(nn.Module):
    """A small MobileNetV2-style CNN for 28x28 inputs (depthwise-separable inverted residuals, ReLU6).

    A stride-2 stem (28 -> 14, as in MobileNet), then ``widths`` are the block output widths: the
    first two at 14x14, the third at 7x7; the head is a 1x1 conv to ``head`` channels. About 24 M
    MACs at 1x28x28 with the defaults.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128),
                 expand: int = 4, head: int = 512):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = _conv_bn_act(in_channels, w1, 3, stride=2)  # (B, w1, H/2, W/2)
        self.blocks = nn.Sequential(
            _InvertedResidual(w1, w1, 1, 1),  # depthwise + project, residual
            _InvertedResidual(w1, w2, 1, expand),
            _InvertedResidual(w2, w2, 1, expand),  # residual
            _InvertedResidual(w2, w3, 2, expand),  # -> H/4
            _InvertedResidual(w3, w3, 1, expand),  # residual
        )
        self.head = _conv_bn_act(w3, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))  # (B, head, H/4, W/4)
        return self.classifier(self.dropout(self.pool(x).flatten(1)))


def fmnist_mobilenet(num_classes: int = 10, in_channels: int = 1, **kw) -> FmnistMobileNet:
    return FmnistMobileNet(num_classes=num_classes, in_channels=in_channels, **kw)
