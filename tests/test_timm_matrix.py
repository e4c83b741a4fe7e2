"""timm zoo matrix: ``timm:<name>`` -> prune to 2x MACs (l1) -> save -> reload -> ONNX export -> ORT parity.

Random weights (``pretrained=False``), 10 classes and a 64x64 input keep each case to seconds.
Not in the matrix: ``mixnet_s`` (its MixedConv2d keeps split sizes in a Python list, so the layers
feeding the split stay whole and it reaches only ~1.3x MACs; see docs/upstream-torch-pruning.md) and
``densenet121`` (passes, but takes minutes: torch-pruning's concat mapping is slow).
A model that torch-pruning cannot handle is listed in ``EXPECTED_FAILURES`` with the start of the
EdgePruneError it gives (strict xfail): the test checks that error comes within 60 s and that
``inspect`` predicts it.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from edgeprune.config import ModelConfig  # noqa: E402
from edgeprune.errors import EdgePruneError  # noqa: E402
from edgeprune.models import build_model  # noqa: E402
from edgeprune.prune import load_pruned, prune_model, save_pruned  # noqa: E402


# SLOW: over ~5 s a case on 2 cores (out of the fast tier, `-m "not slow"`)
FAST = ["resnet18", "resnet26d", "seresnet18", "efficientnet_b0", "mobilenetv3_small_050",
        "mobilenetv2_050", "regnetx_002", "regnety_002", "convnext_atto", "repvgg_a0",
        "tinynet_e", "lcnet_050", "gernet_s", "ese_vovnet19b_slim_dw", "hgnetv2_b0", "selecsls42b", "dpn68"]
SLOW = ["cspresnet50", "res2net50_14w_8s", "efficientvit_b0", "rexnet_100", "resnext26ts", "ghostnet_050",
        "hrnet_w18_small", "dla34", "mobileone_s0"]
EXPECTED_FAILURES: dict[str, str] = {
    # DPN passes (dense, residual) tuples between blocks: torch-pruning's concat mapping gets None offsets
    "dpn68": "torch-pruning cannot handle DPN (while tracing) at operation _ConcatOp",
}
# channel-padding slices + cat: torch-pruning's group search on some roots does not end
# (docs/upstream-torch-pruning.md). edgeprune stops it by time budget, so the outcome depends on this
# machine's speed against the budget: under load tracing times out (a clear StageTimeout); quiet, the
# endless roots become boundaries and RexNet prunes to 1.79x (2x unreachable). Neither is stable enough
# to assert, so the case is skipped rather than left flaky.
UNSTABLE: dict[str, str] = {
    "rexnet_100": "RexNet's outcome depends on the machine's speed against the trace budget (timeout under "
                  "load, 1.79x with boundaries when quiet); see docs/upstream-torch-pruning.md",
}
NUM_CLASSES = 10
SIDE = 64
TOL = 1e-4  # ORT vs torch, relative to the output scale
XFAIL_TIMEOUT_S = 15.0  # budget for tracing / group mapping in the expected-failure cases


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: graph tracing is Python-bound, and two threads on loaded cores only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ort_parity(model: torch.nn.Module, x: torch.Tensor, path) -> float:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


def _param(name: str):
    marks = [pytest.mark.slow] if name in SLOW else []
    if name in UNSTABLE:
        marks.append(pytest.mark.skip(reason=UNSTABLE[name]))
    if name in EXPECTED_FAILURES:
        marks.append(pytest.mark.xfail(reason=EXPECTED_FAILURES[name], raises=EdgePruneError, strict=True))
    return pytest.param(name, marks=marks, id=name)


def _l1():
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=1)


def _expect_clear_failure(name: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    from edgeprune.inspect_model import inspect_model

    start = time.monotonic()
    with pytest.raises(EdgePruneError) as info:
        prune_model(model, x, _l1(), target_macs_reduction=2.0, progress=False, trace_timeout_s=XFAIL_TIMEOUT_S)
    assert time.monotonic() - start < 60, "the failure must come fast"
    assert EXPECTED_FAILURES[name] in str(info.value)
    report = inspect_model(model, x, trace_timeout_s=XFAIL_TIMEOUT_S)
    predicted = report.trace_error or report.prune_error
    assert predicted and EXPECTED_FAILURES[name] in predicted, "inspect must predict the same failure"
    raise info.value


@pytest.mark.parametrize("name", [_param(n) for n in FAST + SLOW])
def test_timm_prune_reload_export_parity(name: str, tmp_path, record_property) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=f"timm:{name}", num_classes=NUM_CLASSES, weights=None), 3).eval()
    x = torch.randn(1, 3, SIDE, SIDE)
    if name in EXPECTED_FAILURES:
        _expect_clear_failure(name, model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_model(model, x, _l1(), target_macs_reduction=2.0, progress=False)
    record_property("macs_reduction", round(res.macs_reduction, 3))  # for the matrix table (--junitxml)
    assert res.macs_reduction >= 1.8, res.table()
    save_pruned(res.model, tmp_path / "pruned", arch=f"timm:{name}", model_kwargs={}, num_classes=NUM_CLASSES,
                in_channels=3, input_shape=(3, SIDE, SIDE))
    reloaded = load_pruned(tmp_path / "pruned")
    probe = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(reloaded(probe), res.model.eval()(probe)), "reload must rebuild the pruned model exactly"
    assert _ort_parity(reloaded, x, tmp_path / "m.onnx") <= TOL
