"""The single-stage commands run the pipeline's stages: same criteria, same channel rounding, same
tolerances; the report's sections have one typed shape."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import write_calibration_pngs
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.prune import channel_plan, load_pruned
from edgeprune.zoo import fmnist_cnn

TINY = "model: {arch: 'edgeprune.zoo:fmnist_cnn', weights: null, num_classes: 2, kwargs: {widths: [8, 8, 16]}}\n"


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_prune_takes_taylor_like_run(tmp_path) -> None:
    write_calibration_pngs(tmp_path / "calib")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY + f"data: {{calibration: '{tmp_path / 'calib'}', min_calibration: 8, batch_size: 8}}\n"
                   "score: {criterion: taylor}\n")
    out = tmp_path / "p"
    result = _invoke("prune", "-c", cfg, "--ratio", "0.25", "--round-to", "1", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["macs_after"] < report["macs_before"]
    assert load_pruned(out)(torch.randn(2, 1, 28, 28)).shape == (2, 2)


def test_cli_prune_rounds_channels_for_the_configs_targets(tmp_path) -> None:
    target = tmp_path / "t16.yaml"
    target.write_text(yaml.safe_dump({"backend": "onnxruntime", "device": "CPU", "precisions": ["fp32"],
                                      "round_to": 16}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: 'edgeprune.zoo:fmnist_cnn', weights: null, kwargs: {widths: [32, 64, 64]}}\n"
                   f"targets: ['{target}']\n")
    out = tmp_path / "p"
    result = _invoke("prune", "-c", cfg, "--criterion", "l1", "--ratio", "0.3", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output + repr(result.exception)
    plan = {n: c for n, c in channel_plan(load_pruned(out)).items() if n != "classifier"}
    full = channel_plan(fmnist_cnn(widths=(32, 64, 64)))
    assert plan and all(c % 16 == 0 for c in plan.values()) and any(c < full[n] for n, c in plan.items()), plan


def _pruned_folder(tmp_path):
    from edgeprune.config import load_pipeline_config
    from edgeprune.stages.prune import PrunedMeta, save

    cfg = load_pipeline_config(None, {"model.arch": "edgeprune.zoo:fmnist_cnn", "model.weights": None,
                                      "model.kwargs": {"widths": [8, 8, 16]}})
    torch.manual_seed(0)
    return save(fmnist_cnn(widths=(8, 8, 16)).eval(), tmp_path / "pruned", PrunedMeta.from_config(cfg))


def test_cli_export_checks_parity_with_the_configs_tolerance(tmp_path) -> None:
    folder = _pruned_folder(tmp_path)
    ok = _invoke("export", folder, "--out", tmp_path / "a.onnx", "--parity-images", "8")
    assert ok.exit_code == 0, ok.output + repr(ok.exception)
    strict = _invoke("export", folder, "--out", tmp_path / "b.onnx", "--parity-images", "8",
                     "--set", "export.max_rel_diff=1e-30")
    assert strict.exit_code != 0 and "1e-30" in strict.output + str(strict.exception)


def test_remote_job_carries_the_eval_batch(tmp_path) -> None:
    from edgeprune.config import TargetConfig
    from edgeprune.remote import JOB_FILE, stage_job

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    (tmp_path / "stage").mkdir()
    stage_job(tmp_path / "stage", target=TargetConfig(name="t", backend="onnxruntime", precisions=["fp32"]),
              onnx_path=onnx, calibration=None, eval_data=None, precisions=["fp32"], bench_cfg=None, eval_batch=32)
    assert json.loads((tmp_path / "stage" / JOB_FILE).read_text())["eval_batch"] == 32


def test_report_model_reads_the_example_and_names_a_bad_section(tmp_path) -> None:
    from pathlib import Path

    from edgeprune.errors import DataError
    from edgeprune.report import write_report
    from edgeprune.report_model import ModelSection, validate_report

    example = json.loads((Path(__file__).parent / "data" / "report_example.json").read_text())
    assert validate_report(example).artifacts[0].target == example["artifacts"][0]["target"]
    section = ModelSection.from_counts("m", macs=(300, 100), params=(50, 25)).dump()
    assert section == {"arch": "m", "macs_before": 300, "macs_after": 100, "params_before": 50, "params_after": 25,
                       "macs_reduction": 3.0, "params_reduction": 2.0}
    with pytest.raises(DataError, match=r"model\.macs_after"):
        write_report(tmp_path, {"model": {"macs_after": "many"}})
    assert not (tmp_path / "report.json").exists()
