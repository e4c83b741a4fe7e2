"""Property test: random small CNNs (residual adds, concatenations, depthwise and grouped convs,
squeeze-excitation) prune, run, export to ONNX and match in ONNX Runtime."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edgeprune.prune import channel_plan, prune_model

ort = pytest.importorskip("onnxruntime")

BLOCKS = ("plain", "residual", "concat", "depthwise", "grouped", "se")


def _cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    """One block of the given kind; ``out`` is its output width."""

    def __init__(self, kind: str, cin: int, width: int):
        super().__init__()
        self.kind = kind
        if kind == "residual":
            self.body, self.out = nn.Sequential(_cbr(cin, width), nn.Conv2d(width, cin, 3, padding=1)), cin
        elif kind == "concat":
            self.a, self.b = _cbr(cin, width), _cbr(cin, width // 2)
            self.out = width + width // 2
        elif kind == "depthwise":
            self.body = nn.Sequential(_cbr(cin, cin, groups=cin), nn.Conv2d(cin, width, 1))
            self.out = width
        elif kind == "grouped":
            self.body, self.out = nn.Sequential(_cbr(cin, width), _cbr(width, width, groups=2)), width
        elif kind == "se":
            self.body = _cbr(cin, width)
            self.fc1, self.fc2 = nn.Conv2d(width, max(width // 4, 2), 1), nn.Conv2d(max(width // 4, 2), width, 1)
            self.out = width
        else:
            self.body, self.out = _cbr(cin, width), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "residual":
            return torch.relu(x + self.body(x))
        if self.kind == "concat":
            return torch.cat([self.a(x), self.b(x)], dim=1)  # (B, width * 1.5, H, W)
        if self.kind == "se":
            y = self.body(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))  # (B, C, 1, 1)
            return y * s
        return self.body(x)


class RandomCNN(nn.Module):
    def __init__(self, kinds: list[str], widths: list[int], in_channels: int, num_classes: int):
        super().__init__()
        self.stem = _cbr(in_channels, 16)
        blocks, c = [], 16
        for kind, w in zip(kinds, widths):
            blocks.append(Block(kind, c, w))
            c = blocks[-1].out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))  # (B, C) -> (B, K)


@st.composite
def cnn_specs(draw):
    n = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(BLOCKS), min_size=n, max_size=n))
    widths = draw(st.lists(st.sampled_from([8, 16, 24, 32]), min_size=n, max_size=n))
    return dict(kinds=kinds, widths=widths, in_channels=draw(st.sampled_from([1, 3])),
                num_classes=draw(st.integers(2, 7)), ratio=draw(st.sampled_from([0.25, 0.5])),
                global_ranking=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def _ort_max_rel_diff(model: nn.Module, x: torch.Tensor, path) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=cnn_specs())
def test_random_cnn_prune_export_parity(spec, tmp_path) -> None:
    import torch_pruning as tp

    torch.manual_seed(spec["seed"])
    model = RandomCNN(spec["kinds"], spec["widths"], spec["in_channels"], spec["num_classes"]).eval()
    x = torch.randn(1, spec["in_channels"], 12, 12)
    before = channel_plan(model)
    res = prune_model(model, x, tp.importance.MagnitudeImportance(p=1), ratio=spec["ratio"], round_to=None,
                      global_ranking=spec["global_ranking"], progress=False)
    assert res.macs_after < res.macs_before
    assert res.plan["fc"] == spec["num_classes"]
    assert all(res.plan[n] >= 1 for n in before)
    with torch.no_grad():
        assert res.model(torch.randn(3, spec["in_channels"], 12, 12)).shape == (3, spec["num_classes"])
    assert _ort_max_rel_diff(res.model, x, tmp_path / "m.onnx") <= 1e-4
