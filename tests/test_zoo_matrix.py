"""torchvision zoo matrix: prune to 2x MACs (magnitude and sae-mi), forward, ONNX export, ORT parity,
and (magnitude) a save -> reload round trip with identical outputs.

Random weights and small inputs keep each case to seconds. A model that torch-pruning cannot
handle is listed in ``EXPECTED_FAILURES`` with the reason (strict xfail) and shows in ``inspect``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from edgeprune.config import ModelConfig
from edgeprune.data import TensorData
from edgeprune.models import build_model
from edgeprune.prune import prune_model

ort = pytest.importorskip("onnxruntime")

# SLOW: over ~5 s a case on 2 cores (out of the fast tier, `-m "not slow"`)
FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x1_0",
        "squeezenet1_1", "mnasnet1_0"]
SLOW = ["wide_resnet50_2", "efficientnet_v2_s", "densenet121", "convnext_tiny", "vgg11_bn", "resnet50",
        "resnext50_32x4d", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "googlenet", "inception_v3"]
EXPECTED_FAILURES: dict[str, str] = {
    "shufflenet_v2_x1_0": "torch-pruning 1.6.1 cannot map channels through channel_shuffle (view + transpose): "
                          "ZeroDivisionError in update_reshape_index_mapping while tracing; reported by inspect",
}
DYNAMO_EXPORT = {"vgg11_bn"}  # the legacy exporter rejects adaptive_avg_pool2d 2x2 -> 7x7 (not a factor)
INPUT = {"inception_v3": 80}  # inception_v3 needs >= 75x75
NUM_CLASSES = 10
TOL = 1e-4  # max abs diff relative to the output scale


def _param(arch: str, criterion: str):
    marks = [pytest.mark.slow] if arch in SLOW else []
    if arch in EXPECTED_FAILURES:
        marks.append(pytest.mark.xfail(reason=EXPECTED_FAILURES[arch], strict=True))
    return pytest.param(arch, criterion, marks=marks, id=f"{arch}-{criterion}")


CASES = [_param(a, c) for a in FAST + SLOW for c in ("magnitude", "sae-mi")]


def _importance(criterion: str, model: torch.nn.Module, x: torch.Tensor):
    import torch_pruning as tp

    if criterion == "magnitude":
        return tp.importance.MagnitudeImportance(p=1), None
    scoring = pytest.importorskip("edgeprune.scoring")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, *x.shape[1:], generator=g)  # 8 calibration images
    data = TensorData(images, torch.arange(8) % NUM_CLASSES, [str(i) for i in range(NUM_CLASSES)], "random")
    scores = scoring.score_model(model, data, criterion="sae-mi", num_classes=NUM_CLASSES, progress=False)
    return scoring.make_importance("sae-mi", scores), scores.scores


def _ort_parity(model: torch.nn.Module, x: torch.Tensor, path, *, dynamo: bool = False) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=dynamo,
                          input_names=["input"], output_names=["logits"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(got - ref).max()) / scale


@pytest.mark.parametrize("arch,criterion", CASES)
def test_zoo_prune_export_parity(arch: str, criterion: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=NUM_CLASSES), 3).eval()
    side = INPUT.get(arch, 64)
    x = torch.randn(1, 3, side, side)
    importance, scores = _importance(criterion, model, x)
    if arch in EXPECTED_FAILURES:
        from edgeprune.inspect_model import inspect_model

        assert inspect_model(model, x).trace_error, "inspect must report why this model cannot be pruned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_model(model, x, importance, target_macs_reduction=2.0, scores=scores, progress=False)
    assert res.macs_reduction >= 1.8, res.table()
    if res.target_met:
        assert abs(res.macs_reduction / 2.0 - 1) <= 0.02
    with torch.no_grad():
        out = res.model(torch.randn(2, 3, side, side))
    assert out.shape == (2, NUM_CLASSES)
    assert _ort_parity(res.model, x, tmp_path / "m.onnx", dynamo=arch in DYNAMO_EXPORT) <= TOL
    if criterion == "magnitude":  # save -> reload rebuilds the pruned model exactly
        _assert_round_trip(res.model, arch, tmp_path / "pruned", side)


def _assert_round_trip(model: torch.nn.Module, arch: str, out, side: int) -> None:
    from edgeprune.prune import load_pruned, save_pruned

    save_pruned(model, out, arch=arch, model_kwargs={}, num_classes=NUM_CLASSES, in_channels=3,
                input_shape=(3, side, side))
    probe = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.equal(load_pruned(out)(probe), model.eval()(probe))
