"""The test that would have caught issue 13: the bundled model's INT8 artifacts, compiled with the
bundled targets' own settings, stay within those targets' accuracy budgets on the CPU running the suite.

On an x86 CPU without VNNI, ONNX Runtime's default U8S8 kernels saturate (VPMADDUBSW) and the
bundled model lost 4 pt; the backends now pick host-accurate settings from the ISA
(:func:`edgeprune.envinfo.isa_features`), and this test checks the result on whatever CPU runs it.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import export_bundled
import torch

from edgeprune.config import Precision, load_target

EVAL_IMAGES = 2000
TARGETS = ("cpu-onnxruntime", "intel-cpu-openvino")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """(onnx path, calibration (N, 1, 28, 28), eval images, eval labels, FP32 logits) of the bundled model."""
    from edgeprune.export import torch_logits

    model, path, calib, evaluation = export_bundled(tmp_path_factory.mktemp("bundled"), EVAL_IMAGES)
    with torch.no_grad():
        fp32 = torch_logits(model, evaluation.images)
    return path, calib, evaluation.images.numpy(), evaluation.labels.numpy(), fp32


@pytest.mark.slow
@pytest.mark.parametrize("target_name", TARGETS)
def test_bundled_int8_within_budget_on_this_cpu(target_name, bundled, tmp_path):
    from edgeprune.backends import get_backend
    from edgeprune.stages.check import accuracy_ok, artifact_batch
    from edgeprune.envinfo import isa_features, isa_summary
    from edgeprune.export import run_batched

    target = load_target(target_name)
    backend = get_backend(target.backend.value)
    ok, why = backend.supports(Precision.int8, target.device)
    if not ok:
        pytest.skip(why)
    onnx_path, calib, images, labels, fp32 = bundled
    t0 = time.perf_counter()
    artifact = backend.compile(onnx_path, tmp_path / "int8", target=target, precision=Precision.int8,
                               calibration=calib)
    runner = backend.load(artifact, target=target)
    logits = run_batched(runner, images, artifact_batch(target, 256))  # (N, 10)
    seconds = time.perf_counter() - t0
    acc_fp32 = float(np.mean(fp32.argmax(1) == labels))
    acc_int8 = float(np.mean(logits.argmax(1) == labels))
    agreement = float(np.mean(logits.argmax(1) == fp32.argmax(1)))
    drop = round(100 * (acc_fp32 - acc_int8), 3)
    settings = artifact.meta["int8_settings"]
    report = (f"{target_name} on {isa_summary(isa_features())}: settings {settings}; FP32 {100 * acc_fp32:.2f} %, "
              f"INT8 {100 * acc_int8:.2f} % (drop {drop} pt), agreement {100 * agreement:.2f} %, {seconds:.1f} s")
    print(report)
    assert accuracy_ok(target, Precision.int8, drop, agreement), (
        f"{report}; budget: drop <= {target.accuracy_drop_budget_pt} pt, "
        f"agreement >= {100 * target.agreement_floor(Precision.int8):.1f} %")
