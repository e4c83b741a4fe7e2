"""Shipped targets validate; typos and unknown names fail helpfully; ``targets`` and ``doctor`` CLI."""
from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.config import TARGETS_DIR, BackendName, Precision, load_target, target_paths
from edgeprune.errors import ConfigError, UnknownNameError

SHIPPED = {
    "cpu-onnxruntime": (BackendName.onnxruntime, "CPU", [Precision.fp32, Precision.int8]),
    "intel-cpu-openvino": (BackendName.openvino, "CPU", [Precision.fp32, Precision.int8]),
    "intel-gpu-openvino": (BackendName.openvino, "GPU", [Precision.fp16]),
    "intel-npu-openvino": (BackendName.openvino, "NPU", [Precision.int8]),
    "jetson-orin-tensorrt": (BackendName.tensorrt, "GPU", [Precision.fp16, Precision.int8]),
    "nvidia-gpu-tensorrt": (BackendName.tensorrt, "GPU", [Precision.fp16]),
}


@pytest.mark.parametrize("name", sorted(target_paths()))
def test_every_shipped_target_validates(name):
    t = load_target(name)
    assert t.name == name, "the YAML's name must match its file name"
    assert t.accuracy_drop_budget_pt > 0 and t.precisions


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_required_targets_ship_with_their_precisions(name):
    backend, device, precisions = SHIPPED[name]
    t = load_target(name)
    assert (t.backend, t.device, t.precisions) == (backend, device, precisions)


def test_typo_key_names_the_key_and_valid_keys(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: typo\nbackend: openvino\nprecison: [fp32]\n")
    with pytest.raises(ConfigError) as exc:
        load_target(bad)
    msg = str(exc.value)
    assert "unknown key 'precison'" in msg and "precisions" in msg and "backend" in msg


def test_bad_value_names_field_and_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbackend: tflite\nprecisions: [int4]\n")
    with pytest.raises(ConfigError) as exc:
        load_target(bad)
    msg = str(exc.value)
    assert "backend" in msg and "'onnxruntime'" in msg and "int4" in msg and "'int8'" in msg


def test_unknown_target_lists_valid_ones():
    with pytest.raises(UnknownNameError) as exc:
        load_target("cpu-onnxruntim")
    assert all(name in str(exc.value) for name in SHIPPED)


def test_cli_targets_list_and_show():
    runner = CliRunner()
    result = runner.invoke(app, ["targets", "list"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in SHIPPED)
    result = runner.invoke(app, ["targets", "show", "intel-npu-openvino"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["device"] == "NPU" and shown["precisions"] == ["int8"] and "threads" in shown


def test_cli_targets_validate(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["targets", "validate"])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == len(target_paths(TARGETS_DIR))
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: typo\nbackend: openvino\nthread: 4\n")
    result = runner.invoke(app, ["targets", "validate", "cpu-onnxruntime", str(bad)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) and "unknown key 'thread'" in str(result.exception)
    assert "invalid" in result.output


def test_cli_doctor_lists_runtimes():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for name in ("onnxruntime", "openvino", "tensorrt"):
        assert name in result.output
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in result.output
