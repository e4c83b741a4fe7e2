"""Config validation at the edge: typos, bad values and malformed YAML fail with clear messages."""
from __future__ import annotations

import pytest

from edgeprune.config import PipelineConfig, load_pipeline_config, load_target, resolve_targets
from edgeprune.errors import ConfigError, UnknownNameError
from edgeprune.registry import Registry


def test_defaults_are_valid():
    cfg = PipelineConfig()
    assert cfg.score.criterion == "sae-mi+l1"
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
