"""Backends: one template test generated from the registry for every backend x precision, plus the
refusals (missing runtime, bad calibration, unknown device) and the ``compile`` command."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.backends import BACKENDS, CompiledArtifact, get_backend
from edgeprune.backends.base import run_in_batches
from edgeprune.config import Precision, TargetConfig
from edgeprune.errors import BackendUnavailableError, DataError, UnknownNameError

CASES = [(name, p) for name in BACKENDS.names() for p in get_backend(name).precisions]
# the agreement an artifact must keep with PyTorch on held-out images, per precision
MIN_AGREEMENT = {Precision.fp32: 1.0, Precision.fp16: 0.95, Precision.int8: 0.9}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but fast and enough for TinyNet
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, 1, 16, 16), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    return path, model


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """(calibration (48, 1, 16, 16), held-out (32, 1, 16, 16)) textured like conftest's tiny_data."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(80) % 4
    grid = torch.arange(16).float().view(1, 1, 1, 16)
    x = torch.randn(80, 1, 16, 16, generator=g) * 0.3 + torch.sin(grid * (y + 1).float().view(-1, 1, 1, 1) * 0.8)
    x = x.numpy().astype(np.float32)
    return x[:48], x[48:]


def _target(backend: str, precision: Precision, **kw) -> TargetConfig:
    device = kw.pop("device", get_backend(backend).default_device)
    return TargetConfig(name=f"test-{backend}", backend=backend, device=device, precisions=[precision], threads=1, **kw)


@pytest.mark.parametrize("backend_name,precision", CASES, ids=[f"{b}-{p.value}" for b, p in CASES])
def test_compile_load_run_matches_pytorch(backend_name, precision, tiny_onnx, images, tmp_path):
    backend = get_backend(backend_name)
    target = _target(backend_name, precision)
    ok, why = backend.supports(precision, target.device)
    if not ok:
        pytest.skip(f"{backend_name} {precision.value} on {target.device}: {why}")
    onnx_path, model = tiny_onnx
    calib, held_out = images
    art = backend.compile(onnx_path, tmp_path, target=target, precision=precision,
                          calibration=calib if precision == Precision.int8 else None)
    assert art.backend == backend_name and art.precision == precision.value and art.path.is_file()
    assert all(p.is_file() for p in art.files)
    assert CompiledArtifact.load(tmp_path).to_dict() == art.to_dict()
    if precision == Precision.int8:
        assert art.meta["calibration"]["count"] == len(calib)
        assert len(art.meta["calibration"]["sha256"]) == 64

    out = backend.load(art, target=target)(held_out)  # (32, 4)
    with torch.no_grad():
        ref = model(torch.from_numpy(held_out)).numpy()
    assert out.shape == ref.shape and out.dtype == np.float32
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= MIN_AGREEMENT[precision], f"top-1 agreement {agreement:.3f}"
    scale = float(np.abs(ref).max())
    tol = {Precision.fp32: 1e-4, Precision.fp16: 1e-2, Precision.int8: 0.15}[precision]
    assert float(np.abs(out - ref).max()) <= tol * scale


