"""The INT8 recovery ladder of the task path (edgeprune.tasks.int8 on edgeprune.int8_ladder): rung options merged
with a detector's float scope, the climb past a failing rung, the attempts recorded, only the shipped artifact left."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.backends import CompiledArtifact
from edgeprune.config import PipelineConfig, Precision, load_target
from edgeprune.int8_ladder import Rung
from edgeprune.tasks import deploy as task_deploy
from edgeprune.tasks import int8 as task_int8


def _ort_target():
    return load_target("cpu-onnxruntime").model_copy(update={"threads": 1, "precisions": [Precision.int8]})


# ----------------------------------------------------------------------------- options


def test_merge_options_unites_name_lists_and_overrides_the_rest():
    base = {"ignored_scope": ["/model/a", "/model/b"], "preset": "performance"}
    got = task_deploy.merge_options(base, {"ignored_scope": ["/model/b", "/c"], "preset": "mixed"})
    assert got == {"ignored_scope": ["/model/a", "/model/b", "/c"], "preset": "mixed"}
    assert base["ignored_scope"] == ["/model/a", "/model/b"]  # not changed in place


class _FakeBackend:
    """Records the options it is asked to compile with."""

    def __init__(self, name: str, key: str):
        self.name, self.key, self.seen = name, key, []

    def exclude_options(self, layers):
        return {self.key: list(layers)}

    def compile(self, onnx_path, out_dir, *, target, precision, calibration=None):
        self.seen.append(dict(target.options))
        return CompiledArtifact(target.name, self.name, precision.value, "CPU", Path(out_dir) / "m")


@pytest.mark.parametrize("backend,key", [("openvino", "ignored_scope"), ("onnxruntime", "nodes_to_exclude")])
def test_detector_rung_exclusions_are_merged_with_the_post_processing_float_scope(monkeypatch, tmp_path, backend, key):
    fake = _FakeBackend(backend, key)
    monkeypatch.setattr(task_deploy, "get_backend", lambda name: fake)
    monkeypatch.setattr(task_deploy, "float_scope", lambda path, b, kind: ["/model/nms", "/model/anchors"])
    target = load_target("intel-cpu-openvino" if backend == "openvino" else "cpu-onnxruntime")
    rung = Rung(2, "1 most sensitive layer(s) in float", {key: ["/model/backbone/conv0"], "preset": "mixed"})
    task_deploy.compile_artifact(tmp_path / "d.onnx", tmp_path / "out", target=target, precision=Precision.int8,
                                 calibration=None, kind="SSD", overrides=rung.options)
    (opts,) = fake.seen
    assert opts[key] == ["/model/backbone/conv0", "/model/nms", "/model/anchors"]
    assert opts["preset"] == "mixed"
    assert opts.get("fast_bias_correction") is (True if backend == "openvino" else None)  # forced for detectors


def test_rung_layers_missing_from_the_other_model_are_dropped_for_it(monkeypatch):
    class B:
        name = "onnxruntime"

        def exclude_options(self, layers):
            return {"nodes_to_exclude": list(layers)}

    monkeypatch.setattr(task_int8, "op_names", lambda path, backend: [("/a/Conv", "Conv"), ("/b/Add", "Add")])
    rung = Rung(2, "2 most sensitive layer(s) in float", {"nodes_to_exclude": ["/a/Conv", "/z/Conv"]},
                ["/a/Conv", "/z/Conv"])
    assert task_int8.for_model(rung, B(), Path("x.onnx")) == {"nodes_to_exclude": ["/a/Conv"]}
    assert task_int8.for_model(Rung(1, "reduce_range", {"reduce_range": True}), B(), Path("x")) == {"reduce_range": True}


# ----------------------------------------------------------------------------- rungs

# an LR-ASPP-like graph as OpenVINO names it: backbone convs, then the head (ops outside /model/backbone/)
HEAD = [(f"/model/classifier/op{i}/Conv", "Convolution") for i in range(14)] + [("/model/classifier/Add", "Add")]
GRAPH = ([("/model/backbone/b0/Conv", "Convolution"), ("/model/backbone/b0/HardSwish", "HSwish")] + HEAD
         + [("/model/classifier/Shape", "ShapeOf"), ("/model/classifier/Relu", "Relu"), ("logits", "Interpolate")])


class _LadderBackend:
    name = "openvino"

    def int8_rungs(self, target):
        return [("overflow_fix on every layer", {"overflow_fix": "enable"})]

    def exclude_options(self, layers):
        return {"ignored_scope": list(layers)}

    def quantizable_layers(self, onnx_path):
        raise AssertionError("rung 2 measures the head ops, not the backend's convolution list")


def test_head_layers_are_the_quantized_ops_outside_the_backbone_nearest_the_output(monkeypatch):
    monkeypatch.setattr(task_int8, "op_names", lambda path, backend: GRAPH)
    head = task_int8.head_layers(Path("m.onnx"), "openvino")
    assert len(head) == task_int8.MAX_SENSITIVITY_LAYERS and head[-1] == "/model/classifier/Add"
    assert head == [n for n, _ in HEAD][-task_int8.MAX_SENSITIVITY_LAYERS:]  # no backbone, shape op or Relu
    assert task_int8.head_layers(Path("m.onnx"), "openvino", cap=2) == ["/model/classifier/op13/Conv",
                                                                       "/model/classifier/Add"]


# an SSD-like graph: backbone, head convs, then box decoding (kept in float by the post-processing scope)
DET_GRAPH = [("/model/backbone/b0/Conv", "Convolution"),
             ("/model/head/classification_head/module_list.0/Conv", "Convolution"),
             ("/model/head/regression_head/module_list.0/Conv", "Convolution"),
             ("/model/head/Shape", "ShapeOf"), ("/model/box_coder/Mul", "Multiply"), ("/model/Add", "Add")]


def test_detection_rung_2_keeps_the_heads_in_float_without_a_ranking(monkeypatch):
    monkeypatch.setattr(task_int8, "op_names", lambda path, backend: DET_GRAPH)
    target = load_target("intel-cpu-openvino")
    rungs, ladder = task_int8.task_rungs(_LadderBackend(), target, Path("m.onnx"), "detection", None)
    got = list(rungs)
    assert [(r.index, r.name) for r in got] == [(0, "host defaults"), (1, "overflow_fix on every layer"),
                                                (2, task_int8.DETECTION_HEAD_RUNG)]
    heads = ["/model/head/classification_head/module_list.0/Conv", "/model/head/regression_head/module_list.0/Conv"]
    assert got[2].excluded == heads and got[2].options == {"ignored_scope": heads}
    assert ladder.sensitivity is None  # nothing was ranked
    monkeypatch.setattr(task_int8, "op_names", lambda path, backend: GRAPH)  # no detector heads: no rung 2
    rungs, _ = task_int8.task_rungs(_LadderBackend(), target, Path("m.onnx"), "detection", None)
    assert [r.index for r in rungs] == [0, 1]


def test_segmentation_ranks_the_head_ops(monkeypatch):
    monkeypatch.setattr(task_int8, "op_names", lambda path, backend: GRAPH)
    target = load_target("intel-cpu-openvino")
    measured: list = []

    def error_of(options):  # keeping the logits' Add in float helps most, then op13
        measured.append(options)
        layers = options.get("ignored_scope", [])
        return 1.0 - 0.5 * ("/model/classifier/Add" in layers) - 0.25 * ("/model/classifier/op13/Conv" in layers)

    rungs, ladder = task_int8.task_rungs(_LadderBackend(), target, Path("m.onnx"), "segmentation", error_of)
    got = list(rungs)
    assert [r.index for r in got] == [0, 1, 2, 2, 2]
    assert len(measured) == 1 + task_int8.MAX_SENSITIVITY_LAYERS  # the reference + one per head op
    ranked = [n for n, _ in ladder.sensitivity]
    assert ranked[:2] == ["/model/classifier/Add", "/model/classifier/op13/Conv"]
    assert got[2].excluded == ["/model/classifier/Add"] and got[2].options == {"ignored_scope": ["/model/classifier/Add"]}
    assert got[3].excluded == ranked[:2]


# ----------------------------------------------------------------------------- the climb, on disk


def _fake_check(results: dict[int, bool], raise_at: int | None = None):
    def check(rung: Rung, out_dir: Path) -> dict:
        if rung.index == raise_at:
            (out_dir).mkdir(parents=True)
            raise RuntimeError("compile failed half-way")
        out_dir.mkdir(parents=True)
        (out_dir / "model.onnx").write_text(f"rung {rung.index}")
        art = CompiledArtifact("t", "onnxruntime", "int8", "CPU", out_dir / "model.onnx", [out_dir / "model.onnx"])
        passed = results[rung.index]
        return {"passed": passed, "drop_pt": 0.4 if passed else 2.2, "path": str(art.path), "artifact": art,
                "parity": {"pixel_agreement": 0.99 if passed else 0.9}}
    return check


def test_climb_ships_the_first_passing_rung_and_leaves_only_it_on_disk(tmp_path):
    home = tmp_path / "int8" / "pruned"
    home.mkdir(parents=True)
    (home / "stale.txt").write_text("from an earlier run")
    rungs = iter([Rung(0, "host defaults"), Rung(1, "reduce_range", {"reduce_range": True}),
                  Rung(1, "never built", {})])
    row = task_int8.climb_task(_fake_check({0: False, 1: True}), rungs, home)
    lad = row["int8_ladder"]
    assert lad["shipped_rung"] == 1 and lad["shipped"] == "reduce_range" and lad["options"] == {"reduce_range": True}
    assert [(a["rung"], a["passed"], a["accuracy_drop_pt"]) for a in lad["attempts"]] == [(0, False, 2.2), (1, True, 0.4)]
    assert lad["agreement_measure"] == "pixel agreement" and lad["attempts"][1]["top1_agreement"] == 0.99
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["pruned"]  # no attempts/ left
    assert [p.name for p in home.iterdir()] == ["model.onnx"] and (home / "model.onnx").read_text() == "rung 1"
    assert row["path"] == str(home / "model.onnx") and row["artifact"].files == [home / "model.onnx"]


def test_climb_ships_the_smallest_drop_when_every_rung_fails_and_cleans_up_after_an_error(tmp_path):
    home = tmp_path / "int8" / "pruned"
    row = task_int8.climb_task(_fake_check({0: False}), iter([Rung(0, "host defaults")]), home, not_climbed="why")
    assert row["int8_ladder"]["shipped_rung"] == 0 and row["int8_ladder"]["not_climbed"] == "why"
    assert (home / "model.onnx").read_text() == "rung 0"
    with pytest.raises(RuntimeError, match="half-way"):
        task_int8.climb_task(_fake_check({0: False}, raise_at=1), iter([Rung(0, "host defaults"), Rung(1, "x")]), home)
    assert not (tmp_path / "int8").exists() or not any((tmp_path / "int8").iterdir())  # nothing stale, nothing half


def test_detection_agreement_is_the_matched_fraction():
    value, what = task_int8.agreement({"matched": 6, "ref_boxes": 8, "got_boxes": 7})
    assert value == pytest.approx(0.75) and what.startswith("matched boxes")


# ----------------------------------------------------------------------------- deploy, with ONNX Runtime INT8


def _tiny_segmentation(train: int):
    """A random-weight LR-ASPP (4 classes, seed 0) with a random 32 px split: ``train`` + 3 eval images."""
    from edgeprune.tasks.datasets import SegmentationData
    from edgeprune.tasks.loading import Split
    from edgeprune.tasks.models import build
    from edgeprune.tasks.ops import get_task

    torch.manual_seed(0)
    model = build("lraspp_mobilenet_v3_large", 4).eval()
    classes = ["background", "a", "b", "c"]
    data = Split(SegmentationData(torch.randn(train, 3, 32, 32), torch.randint(0, 4, (train, 32, 32)), classes, "t"),
                 SegmentationData(torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3, 32, 32)), classes, "t"))
    return model, data, get_task("segmentation")


@pytest.mark.slow
def test_deploy_climbs_past_a_failing_rung_0_on_onnxruntime(monkeypatch, tmp_path):
    from edgeprune.tasks import run as task_run

    model, data, ops = _tiny_segmentation(train=32)
    ref = ops.predict(model, data.eval.images)
    compiled, real_check = [], task_run.check_artifact
    real_compile = task_deploy.compile_artifact

    def compile_spy(onnx_path, out_dir, **kw):
        compiled.append((Path(onnx_path).name, Path(out_dir).name, kw.get("overrides")))
        return real_compile(onnx_path, out_dir, **kw)

    def gate(*args, overrides=None, **kw):  # rung 0 fails its gate, whatever the host gives
        row = real_check(*args, overrides=overrides, **kw)
        if not overrides:
            row["passed"], row["drop_pt"] = False, 5.0
        return row

    monkeypatch.setattr(task_deploy, "compile_artifact", compile_spy)
    monkeypatch.setattr(task_run, "check_artifact", gate)
    monkeypatch.setattr(task_run, "resolve_targets", lambda targets: [_ort_target()])
    cfg = PipelineConfig.model_validate({"task": "segmentation", "bench": {
        "warmup_runs": 1, "warmup_s": 0.0, "min_runs": 2, "min_time_s": 0.0, "max_time_s": 0.5, "baseline_rounds": 1}})
    base = ops.metric(ref, data.eval)["mIoU"]  # the pruned PyTorch model itself is within the gate
    (row,) = task_run.deploy(cfg, ops, model, model, data, tmp_path, ref, base)
    lad = row["int8_ladder"]
    assert lad["shipped_rung"] == 1 and lad["options"] == {"reduce_range": True} and row["passed"]
    assert [(a["rung"], a["passed"]) for a in lad["attempts"]] == [(0, False), (1, True)]
    where = tmp_path / "artifacts" / "cpu-onnxruntime" / "int8"
    assert sorted(p.name for p in where.iterdir()) == ["baseline", "pruned"]
    assert sorted(p.name for p in (where / "pruned").iterdir()) == ["artifact.json", "model.onnx"]
    assert row["path"] == str(where / "pruned" / "model.onnx")
    # the unpruned model is timed with the shipped rung's settings
    assert compiled[-1] == ("baseline.onnx", "baseline", {"reduce_range": True})
    assert row["latency"]["p50_ms"]["baseline"] > 0 and row["latency"]["p50_ms"]["pruned"] > 0


@pytest.mark.slow
def test_sensitivity_probe_compiles_with_the_configured_calibration(monkeypatch, tmp_path):
    """Rung 2's error probe (segmentation): one INT8 compile on tasks.calibration_images, a finite logit error."""
    from edgeprune.tasks import run as task_run

    model, data, ops = _tiny_segmentation(train=48)
    view, names = ops.export_view(model)
    onnx = task_deploy.export_task_onnx(view, data.eval.images[:1], tmp_path / "model.onnx", names)
    cfg = PipelineConfig.model_validate({"task": "segmentation", "tasks": {"calibration_images": 40}})
    seen = []
    real_compile = task_deploy.compile_artifact

    def compile_spy(onnx_path, out_dir, **kw):
        seen.append(len(kw["calibration"]))
        return real_compile(onnx_path, out_dir, **kw)

    monkeypatch.setattr(task_deploy, "compile_artifact", compile_spy)
    error_of = task_run._sensitivity_probe(cfg, ops, _ort_target(), onnx, data, model, "LRASPP", tmp_path / "probe")
    err = error_of({})
    assert seen == [40] and np.isfinite(err) and err >= 0.0
    assert not any((tmp_path / "probe").glob("s*"))  # each compile is removed once measured
