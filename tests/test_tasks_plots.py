"""Plots of a segmentation / detection run (edgeprune.tasks.plots): written, embedded, and never fatal."""
from __future__ import annotations

import json

import pytest
import torch

from edgeprune.config import PipelineConfig
from edgeprune.tasks import plots
from edgeprune.tasks.datasets import DetectionData, SegmentationData
from edgeprune.tasks.report_md import render

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["background", "scratch", "spot", "crack"]
PRE = PipelineConfig.model_validate({"data": {"preprocessing": {"channels": 3, "height": 32, "width": 32,
                                                                "mean": [0.5] * 3, "std": [0.25] * 3}}})


def _report(metric: str, **over) -> dict:
    rows = [{"target": t, "precision": p, "path": f"artifacts/{t}/{p}/pruned", "metric": {metric: v},
             "drop_pt": 100 * (0.62 - v), "parity": {"pixel_agreement": 0.99, "ok": True}, "passed": v >= 0.61,
             "latency": {"p50_ms": {"baseline": b, "pruned": q}, "speedup": b / q}}
            for t, p, v, b, q in (("cpu-onnxruntime", "fp32", 0.615, 4.0, 2.1), ("cpu-onnxruntime", "int8", 0.60, 2.5, 1.4),
                                  ("intel-cpu-openvino", "fp32", 0.614, 3.1, 1.7))]
    r = {"name": "fake", "task": "segmentation", "model": "m", "primary_metric": metric,
         "data": {"source": "synthetic", "train": 8, "eval": 6, "classes": CLASSES},
         "score": {"criterion": "l1 (group magnitude)"},
         "prune": {"ratio": 0.3, "macs_before": 200, "macs_after": 100, "macs_reduction": 2.0, "macs_of": "view",
                   "params_before": 10, "params_after": 5},
         "torch": {"baseline": {metric: 0.62}, "pruned": {metric: 0.615}, "drop_pt": 0.5, "passed": True},
         "artifacts": rows, "gate": {"max_metric_drop_pt": 1.0, "passed": False}, "seconds": 1.0}
    r.update(over)
    return r


def _seg(n: int = 6, k: int = 4):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 32, 32, dtype=torch.long)
    masks[1, 4:12, 4:20] = 1
    masks[3, 20:28, 10:14] = 3
    masks[3, 0, 0] = 255  # ignore_index
    data = SegmentationData(torch.randn(n, 3, 32, 32, generator=g), masks, CLASSES[:k], "fake")
    return data, torch.randn(n, k, 32, 32, generator=g), torch.randn(n, k, 32, 32, generator=g)


def _det(n: int = 5):
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[2.0, 3.0, 12.0, 15.0]]) if i % 2 else torch.zeros(0, 4) for i in range(n)]
    labels = [torch.tensor([2]) if i % 2 else torch.zeros(0, dtype=torch.long) for i in range(n)]
    data = DetectionData(torch.randn(n, 3, 32, 32, generator=g), boxes, labels, CLASSES, "fake")

    def pred(m: int) -> dict:
        xy = torch.rand(m, 2, generator=g) * 20
        return {"boxes": torch.cat([xy, xy + 5], 1), "scores": torch.rand(m, generator=g),
                "labels": torch.randint(1, 4, (m,), generator=g)}

    return data, [pred(3 if i else plots.MAX_BOXES + 7) for i in range(n)], [pred(2) for _ in range(n)]


def _write(tmp_path, report, data, base, pruned):
    return plots.write_task_plots(report, tmp_path, data=data, ref_base=base, ref_pruned=pruned,
                                  preprocessing=PRE.data.preprocessing, ignore_index=255)


def _assert_pngs(tmp_path, entries):
    assert [e["file"] for e in entries] == [plots.METRIC_VS_LATENCY, plots.OVERLAYS]
    for e in entries:
        data = (tmp_path / e["file"]).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, e
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left


def test_segmentation_plots_are_written_and_embedded(tmp_path):
    report = _report("mIoU")
    data, base, pruned = _seg()
    report["plots"] = _write(tmp_path, report, data, base, pruned)
    _assert_pngs(tmp_path, report["plots"])
    md = render(report)
    assert f"]({plots.METRIC_VS_LATENCY})" in md and f"]({plots.OVERLAYS})" in md and "## Plots" in md
    json.dumps(report)  # report.json stays serialisable


def test_detection_plots_are_written_with_many_boxes_cut(tmp_path):
    data, base, pruned = _det()
    entries = _write(tmp_path, _report("mAP@0.5", task="detection"), data, base, pruned)
    _assert_pngs(tmp_path, entries)
    assert plots.pick_images(data, 3) == [1, 3, 0]  # images with boxes first, in eval order
    fig, ax = plots.pyplot().subplots()
    try:  # image 0: MAX_BOXES + 7 predicted boxes, the best MAX_BOXES drawn
        got = plots._draw_boxes(ax, data, 0, base[0], plots._class_colors(4))
        assert got == f" ({plots.MAX_BOXES + 7} boxes, top {plots.MAX_BOXES} drawn)"
        assert len(ax.patches) == plots.MAX_BOXES
        assert plots._draw_boxes(ax, data, 1, None, plots._class_colors(4)) == " (1 boxes)"  # ground truth
    finally:
        plots.pyplot().close(fig)


