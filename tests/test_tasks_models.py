"""torchvision task models: build without weights, run, prune to ~2x MACs with the predictors kept."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import UnknownNameError
from edgeprune.tasks.models import build, fixed_layers, prune_to_macs, traced_view

pytest.importorskip("torch_pruning")


def test_unknown_task_model_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="valid: lraspp_mobilenet_v3_large, deeplabv3"):
        build("unet", 4)


@pytest.mark.slow
def test_lraspp_prunes_to_2x_macs_keeping_the_class_convs():
    torch.manual_seed(0)
    model = build("lraspp_mobilenet_v3_large", 4).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert traced_view(model)(x).shape == (1, 4, 128, 128)
    res = prune_to_macs(model, x, reduction=2.0, tolerance=0.1)
    assert 1.9 <= res.reduction <= 2.1
    pruned = res.model
    low, high = fixed_layers(pruned)
    assert low.out_channels == high.out_channels == 4
    before = {n: p.shape for n, p in model.named_parameters()}
    after = {n: p.shape for n, p in pruned.named_parameters()}
    assert after["classifier.low_classifier.weight"][0] == before["classifier.low_classifier.weight"][0]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert any(after[n] != before[n] for n in before if n.startswith("backbone."))  # the backbone was slimmed
    with torch.no_grad():
        out = traced_view(pruned)(x)
    assert out.shape == (1, 4, 128, 128) and torch.isfinite(out).all()


def _out_channels(mods) -> list:
    return [[p.shape[0] for n, p in m.named_parameters() if n.endswith("weight")] for m in mods]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,reduction", [
    ("deeplabv3_mobilenet_v3_large", 128, 2.0),
    ("ssdlite320_mobilenet_v3_large", 320, 2.0),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 2.0),  # FPN and RPN head kept; box head in its own graph
])
def test_other_task_models_prune_and_still_run(name, size, reduction):
    torch.manual_seed(0)
    model = build(name, 4).eval()
    x = torch.rand(1, 3, size, size)
    res = prune_to_macs(model, x, reduction=reduction, tolerance=0.1)
    assert abs(res.reduction - reduction) <= 0.1
    assert _out_channels(fixed_layers(res.model)) == _out_channels(fixed_layers(model))
    if name.startswith("fasterrcnn"):  # the box head, 1024 wide, was slimmed in its own graph
        assert res.model.roi_heads.box_head.fc7.out_features < 1024
        assert res.model.roi_heads.box_predictor.cls_score.in_features == res.model.roi_heads.box_head.fc7.out_features
    with torch.no_grad():
        if name.startswith("deeplab"):
            assert traced_view(res.model)(x).shape == (1, 4, size, size)
        else:  # the whole detector, post-processing included, still runs on the pruned weights
            det = res.model([x[0]])[0]
            assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["labels"]) == len(det["scores"])


def test_faster_rcnn_macs_count_the_box_head_once_per_proposal():
    from edgeprune.tasks.models import count_macs, extra_views, macs_of, model_macs

    model = build("fasterrcnn_mobilenet_v3_large_320_fpn", 4).eval()
    x = torch.rand(1, 3, 64, 64)
    (extra,) = extra_views(model)
    assert extra.per_image == model.rpn._post_nms_top_n["testing"] and tuple(extra.example.shape) == (1, 256, 7, 7)
    head = model.roi_heads.box_head
    per_roi = head.fc6.in_features * head.fc6.out_features + head.fc7.in_features * head.fc7.out_features + \
        head.fc7.out_features * (4 + 16)  # fc6, fc7, class scores (4) and box deltas (4 x 4)
    assert count_macs(extra.view, extra.example) == pytest.approx(per_roi, rel=1e-3)
    assert model_macs(model, x) == count_macs(traced_view(model), x) + extra.per_image * count_macs(extra.view, extra.example)
    assert "RoI box head x 150 proposals" in macs_of(model)
    assert extra_views(build("lraspp_mobilenet_v3_large", 4)) == []