def test_registry_lists_every_runtime_and_imports_none():
    assert BACKENDS.names() == ["onnxruntime", "openvino", "tensorrt"]
    code = ("import sys, edgeprune.backends as b; b.get_backend('tensorrt'); "
            "print([m for m in ('onnxruntime', 'openvino', 'nncf', 'tensorrt') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_lists_valid():
    with pytest.raises(UnknownNameError, match="onnxruntime, openvino, tensorrt"):
        get_backend("tflite")


@pytest.mark.parametrize("backend_name", BACKENDS.names())
def test_missing_runtime_names_the_package(backend_name, monkeypatch, tiny_onnx, tmp_path):
    backend = get_backend(backend_name)
    monkeypatch.setitem(sys.modules, backend.requires, None)  # makes `import <runtime>` raise ImportError
    ok, why = backend.available()
    assert not ok and backend.requires in why
    with pytest.raises(BackendUnavailableError, match=backend.requires):
        backend.compile(tiny_onnx[0], tmp_path, target=_target(backend_name, Precision.fp32), precision=Precision.fp32)


def test_missing_nncf_refuses_openvino_int8(monkeypatch, tiny_onnx, images, tmp_path):
    pytest.importorskip("openvino")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(BackendUnavailableError, match="nncf"):
        get_backend("openvino").compile(tiny_onnx[0], tmp_path, target=_target("openvino", Precision.int8),
                                        precision=Precision.int8, calibration=images[0])


INT8_CPU = ["onnxruntime", "openvino"]


@pytest.mark.parametrize("backend_name", INT8_CPU)
@pytest.mark.parametrize("case,match", [
    ("too_small", "needs at least 32"),
    ("wrong_shape", r"\(1, 28, 28\).*ONNX input"),
    ("missing", "needs a calibration set"),
    ("not_4d", r"must be \(N, C, H, W\)"),
])
def test_bad_calibration_refused(backend_name, case, match, tiny_onnx, images, tmp_path):
    pytest.importorskip(get_backend(backend_name).requires)
    calib = {"too_small": images[0][:16], "wrong_shape": np.zeros((40, 1, 28, 28), np.float32),
             "missing": None, "not_4d": np.zeros((40, 16, 16), np.float32)}[case]
    with pytest.raises(DataError, match=match):
        get_backend(backend_name).compile(tiny_onnx[0], tmp_path, target=_target(backend_name, Precision.int8),
                                          precision=Precision.int8, calibration=calib)
    assert not (tmp_path / "artifact.json").exists()


def test_min_calibration_override_accepts_fewer(tiny_onnx, images, tmp_path):
    pytest.importorskip("onnxruntime")
    target = _target("onnxruntime", Precision.int8, options={"min_calibration": 8})
    art = get_backend("onnxruntime").compile(tiny_onnx[0], tmp_path, target=target, precision=Precision.int8,
                                             calibration=images[0][:8])
    assert art.meta["calibration"]["count"] == 8


def test_onnxruntime_unknown_and_unavailable_provider(tiny_onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    backend = get_backend("onnxruntime")
    with pytest.raises(UnknownNameError, match="valid: CPU, CUDA"):
        backend.compile(tiny_onnx[0], tmp_path, target=_target("onnxruntime", Precision.fp32, device="Quantum"),
                        precision=Precision.fp32)
    if "CUDA" in backend.devices():
        pytest.skip("CUDAExecutionProvider is available here")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*available: .*CPUExecutionProvider"):
        backend.compile(tiny_onnx[0], tmp_path, target=_target("onnxruntime", Precision.fp32, device="CUDA"),
                        precision=Precision.fp32)


def test_openvino_unavailable_device_refused(tiny_onnx, tmp_path):
    pytest.importorskip("openvino")
    backend = get_backend("openvino")
    if "NPU" in backend.devices():
        pytest.skip("an NPU is available here")
    art = backend.compile(tiny_onnx[0], tmp_path, target=_target("openvino", Precision.fp32), precision=Precision.fp32)
    with pytest.raises(BackendUnavailableError, match="'NPU' is not available here; available: CPU"):
        backend.load(art, target=_target("openvino", Precision.fp32, device="NPU"))


def test_openvino_fp16_weights_run_on_any_cpu(tiny_onnx, images, tmp_path):
    """FP16 IR (compressed weights) runs everywhere with f32 compute; without f32, a CPU that cannot
    compute in FP16 refuses with its capabilities instead of silently running something else."""
    pytest.importorskip("openvino")
    backend = get_backend("openvino")
    onnx_path, model = tiny_onnx
    art = backend.compile(onnx_path, tmp_path, target=_target("openvino", Precision.fp16), precision=Precision.fp16)
    target = _target("openvino", Precision.fp16, options={"inference_precision": "f32"})
    out = backend.load(art, target=target)(images[1])
    with torch.no_grad():
        ref = model(torch.from_numpy(images[1])).numpy()
    assert float(np.abs(out - ref).max()) <= 1e-2 * float(np.abs(ref).max())
    ok, why = backend.supports(Precision.fp16, "CPU")
    if not ok:
        assert "cannot compute in FP16" in why and "FP32" in why
        with pytest.raises(BackendUnavailableError, match="cannot compute in FP16"):
            backend.load(art, target=_target("openvino", Precision.fp16))


def test_tensorrt_without_gpu_says_why():
    from edgeprune.backends.tensorrt_backend import parse_device

    assert parse_device("DLA:1") == ("DLA", 1) and parse_device("GPU") == ("GPU", 0)
    with pytest.raises(UnknownNameError, match="GPU, GPU:<n>, DLA:<n>"):
        parse_device("TPU:0")
    ok, why = get_backend("tensorrt").available()
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present; the template test covers TensorRT")
    assert not ok and ("no CUDA GPU" in why or "cuda-python not installed" in why), why


def test_run_in_batches_pads_a_static_batch():
    calls = []

    def infer(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2]  # (b, 2)

    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    out = run_in_batches(infer, x, fixed_batch=2)
    assert calls == [2, 2, 2] and out.shape == (5, 2)
    np.testing.assert_array_equal(out, x.reshape(5, -1)[:, :2])


def test_compile_command_writes_artifacts(tiny_onnx, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from edgeprune.cli import app

    np.save(tmp_path / "calib.npy", images[0])
    result = CliRunner().invoke(app, ["compile", str(tiny_onnx[0]), "--target", "cpu-onnxruntime",
                                      "--out", str(tmp_path / "out"), "--calibration", str(tmp_path / "calib.npy")])
    assert result.exit_code == 0, result.output
    for p in ("fp32", "int8"):
        art = CompiledArtifact.load(tmp_path / "out" / p)
        assert art.precision == p and art.path.is_file()
    assert art.meta["calibration"]["source"]["count"] == len(images[0])


def test_openvino_accuracy_control_keeps_agreement(tiny_onnx, images, tmp_path):
    pytest.importorskip("nncf")
    target = _target("openvino", Precision.int8, options={"accuracy_control": True}, accuracy_drop_budget_pt=1.0)
    backend = get_backend("openvino")
    art = backend.compile(tiny_onnx[0], tmp_path, target=target, precision=Precision.int8, calibration=images[0])
    assert art.meta["quantizer"] == "nncf.quantize_with_accuracy_control" and art.meta["max_drop_pt"] == 1.0
    with torch.no_grad():
        ref = tiny_onnx[1](torch.from_numpy(images[0])).numpy()
    out = backend.load(art, target=target)(images[0])
    assert float((out.argmax(1) == ref.argmax(1)).mean()) >= 0.99