def test_overlays_pick_defect_images_and_undo_the_normalization():
    data, _, _ = _seg()
    assert plots.pick_images(data, 4, ignore_index=255) == [1, 3, 0, 2]
    img = plots.display_image(torch.tensor([[[0.0]], [[2.0]], [[-4.0]]]), [0.5], [0.25])
    assert img.shape == (1, 1, 3) and img[0, 0].tolist() == [0.5, 1.0, 0.0]  # x * std + mean, clipped to [0, 1]


def test_a_plot_that_fails_is_reported_and_the_other_still_written(tmp_path, monkeypatch):
    (tmp_path / plots.OVERLAYS).write_bytes(PNG + b"an earlier run's figure")

    def broken(*a, **k):
        raise ValueError("bad logits shape")

    monkeypatch.setattr(plots, "overlays", broken)
    report = _report("mIoU")
    data, base, pruned = _seg()
    with pytest.warns(RuntimeWarning, match="overlays.png not written: ValueError: bad logits shape"):
        report["plots"] = _write(tmp_path, report, data, base, pruned)
    latency, overlay = report["plots"]
    assert (tmp_path / latency["file"]).read_bytes().startswith(PNG)
    assert overlay["file"] is None and overlay["error"] == "ValueError: bad logits shape"
    assert not (tmp_path / plots.OVERLAYS).exists()  # no stale figure under this run's report
    assert "Plot `overlays`" in render(report) and "is missing: ValueError: bad logits shape" in render(report)


def test_metric_vs_latency_without_timed_artifacts_says_so(tmp_path):
    report = _report("mIoU", artifacts=[])
    data, base, pruned = _seg()
    with pytest.warns(RuntimeWarning):
        entries = _write(tmp_path, report, data, base, pruned)
    assert entries[0]["error"] == "LookupError: no artifact has a measured p50 latency"
    assert entries[1]["file"] == plots.OVERLAYS


def test_run_task_keeps_its_report_when_a_plot_fails(tmp_path, monkeypatch):
    """The one call in run_task: plots listed in report.json and report.md; a failing plot costs nothing else."""
    from edgeprune.tasks import run as task_run
    from edgeprune.tasks.loading import Split
    from edgeprune.tasks.ops import get_task

    data, base, pruned = _seg()
    fake = _report("mIoU")
    rows = fake.pop("artifacts")
    for row in rows:
        row["path"] = str(tmp_path / row["path"])
    monkeypatch.setattr(task_run, "fit", lambda cfg, out: task_run.Fitted(
        get_task("segmentation"), Split(data, data), torch.nn.Identity(), torch.nn.Identity(),
        {k: fake[k] for k in ("name", "task", "model", "primary_metric", "data", "score", "prune", "torch")},
        pruned, base))
    monkeypatch.setattr(task_run, "deploy", lambda *a, **k: rows)

    def broken(report):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "metric_vs_latency", broken)
    cfg = PipelineConfig.model_validate({"task": "segmentation", "data": PRE.data.model_dump()})
    with pytest.warns(RuntimeWarning, match="no display"):
        report = task_run.run_task(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["plots"] == report["plots"] and on_disk["gate"] == report["gate"]
    assert [p["file"] for p in on_disk["plots"]] == [None, plots.OVERLAYS]
    md = (tmp_path / "report.md").read_text()
    assert "is missing: RuntimeError: no display" in md and f"]({plots.OVERLAYS})" in md
    assert "| cpu-onnxruntime | int8 |" in md  # the table is still there


def test_metric_vs_latency_draws_both_points_per_artifact_and_a_floor_above_zero():
    report = _report("mIoU")
    fig = plots.metric_vs_latency(report)
    try:
        ax = fig.axes[0]
        assert len(ax.collections) == 2 * len(report["artifacts"])  # pruned and unpruned point per artifact
        pruned = sorted(tuple(c.get_offsets()[0]) for c in ax.collections[::2])
        assert pruned == sorted((a["latency"]["p50_ms"]["pruned"], 100 * a["metric"]["mIoU"]) for a in report["artifacts"])
        assert sorted(line.get_ydata()[0] for line in ax.lines) == pytest.approx([61.0, 62.0])  # floor, unpruned
    finally:
        plots.pyplot().close(fig)
    report["gate"]["max_metric_drop_pt"] = 100.0  # a floor below 0 bounds nothing: not drawn
    fig = plots.metric_vs_latency(report)
    try:
        assert [line.get_ydata()[0] for line in fig.axes[0].lines] == pytest.approx([62.0])
    finally:
        plots.pyplot().close(fig)
