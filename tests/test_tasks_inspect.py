"""`edgeprune inspect` on segmentation / detection models: groups of the traced view and the layers kept for the task."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.errors import ConfigError
from edgeprune.tasks.models import build, fixed_layer_names, prune_once

pytest.importorskip("torch_pruning")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _inspect(*args: str) -> str:
    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _kept_section(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kept (fixed by the task):"))
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ")]


def test_inspect_lraspp_config_names_the_class_predictors_as_kept():
    out = _inspect("--config", str(EXAMPLES / "segmentation.yaml"))
    assert out.startswith("LRASPP (traced view SegmentationOut) input (1, 3, 128, 128)")  # the config's shape
    assert "kept (fixed by the task): 2" in out
    kept = _kept_section(out)
    assert kept == ["classifier.low_classifier: class predictor (low-level branch): out channels fixed by the task = "
                    "num_classes (4)",
                    "classifier.high_classifier: class predictor (high-level branch): out channels fixed by the task = "
                    "num_classes (4)"]
    assert "prunable; out: backbone." in out  # the backbone's groups are listed
    groups = [line for line in out.splitlines() if "prunable; out:" in line]
    assert groups and not any("low_classifier" in g.split("; in:")[0] for g in groups)  # never an output member


def test_inspect_ssdlite_by_name_keeps_every_head_predictor():
    out = _inspect("ssdlite320_mobilenet_v3_large", "--num-classes", "4", "--input-shape", "3,128,128")
    assert out.startswith("SSD (traced view SSDHeadOut) input (1, 3, 128, 128)")
    kept = dict(line.split(": ", 1) for line in _kept_section(out))
    assert len(kept) == 12
    for i in range(6):
        assert kept[f"head.classification_head.module_list.{i}.1"].startswith(
            f"class predictor of feature map {i}: out channels fixed by the task = 6 anchors x 4 classes")
        assert kept[f"head.regression_head.module_list.{i}.1"].endswith("= 6 anchors x 4 box deltas")
    members = " ".join(line.split("; in:")[0] for line in out.splitlines() if "prunable; out:" in line)
    assert "head.classification_head.module_list.0.0.0" in members  # the heads' depthwise blocks are slimmed
    assert not any(f"{name}," in members + "," for name in kept)  # no predictor's outputs are cut
    assert "at most removable (max_layer_ratio 0.8)" in out


def test_the_kept_list_is_the_one_the_pruner_ignores():
    """fixed_layer_names feeds both inspect and prune_once: the named predictors keep their out channels."""
    torch.manual_seed(0)
    model = build("ssdlite320_mobilenet_v3_large", 4).eval()
    before = {n: model.get_submodule(n).out_channels for n in fixed_layer_names(model)}
    pruned = prune_once(model, torch.zeros(1, 3, 128, 128), 0.5)
    assert {n: pruned.get_submodule(n).out_channels for n in before} == before
    body = "backbone.features.0.0.0"  # a backbone conv is cut, so something was pruned
    assert pruned.get_submodule(body).out_channels < model.get_submodule(body).out_channels


def test_inspect_task_models_refuse_what_the_task_pipeline_would(tmp_path):
    from edgeprune.commands.prune import run_inspect

    with pytest.raises(ConfigError, match="--ignore backbone.0: the segmentation pipeline"):
        run_inspect(None, config=EXAMPLES / "segmentation.yaml", ignore=["backbone.0"], max_layer_ratio=0.8)
    with pytest.raises(ConfigError, match="multiple of 32"):  # the detector's input checked as in `run`
        run_inspect(None, config=EXAMPLES / "detection.yaml", input_shape="3,100,100", ignore=[], max_layer_ratio=0.8)
    with pytest.raises(ConfigError, match="valid: classification, segmentation, detection"):
        run_inspect("lraspp_mobilenet_v3_large", task="panoptic", ignore=[], max_layer_ratio=0.8)
    with pytest.raises(ConfigError, match="needs a MODEL or --config"):
        run_inspect(None, ignore=[], max_layer_ratio=0.8)


def test_task_model_factories_are_trusted_first_and_built_without_downloads():
    from edgeprune.trust import UntrustedCodeError

    with pytest.raises(UntrustedCodeError, match="os:system"):
        build("os:system", 4)
    # torchvision's default weights_backbone would be downloaded (no network here): it is set to None
    model = build("torchvision.models.segmentation:lraspp_mobilenet_v3_large", 3)
    assert type(model).__name__ == "LRASPP" and model.classifier.low_classifier.out_channels == 3


def test_inspect_faster_rcnn_lists_the_box_head_as_pruned_in_its_own_graph():
    out = _inspect("fasterrcnn_mobilenet_v3_large_320_fpn", "--num-classes", "4", "--input-shape", "3,64,64")
    assert out.startswith("FasterRCNN (traced view RPNOut + RoI box head x 150 proposals) input (1, 3, 64, 64)")
    lines = out.splitlines()
    start = lines.index("pruned in a graph of their own (same ratio, L1): 2")
    assert lines[start + 1: start + 3] == ["  roi_heads.box_head.fc6: RoI box head x 150 proposals",
                                           "  roi_heads.box_head.fc7: RoI box head x 150 proposals"]
    assert "skip roi_heads.box_head" not in out  # no longer reported as unreachable
    kept = dict(line.split(": ", 1) for line in _kept_section(out))
    assert list(kept) == ["backbone.fpn", "rpn.head", "roi_heads.box_predictor"]
