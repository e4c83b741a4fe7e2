"""Task registry, segmentation / detection losses with KD, metric, export + ORT parity, run_task."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.config import FinetuneConfig, PipelineConfig, Precision, load_target
from edgeprune.errors import ConfigError, DataError, UnknownNameError
from edgeprune.tasks import det_ops, seg_ops
from edgeprune.tasks.models import build
from edgeprune.tasks.ops import TASKS, get_task
from edgeprune.tasks.writer import write_inspection_set

pytest.importorskip("torchmetrics")
KD = FinetuneConfig(kd_alpha=0.5, kd_temperature=2.0)


def _seg_model(k: int = 4):
    torch.manual_seed(0)
    return build("lraspp_mobilenet_v3_large", k).eval()


def _ssd(size: int = 128):
    torch.manual_seed(0)
    return det_ops.prepare(build("ssdlite320_mobilenet_v3_large", 4), size=(size, size), score_threshold=0.01).eval()


# ----------------------------------------------------------------------------- registry


def test_every_task_is_registered_and_unknown_names_list_the_valid_ones():
    assert TASKS.names() == ["classification", "detection", "segmentation"]
    for name in TASKS.names():
        ops = get_task(name)
        assert ops.name == name and ops.primary
    assert get_task("segmentation").primary == "mIoU" and get_task("detection").primary == "mAP@0.5"
    assert not get_task("classification").runs_here  # the classification pipeline keeps its own path
    with pytest.raises(UnknownNameError, match="valid: classification, detection, segmentation"):
        get_task("keypoints")


def test_config_task_field_is_validated():
    assert PipelineConfig().task == "classification"
    with pytest.raises(Exception, match="task"):
        PipelineConfig(task="keypoints")


# ----------------------------------------------------------------------------- segmentation


def test_segmentation_loss_is_ce_without_teacher_and_kd_vanishes_against_itself():
    model = _seg_model()
    x, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    with torch.no_grad():
        logits = model(x)["out"]
    ce = torch.nn.functional.cross_entropy(logits, masks)
    no_teacher = seg_ops.loss(model, None, x, masks, KD)
    assert torch.allclose(no_teacher, ce, atol=1e-5)
    with_self = seg_ops.loss(model, model, x, masks, KD)  # KL(p || p) = 0: only (1 - alpha) * CE is left
    assert torch.allclose(with_self, 0.5 * ce, atol=1e-5)
    other = copy.deepcopy(model)
    torch.nn.init.normal_(other.classifier.low_classifier.bias)  # other logits: the KD term grows
    assert float(seg_ops.loss(model, other, x, masks, KD)) > float(with_self) + 1e-3


def test_segmentation_loss_leaves_ignored_pixels_out_of_the_ce_and_backpropagates():
    model = _seg_model().train()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.full((2, 32, 32), 255)
    masks[:, :4, :4] = 1
    loss = seg_ops.loss(model, None, x, masks, KD, ignore_index=255)
    with torch.no_grad():
        logits = model.eval()(x)["out"]
    model.train()
    assert math.isfinite(float(loss))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the same loss as CE over the 32 labelled pixels only
    sel = logits.permute(0, 2, 3, 1)[:, :4, :4].reshape(-1, 4)
    ref = torch.nn.functional.cross_entropy(sel, torch.ones(len(sel), dtype=torch.long))
    assert abs(float(seg_ops.loss(model.eval(), None, x, masks, KD, ignore_index=255)) - float(ref)) < 1e-4


def test_class_weights_inverse_sqrt_frequency_by_hand():
    # 100 pixels: 60 background, 16 class 1, 4 class 2, class 3 absent, 20 ignored (255)
    masks = torch.cat([torch.zeros(60), torch.ones(16), torch.full((4,), 2), torch.full((20,), 255)]).long()
    assert seg_ops.class_weights(masks, 4, "none") is None
    w = seg_ops.class_weights(masks.reshape(1, 10, 10), 4, "inverse-sqrt-frequency", ignore_index=255)
    # f = (0.75, 0.2, 0.05, 0) over the 80 labelled pixels; 1/sqrt(f) = (1.155, 2.236, 4.472); absent class 3
    # gets the largest present weight; scaled so sum_k f_k w_k = 1: divide by 0.75*1.155+0.2*2.236+0.05*4.472
    raw = torch.tensor([1 / 0.75 ** 0.5, 1 / 0.2 ** 0.5, 1 / 0.05 ** 0.5, 1 / 0.05 ** 0.5])
    expected = raw / (0.75 * raw[0] + 0.2 * raw[1] + 0.05 * raw[2])
    assert torch.allclose(w, expected, atol=1e-5)
    assert float((torch.tensor([0.75, 0.2, 0.05, 0.0]) * w).sum()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="valid: none, inverse-sqrt-frequency"):
        seg_ops.class_weights(masks, 4, "focal")


def test_segmentation_loss_weighs_the_ce_per_class_and_not_the_kd():
    model = _seg_model().eval()
    x, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    w = torch.tensor([0.5, 2.0, 3.0, 4.0])
    with torch.no_grad():
        logits = model(x)["out"]
        ref = torch.nn.functional.cross_entropy(logits, masks, weight=w)
        assert torch.allclose(seg_ops.loss(model, None, x, masks, KD, class_weight=w), ref, atol=1e-5)
        # KD against itself is 0 whatever the weights: only (1 - alpha) * weighted CE is left
        assert torch.allclose(seg_ops.loss(model, model, x, masks, KD, class_weight=w), 0.5 * ref, atol=1e-5)


def test_segmentation_metric_on_perfect_and_on_model_predictions(tmp_path):
    from edgeprune.tasks.datasets import SegmentationData
    from edgeprune.tasks.metrics import segmentation_miou

    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[0, :8] = 1
    masks[1, :, :4] = 2
    data = SegmentationData(torch.randn(2, 3, 16, 16), masks, ["bg", "a", "b"], "test")
    perfect = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()  # (N, K, H, W)
    assert seg_ops.metric(perfect, data) == {"mIoU": 1.0, "pixel_acc": 1.0}
    model = _seg_model(3)
    logits = seg_ops.predict(model, data.images)
    assert logits.shape == (2, 3, 16, 16)
    got = seg_ops.metric(logits, data)
    assert got["mIoU"] == pytest.approx(segmentation_miou(logits, masks, num_classes=3).miou)


# ----------------------------------------------------------------------------- detection


def test_detection_prepare_refuses_sizes_the_transform_would_pad():
    with pytest.raises(ConfigError, match="multiple of 32"):
        det_ops.prepare(build("ssdlite320_mobilenet_v3_large", 4), size=(100, 100), score_threshold=0.1)


def test_detection_loss_adds_head_kd_and_backpropagates():
    model = _ssd()
    x = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}]  # an image without defects
    torch.manual_seed(1)
    plain = det_ops.loss(model.train(), None, x, targets, KD)
    other = copy.deepcopy(model).eval()
    for p in other.head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    torch.manual_seed(1)
    kd = det_ops.loss(model.train(), other, x, targets, KD)
    assert math.isfinite(float(plain)) and float(kd) > float(plain)
    kd.backward()
    assert model.head.classification_head.module_list[0][-1].weight.grad.abs().sum() > 0
    a = [torch.ones(2, 3)]
    assert float(det_ops.head_kd(a, a)) == 0.0 and float(det_ops.head_kd(a, [torch.zeros(2, 3)])) == 1.0


def test_detection_metric_perfect_boxes_and_label_maps():
    from edgeprune.tasks.datasets import DetectionData

    boxes = [torch.tensor([[4.0, 4.0, 20.0, 12.0]]), torch.zeros((0, 4))]
    labels = [torch.tensor([3]), torch.zeros((0,), dtype=torch.long)]
    data = DetectionData(torch.zeros(2, 3, 32, 32), boxes, labels, ["bg", "a", "b", "c"], "test")
    preds = [{"boxes": boxes[0], "scores": torch.tensor([0.9]), "labels": labels[0]},
             {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert det_ops.metric(preds, data) == {"mAP@0.5": 1.0, "mAP@0.5:0.95": 1.0}
    maps = det_ops.label_maps(data)
    assert maps.shape == (2, 32, 32) and int(maps[0].sum()) == 3 * 16 * 8 and int(maps[1].sum()) == 0


# ----------------------------------------------------------------------------- export + ORT parity


def _ort_target():
    return load_target("cpu-onnxruntime").model_copy(update={"threads": 1})


def test_segmentation_export_and_onnxruntime_parity(tmp_path):
    from edgeprune.tasks.deploy import compile_artifact, export_task_onnx, load_runner, run_per_image

    model = _seg_model()
    images = torch.randn(3, 3, 32, 32)
    view, names = seg_ops.export_view(model)
    path = export_task_onnx(view, images[:1], tmp_path / "m.onnx", names)
    art = compile_artifact(path, tmp_path / "fp32", target=_ort_target(), precision=Precision.fp32, calibration=None,
                           kind="LRASPP")
    got = seg_ops.collect(run_per_image(load_runner(art, _ort_target()), images))
    ref = seg_ops.predict(model, images)
    assert got.shape == ref.shape
    cfg = PipelineConfig().tasks
    p = seg_ops.parity(ref, got, cfg)
    assert p["ok"] and p["pixel_agreement"] == 1.0
    flipped = got.clone()
    flipped[:, [0, 1]] = flipped[:, [1, 0]]  # another class map on the whole image
    assert not seg_ops.parity(ref, flipped, cfg)["ok"]
    assert seg_ops.parity(ref, flipped, cfg, strict=False)["ok"]  # INT8: reported, judged by the metric


@pytest.mark.slow
def test_detection_export_with_nms_runs_on_onnxruntime_with_parity(tmp_path):
    from edgeprune.tasks.deploy import compile_artifact, export_task_onnx, float_scope, load_runner, run_per_image

    model = _ssd()
    images = torch.rand(2, 3, 128, 128)
    view, names = det_ops.export_view(model)
    path = export_task_onnx(view, images[:1], tmp_path / "d.onnx", names)
    art = compile_artifact(path, tmp_path / "fp32", target=_ort_target(), precision=Precision.fp32, calibration=None,
                           kind="SSD")
    got = det_ops.collect(run_per_image(load_runner(art, _ort_target()), images))
    ref = det_ops.predict(model, images)
    assert [len(g["boxes"]) for g in got] == [len(r["boxes"]) for r in ref] and len(ref[0]["boxes"]) > 0
    cfg = PipelineConfig(tasks={"score_threshold": 0.01}).tasks
    assert det_ops.parity(ref, got, cfg)["ok"]
    kept_float = float_scope(path, "onnxruntime", "SSD")  # anchors, decoding, NMS: left out of INT8
    assert kept_float and not any(n.startswith(("/model/backbone/", "/model/head/")) for n in kept_float)
    assert any("anchor_generator" in n for n in kept_float)


# ----------------------------------------------------------------------------- run_task


def _cfg(tmp_path, task: str, **tasks) -> PipelineConfig:
    target = tmp_path / "ort-fp32.yaml"
    target.write_text("name: ort-fp32\nbackend: onnxruntime\ndevice: CPU\nprecisions: [fp32]\nthreads: 1\n")
    arch = "lraspp_mobilenet_v3_large" if task == "segmentation" else "ssdlite320_mobilenet_v3_large"
    size = 32 if task == "segmentation" else 128
    return PipelineConfig.model_validate({
        "name": "t", "task": task, "model": {"arch": arch, "weights": None, "num_classes": 4},
        "data": {"preprocessing": {"channels": 3, "height": size, "width": size, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "tasks": {"synthetic_count": 16, "baseline_epochs": 0, "max_metric_drop_pt": 100.0, **tasks},
        "score": {"num_images": 8, "criterion": "sae-mi"}, "finetune": {"epochs": 1, "batch_size": 4},
        "bench": {"warmup_runs": 1, "warmup_s": 0.0, "min_runs": 3, "min_time_s": 0.0, "max_time_s": 1.0,
                  "baseline_rounds": 1},
        "targets": [str(target)]})


def _bad_mask_folder(tmp_path) -> Path:
    root = tmp_path / "set"
    write_inspection_set(root, seed=1, count=4, size=32)
    Image.fromarray(np.full((32, 32), 9, np.uint8), mode="L").save(root / "masks" / "00001.png")
    return root


def test_run_task_refuses_a_bad_mask_before_writing_anything(tmp_path):
    from edgeprune.tasks import run_task

    root = _bad_mask_folder(tmp_path)
    cfg = _cfg(tmp_path, "segmentation", source="mask-folder", images=root / "images", masks=root / "masks")
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"00001.png: unknown class id\(s\) \[9\]; valid: 0..3"):
        run_task(cfg, out)
    assert not out.exists()


@pytest.mark.parametrize("bbox,pattern", [([30.0, 2.0, 10.0, 5.0], "outside the image"),
                                          ([3.0, 2.0, -4.0, 5.0], "both must be > 0")])
def test_run_task_refuses_a_bad_box_before_writing_anything(tmp_path, bbox, pattern):
    from edgeprune.tasks import run_task

    root = tmp_path / "set"
    write_inspection_set(root, seed=1, count=4, size=32)
    ann = json.loads((root / "annotations.json").read_text())
    ann["annotations"][0]["bbox"] = bbox
    (root / "annotations.json").write_text(json.dumps(ann))
    cfg = _cfg(tmp_path, "detection", source="coco", annotations=root / "annotations.json", images=root / "images")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"preprocessing": cfg.data.preprocessing.model_copy(
        update={"height": 32, "width": 32})})})
    out = tmp_path / "run"
    with pytest.raises(DataError, match=pattern):
        run_task(cfg, out)
    assert not out.exists()


def test_run_task_refuses_classification_and_one_channel(tmp_path):
    from edgeprune.tasks import run_task

    with pytest.raises(ConfigError, match="classification pipeline"):
        run_task(PipelineConfig(), tmp_path / "run")
    cfg = _cfg(tmp_path, "segmentation")
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"preprocessing": cfg.data.preprocessing.model_copy(
        update={"channels": 1, "mean": [0.5], "std": [0.25]})})})
    with pytest.raises(ConfigError, match="3 channels"):
        run_task(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_task_segmentation_end_to_end(tmp_path):
    from edgeprune.tasks import run_task

    out = tmp_path / "run"
    report = run_task(_cfg(tmp_path, "segmentation"), out)
    assert 1.8 <= report["prune"]["macs_reduction"] <= 2.2
    assert report["score"]["criterion"].startswith("dense-sae-mi")
    (row,) = report["artifacts"]
    assert row["precision"] == "fp32" and row["parity"]["ok"] and row["parity"]["pixel_agreement"] >= 0.99
    assert row["metric"]["mIoU"] == pytest.approx(report["torch"]["pruned"]["mIoU"], abs=0.01)
    assert row["latency"]["p50_ms"]["pruned"] > 0 and row["latency"]["p50_ms"]["baseline"] > 0
    # the unpruned artifact is evaluated too: FP32 on ORT matches the unpruned PyTorch model
    assert row["baseline"]["metric"]["mIoU"] == pytest.approx(report["torch"]["baseline"]["mIoU"], abs=0.01)
    for f in ("report.json", "report.md", "model.onnx", "baseline.onnx", "scores.json", "finetune/last.pt"):
        assert (out / f).is_file(), f
    assert "| ort-fp32 | fp32 |" in (out / "report.md").read_text()
    # default: inverse-sqrt-frequency CE weights from the training masks, recorded; background weighs least
    cw = report["class_weight"]
    assert cw["mode"] == "inverse-sqrt-frequency" and len(cw["weights"]) == 4 and cw["weights"][0] == min(cw["weights"])
    again = run_task(_cfg(tmp_path, "segmentation"), out)  # the finished fine-tuning is resumed, not redone
    assert again["finetune"]["resumed_from"] is not None


def test_detection_parity_forgives_the_top_k_cut_but_not_a_moved_box():
    n = det_ops.MAX_DETECTIONS
    ref = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1) + torch.arange(float(n))[:, None],
            "scores": torch.linspace(0.9, 0.3, n), "labels": torch.ones(n, dtype=torch.long)}]
    got = [{k: v.clone() for k, v in ref[0].items()}]
    got[0]["boxes"][-1] += 50  # the last box of a capped image swapped for another at the same score
    cfg = PipelineConfig().tasks
    assert det_ops.parity(ref, got, cfg)["ok"]
    got[0]["boxes"][0] += 50  # the most confident box moved
    p = det_ops.parity(ref, got, cfg)
    assert not p["ok"] and (p["missing"], p["extra"], p["matched"]) == (1, 1, n - 2)


def test_fixed_layer_names_say_which_predictors_are_kept():
    from edgeprune.tasks.models import fixed_layer_names

    names = fixed_layer_names(_seg_model())
    assert set(names) == {"classifier.low_classifier", "classifier.high_classifier"}
    assert all("fixed by the task" in why for why in names.values())


@pytest.mark.slow
def test_cli_run_dispatches_on_task(tmp_path):
    """`edgeprune run --config seg.yaml` runs the task pipeline into <out>.partial and renames it when done."""
    import subprocess
    import sys

    import yaml

    cfg_path = tmp_path / "seg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(tmp_path, "segmentation").model_dump(mode="json")))
    out = tmp_path / "runs" / "seg"
    res = subprocess.run([sys.executable, "-m", "edgeprune", "run", "--config", str(cfg_path), "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ort-fp32 fp32: mIoU" in res.stdout and "pass" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "segmentation" and report["gate"]["passed"]
    assert (out / report["artifacts"][0]["path"]).exists()  # relative to the renamed run folder
    assert not out.with_name("seg.partial").exists()
    again = subprocess.run([sys.executable, "-m", "edgeprune", "run", "--config", str(cfg_path), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_run_task_refuses_weights_of_another_model_before_writing_anything(tmp_path):
    from edgeprune.errors import ModelLoadError
    from edgeprune.tasks import run_task

    cfg = _cfg(tmp_path, "segmentation")
    bundled = Path(__file__).resolve().parent.parent / "edgeprune" / "assets" / "fmnist_cnn.safetensors"
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": bundled})})
    with pytest.raises(ModelLoadError, match="do not fit LRASPP"):
        run_task(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_task_run_shares_the_run_folder_rules(tmp_path):
    """Task runs use context.Run: refused weights leave no folder; --resume checks the config it started with."""
    import subprocess
    import sys

    import yaml

    from edgeprune.config import resolve_targets
    from edgeprune.context import Run

    cfg = _cfg(tmp_path, "segmentation")
    bundled = Path(__file__).resolve().parent.parent / "edgeprune" / "assets" / "fmnist_cnn.safetensors"
    bad = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": bundled})})
    cfg_path, out = tmp_path / "seg.yaml", tmp_path / "runs" / "seg"
    cfg_path.write_text(yaml.safe_dump(bad.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "edgeprune", "run", "--config", str(cfg_path), "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "do not fit LRASPP" in res.stderr
    assert not out.exists() and not out.with_name("seg.partial").exists()

    unfinished = Run(cfg, resolve_targets(cfg.targets), out=out)  # an unfinished run started with another config
    unfinished.save()
    unfinished.release()  # ... whose process has ended
    cfg_path.write_text(yaml.safe_dump(cfg.model_copy(update={"name": "changed"}).model_dump(mode="json")))
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "config differs" in res.stderr and "name" in res.stderr
    assert out.with_name("seg.partial").exists()  # the unfinished run is kept


# ----------------------------------------------------------------------------- detection export contract


def test_batched_nms_without_branch_selects_like_torchvision_and_takes_no_boxes():
    from torchvision.ops import batched_nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores, idxs = torch.rand(200, generator=g), torch.randint(1, 4, (200,), generator=g)
    got = det_ops._batched_nms_without_branch(boxes, scores, idxs, 0.5)
    assert torch.equal(got, batched_nms(boxes, scores, idxs, 0.5))
    empty = det_ops._batched_nms_without_branch(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_detection_collect_reads_the_padded_outputs_and_refuses_a_broken_contract():
    k = 5
    boxes = np.zeros((k, 4), np.float32)
    boxes[:2] = [[0, 0, 4, 4], [1, 1, 3, 3]]
    scores = np.array([0.9, 0.5, 0, 0, 0], np.float32)
    labels = np.array([2, 1, -1, -1, -1], np.int64)
    got = det_ops.collect([[boxes, scores, labels, np.array(2)], [boxes * 0, scores * 0, np.full(k, -1), np.array(0)]])
    assert [len(g["boxes"]) for g in got] == [2, 0] and got[0]["labels"].tolist() == [2, 1]
    from edgeprune.errors import ExportError

    bad = labels.copy()
    bad[2] = 0  # a row after num_detections that is not padding (what an uninitialised output looks like)
    with pytest.raises(ExportError, match="padded contract.*num_detections 2"):
        det_ops.collect([[boxes, scores, bad, np.array(2)]])


@pytest.mark.slow
def test_detection_without_boxes_gives_no_boxes_on_every_runtime(tmp_path):
    """An image with no detection: OpenVINO once returned one uninitialised row (an ONNX If with an
    empty constant, from torchvision's batched NMS); ORT failed on Faster R-CNN's (0, -1) reshape."""
    from edgeprune.tasks.deploy import compile_artifact, export_task_onnx, load_runner, run_per_image

    model = det_ops.prepare(build("ssdlite320_mobilenet_v3_large", 4), size=(128, 128), score_threshold=0.999).eval()
    images = torch.rand(2, 3, 128, 128)
    ref = det_ops.predict(model, images)
    assert [len(r["boxes"]) for r in ref] == [0, 0]
    view, names = det_ops.export_view(model)
    path = export_task_onnx(view, images[:1], tmp_path / "d.onnx", names)
    for target in (_ort_target(), load_target("intel-cpu-openvino").model_copy(update={"threads": 1})):
        art = compile_artifact(path, tmp_path / target.name, target=target, precision=Precision.fp32,
                               calibration=None, kind="SSD")
        raw = run_per_image(load_runner(art, target), images)
        assert [r[0].shape for r in raw] == [(det_ops.MAX_DETECTIONS, 4)] * 2  # fixed-size outputs
        got = det_ops.collect(raw)
        assert [len(g["boxes"]) for g in got] == [0, 0], target.name
        cfg = PipelineConfig(tasks={"score_threshold": 0.999}).tasks
        assert det_ops.parity(ref, got, cfg)["ok"]


def test_clip_boxes_patch_matches_torchvision_and_exports_without_a_reshape(tmp_path):
    """torchvision's clip reshapes back to the boxes' shape; ONNX Runtime's optimizer turns that into a
    Reshape to (0, classes, -1), undefined for zero boxes (Faster R-CNN INT8 on an image whose proposals
    were all dropped). The patch stacks the four coordinates instead: same values, no Reshape."""
    import onnx
    import onnxruntime as ort
    from torchvision.ops import boxes as box_ops

    boxes = torch.rand(6, 4, 4) * 120 - 30
    for b in (boxes, boxes[:0], boxes[:, 0]):
        assert torch.equal(det_ops._clip_boxes_any_count(b, (50, 60)), box_ops.clip_boxes_to_image(b, (50, 60)))

    class Clip(torch.nn.Module):
        def forward(self, b, keep):  # the number of boxes is decided at run time, as after NMS
            return det_ops._clip_boxes_any_count(b[keep > 0.5], (50, 60))

    path = tmp_path / "clip.onnx"
    torch.onnx.export(Clip(), (boxes, torch.ones(6)), str(path), dynamo=False, input_names=["b", "k"], opset_version=17)
    assert "Reshape" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for keep in (torch.ones(6), torch.zeros(6), torch.tensor([1.0, 0, 1, 0, 0, 1])):
        got = sess.run(None, {"b": boxes.numpy(), "k": keep.numpy()})[0]
        assert np.allclose(got, box_ops.clip_boxes_to_image(boxes[keep > 0.5], (50, 60)).numpy())


def test_anchor_coverage_script_measures_the_example_detector(tmp_path):
    """scripts/anchor_coverage.py: anchor sizes vs box sizes of the example data, without training."""
    import runpy

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "anchor_coverage.py"))
    r = mod["coverage"](Path(__file__).resolve().parents[1] / "examples" / "detection.yaml")
    assert r["anchors"] > 0 and r["boxes"] > 0 and 0.0 <= r["share_best_iou_ge_0.5"] <= 1.0
    assert 0.0 < r["best_iou_median"] < 1.0 and r["anchor_side_min"] > 0
    with pytest.raises(ConfigError, match="needs task: detection"):
        mod["coverage"](Path(__file__).resolve().parents[1] / "examples" / "segmentation.yaml")
