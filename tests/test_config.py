"""Config validation at the edge: typos, bad values and malformed YAML fail with clear messages."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeprune.config import (Augment, BackendName, Exporter, Optimizer, PipelineConfig, Schedule, choices,
                              load_pipeline_config, load_target, resolve_targets, set_fields)
from edgeprune.errors import ConfigError, UnknownNameError
from edgeprune.registry import Registry


def test_defaults_are_valid():
    cfg = PipelineConfig()
    assert cfg.score.criterion == "l1"
    assert cfg.prune.target_macs_reduction == 2.0


def test_typo_key_names_key_value_and_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prune:\n  target_mac_reduction: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_pipeline_config(p)
    msg = str(exc.value)
    assert "prune.target_mac_reduction" in msg and "3" in msg and "target_macs_reduction" in msg


def test_bad_value_names_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prune:\n  target_macs_reduction: 0.5\n")
    with pytest.raises(ConfigError, match=r"prune\.target_macs_reduction"):
        load_pipeline_config(p)


@pytest.mark.parametrize("text", ["prune: [1, 2\n", "prune:\n  a: b\n   c: d\n", "- just\n- a list\n"])
def test_malformed_yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=str(p)):
        load_pipeline_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate():
    cfg = load_pipeline_config(None, {"prune.target_macs_reduction": 3, "score.levels": 16})
    assert cfg.prune.target_macs_reduction == 3 and cfg.score.levels == 16
    with pytest.raises(ConfigError, match="score.levelz"):
        load_pipeline_config(None, {"score.levelz": 16})


def test_unknown_target_lists_valid(tmp_path):
    (tmp_path / "a.yaml").write_text("backend: onnxruntime\n")
    with pytest.raises(UnknownNameError, match="valid: a"):
        load_target("b", tmp_path)
    assert load_target("a", tmp_path).name == "a"
    with pytest.raises(UnknownNameError, match="matches nothing"):
        resolve_targets(["z*"], tmp_path)


def test_target_typo_and_bad_backend(tmp_path):
    (tmp_path / "t.yaml").write_text("backend: onnxruntime\nprecision: [fp32]\n")
    with pytest.raises(ConfigError, match="precisions"):
        load_target("t", tmp_path)
    (tmp_path / "u.yaml").write_text("backend: tflite\n")
    with pytest.raises(ConfigError, match="onnxruntime"):
        load_target("u", tmp_path)


def test_registry_unknown_and_duplicate():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)
    with pytest.warns(UserWarning, match="registered twice"):
        reg.add("alpha", 2)
    assert reg.get("alpha") == 2 and reg.names() == ["alpha"]
    with pytest.raises(UnknownNameError, match="valid: alpha") as exc:
        reg.get("alpah")
    assert "did you mean 'alpha'" in str(exc.value)


BAD_CHOICES = {"score.criterion": ("sae-mj", "sae-mi+l1"), "finetune.optimizer": ("adamm", "adamw"),
               "prune.normalize": ("meen", "zscore"), "score.quantization": ("minmx", "zero-quantile"),
               "finetune.augment": ("flip", "crop-flip"), "export.exporter": ("dynamoo", "torchscript")}


def test_every_bad_choice_named_with_valid_ones_in_one_message():
    with pytest.raises(ConfigError) as exc:
        load_pipeline_config(None, {k: bad for k, (bad, _) in BAD_CHOICES.items()})
    msg = str(exc.value)
    for key, (bad, valid) in BAD_CHOICES.items():
        line = next((x for x in msg.splitlines() if x.strip().startswith(f"- {key}:")), None)
        assert line is not None, f"{key} not reported in:\n{msg}"
        assert repr(bad) in line and valid in line, line


def test_dry_run_refuses_bad_choices_before_loading_anything():
    from typer.testing import CliRunner

    from edgeprune.cli import app

    args = ["run", "--dry-run"] + [a for k, (bad, _) in BAD_CHOICES.items() for a in ("--set", f"{k}={bad}")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), res.output
    assert all(f"{k}:" in str(res.exception) for k in BAD_CHOICES)


@pytest.mark.parametrize("budget", ["-1", "0"])
def test_cli_latency_budget_validated(budget):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    res = CliRunner().invoke(app, ["run", "--dry-run", "--latency-budget-ms", budget])
    assert isinstance(res.exception, ConfigError), res.output
    assert "--latency-budget-ms" in str(res.exception) and "latency_budget_ms" in str(res.exception)


def test_assignment_is_validated():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError, match="optimizer"):
        cfg.finetune.optimizer = "adamm"  # type: ignore[assignment]
    with pytest.raises(ValidationError, match="greater than 1"):
        cfg.prune.target_macs_reduction = 0.5
    target = load_target("cpu-onnxruntime")
    with pytest.raises(ConfigError, match="latency_budget_ms"):
        set_fields(target, {"latency_budget_ms": -1.0}, "--budget-ms")
    set_fields(target, {"latency_budget_ms": 2.5}, "--budget-ms")
    assert target.latency_budget_ms == 2.5


def test_choice_lists_match_the_code_that_uses_them():
    from edgeprune.augment import AUGMENTATIONS
    from edgeprune.backends import BACKENDS
    from edgeprune.export import EXPORTERS
    from edgeprune.finetune import OPTIMIZERS, SCHEDULES

    assert set(AUGMENTATIONS) == set(choices(Augment))
    assert set(EXPORTERS) == set(choices(Exporter))
    assert set(OPTIMIZERS) == set(choices(Optimizer)) and set(SCHEDULES) == set(choices(Schedule))
    assert sorted(b.value for b in BackendName) == BACKENDS.names()


def test_every_registered_criterion_is_accepted():
    from edgeprune.scoring import CRITERIA

    for name in CRITERIA.names():
        assert load_pipeline_config(None, {"score.criterion": name}).score.criterion == name


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda:1", True), ("gpu", False),
                                        ("cuda:x", False)])
def test_device_form(device, ok):
    if ok:
        assert load_pipeline_config(None, {"device": device}).device == device
    else:
        with pytest.raises(ConfigError, match="valid: auto, cpu, cuda, cuda:N"):
            load_pipeline_config(None, {"device": device})


def test_max_abs_diff_is_the_old_name_of_max_rel_diff():
    with pytest.warns(FutureWarning, match="max_rel_diff"):
        cfg = load_pipeline_config(None, {"export.max_abs_diff": 0.01})
    assert cfg.export.max_rel_diff == 0.01
    with pytest.raises(ConfigError, match="old name"):
        load_pipeline_config(None, {"export.max_abs_diff": 0.01, "export.max_rel_diff": 0.02})


def test_removed_dead_knob_is_refused():
    with pytest.raises(ConfigError, match="finetune.workers"):
        load_pipeline_config(None, {"finetune.workers": 2})


@pytest.mark.parametrize("overrides, goal", [({}, "prune to 2x MACs"),
                                              ({"prune.ratio": 0.3}, "fixed channel ratio of 0.3"),
                                              ({"prune.target_params_reduction": 3}, "prune to 3x params")])
def test_plan_names_the_prune_goal_that_applies(overrides, goal):
    from edgeprune.commands.run import plan_text

    cfg = load_pipeline_config(None, overrides)
    stages = plan_text(cfg, []).splitlines()[-1]
    assert goal in stages and ("MACs" not in stages) == bool(overrides), stages


def test_config_import_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, edgeprune.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_recovery_mode_picks_its_default_criterion_unless_one_is_named():
    from edgeprune.config import CALIBRATION_DEFAULT_CRITERION, DEFAULT_CRITERION, PipelineConfig
    assert PipelineConfig().score.criterion == DEFAULT_CRITERION
    calib = PipelineConfig.model_validate({"finetune": {"mode": "calibration"}})
    assert calib.score.criterion == CALIBRATION_DEFAULT_CRITERION
    named = PipelineConfig.model_validate({"finetune": {"mode": "calibration"}, "score": {"criterion": "random"}})
    assert named.score.criterion == "random"
