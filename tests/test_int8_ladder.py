"""ISA detection, the ISA -> INT8 settings choice (injected feature sets), and the recovery ladder's
control flow with fake attempts."""
from __future__ import annotations

import pytest
import torch

from edgeprune.envinfo import isa_features, isa_summary
from edgeprune.int8_ladder import Attempt, Int8Ladder, Rung, climb, logit_error, rank_sensitivity

# /proc/cpuinfo flags of three kinds of machine
EPYC_ZEN2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # AVX2, no VNNI: the machine of issue 13
XEON_ICX = EPYC_ZEN2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SAPPHIRE = XEON_ICX | {"avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni"}
GRAVITON2 = {"fp", "asimd", "fphp", "asimdhp", "asimddp"}
CORTEX_A53 = {"fp", "asimd"}


def isa(flags: set[str], machine: str = "x86_64", caps=()) -> dict:
    return isa_features(flags, machine, ov_capabilities=list(caps) if caps else [])


def test_isa_features_from_flags():
    zen2 = isa(EPYC_ZEN2)
    assert zen2["arch"] == "x86_64" and zen2["avx2"] and not zen2["vnni"] and not zen2["int8_dot"]
    icx = isa(XEON_ICX)
    assert icx["avx512f"] and icx["avx512_vnni"] and icx["vnni"] and icx["int8_dot"] and not icx["amx_int8"]
    spr = isa(SAPPHIRE, caps=["FP32", "FP16", "INT8"])
    assert spr["amx_int8"] and spr["avx_vnni"] and spr["fp16_compute"] is True
    arm = isa(GRAVITON2, "aarch64")
    assert arm["arch"] == "arm64" and arm["dotprod"] and arm["int8_dot"] and not arm["i8mm"]
    assert isa(CORTEX_A53, "aarch64")["int8_dot"] is False


def test_fp16_compute_prefers_openvino_capabilities():
    assert isa_features(XEON_ICX, "x86_64", ov_capabilities=["FP32", "INT8"])["fp16_compute"] is False
    assert isa_features(XEON_ICX, "x86_64", ov_capabilities=["FP32", "FP16"])["fp16_compute"] is True


def test_isa_of_this_machine_is_recorded():
    info = isa_features()
    assert info["arch"] and "source" in info
    assert isa_summary(info).startswith(f"{info['arch']}:")


@pytest.mark.parametrize("flags, machine, reduce", [
    (EPYC_ZEN2, "x86_64", True), (XEON_ICX, "x86_64", False), (SAPPHIRE, "x86_64", False),
    (GRAVITON2, "aarch64", False), (CORTEX_A53, "aarch64", False),
])
def test_ort_reduce_range_exactly_where_u8s8_saturates(flags, machine, reduce):
    from edgeprune.backends.onnxruntime_backend import int8_settings

    chosen = int8_settings(isa(flags, machine), {})
    assert chosen["reduce_range"] is reduce and chosen["activation_type"] == "uint8"
    assert chosen["reason"]


def test_ort_explicit_options_win_and_s8s8_keeps_full_range():
    from edgeprune.backends.onnxruntime_backend import int8_settings

    assert int8_settings(isa(EPYC_ZEN2), {"reduce_range": False})["reduce_range"] is False
    assert int8_settings(isa(XEON_ICX), {"reduce_range": True})["reduce_range"] is True
    assert int8_settings(isa(EPYC_ZEN2), {"activation_type": "int8"})["reduce_range"] is False


@pytest.mark.parametrize("flags, fix", [(EPYC_ZEN2, "enable"), (XEON_ICX, "first_layer_only"),
                                        (SAPPHIRE, "first_layer_only")])
def test_openvino_overflow_fix_from_isa(flags, fix):
    from edgeprune.backends.openvino_backend import int8_settings

    assert int8_settings(isa(flags), {})["overflow_fix"] == fix
    assert int8_settings(isa(flags), {"overflow_fix": "disable"})["overflow_fix"] == "disable"


def test_ort_quantizes_with_reduce_range_when_the_host_lacks_vnni(monkeypatch, tmp_path):
    """The real compile path on an injected AVX2-only ISA records reduce_range in the artifact."""
    import numpy as np
    import torch

    from edgeprune import envinfo
    from edgeprune.backends import get_backend
    from edgeprune.config import Precision, TargetConfig
    from edgeprune.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    onnx_path = export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "m.onnx")
    monkeypatch.setattr(envinfo, "isa_features", lambda *a, **k: isa(EPYC_ZEN2))
    target = TargetConfig(name="t", backend="onnxruntime", precisions=["int8"])
    calib = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
    art = get_backend("onnxruntime").compile(onnx_path, tmp_path / "a", target=target, precision=Precision.int8,
                                             calibration=calib)
    assert art.meta["reduce_range"] is True and art.meta["int8_settings"]["reduce_range"] is True


# ----------------------------------------------------------------------------- the ladder


def fake_attempt(passing: set[tuple[int, str]], log: list):
    def attempt(rung: Rung) -> Attempt:
        log.append((rung.index, rung.name))
        ok = (rung.index, rung.name) in passing
        return Attempt(rung, ok, drop_pt=0.2 if ok else 3.0 - rung.index, agreement=0.99 if ok else 0.9)
    return attempt


def test_climb_stops_at_the_first_passing_rung():
    log: list = []
    rungs = [Rung(0, "defaults"), Rung(1, "a"), Rung(1, "b"), Rung(2, "float")]
    shipped, tried = climb(iter(rungs), fake_attempt({(1, "a"), (2, "float")}, log))
    assert shipped.rung.name == "a" and len(tried) == 2 and log == [(0, "defaults"), (1, "a")]


def test_climb_passing_rung_zero_tries_nothing_else():
    log: list = []
    shipped, tried = climb(iter([Rung(0, "defaults"), Rung(1, "a")]), fake_attempt({(0, "defaults")}, log))
    assert shipped.rung.index == 0 and log == [(0, "defaults")]


def test_climb_none_passes_ships_the_smallest_drop():
    shipped, tried = climb(iter([Rung(0, "d"), Rung(1, "a"), Rung(2, "f")]), fake_attempt(set(), []))
    assert len(tried) == 3 and not shipped.passed and shipped.rung.index == 2


class FakeBackend:
    def __init__(self):
        self.ranked = 0

    def int8_rungs(self, target):
        return [("reduce_range", {"reduce_range": True})]

    def exclude_options(self, layers):
        return {"nodes_to_exclude": list(layers)}

    def quantizable_layers(self, onnx_path):
        self.ranked += 1
        return ["conv1", "conv2", "fc"]


class FakeTarget:
    options = {"max_float_layers": 2}


def test_ladder_rungs_rank_sensitivity_lazily_and_keep_top_k_in_float():
    # keeping conv2 in float helps most, then fc
    errors = {(): 0.5, ("conv1",): 0.45, ("conv2",): 0.1, ("fc",): 0.3}
    backend = FakeBackend()
    ladder = Int8Ladder(backend, FakeTarget(), "m.onnx",
                        lambda opts: errors[tuple(opts.get("nodes_to_exclude", ()))])
    gen = ladder.rungs()
    assert next(gen).index == 0 and next(gen).options == {"reduce_range": True}
    assert backend.ranked == 0  # no sensitivity pass before rung 2 is reached
    r2a, r2b = next(gen), next(gen)
    assert backend.ranked == 1 and r2a.excluded == ["conv2"] and r2b.excluded == ["conv2", "fc"]
    assert r2b.options == {"nodes_to_exclude": ["conv2", "fc"]}
    assert next(gen, None) is None
    assert [n for n, _ in ladder.sensitivity] == ["conv2", "fc", "conv1"]


def test_ladder_fake_gate_failing_rung0_runs_rung1():
    backend = FakeBackend()
    ladder = Int8Ladder(backend, FakeTarget(), "m.onnx", lambda opts: 0.0)
    log: list = []
    shipped, tried = climb(ladder.rungs(), fake_attempt({(1, "reduce_range")}, log))
    assert log == [(0, "host defaults"), (1, "reduce_range")] and shipped.rung.options == {"reduce_range": True}
    assert backend.ranked == 0


def test_rank_and_error_helpers():
    import numpy as np

    assert rank_sensitivity({"a": 0.4, "b": 0.1}, 0.5)[0][0] == "b"
    ref = np.ones((4, 3))
    assert logit_error(ref, ref) == 0.0 and logit_error(2 * ref, ref) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend, excluded_key, n_layers, main_file", [
    ("onnxruntime", "nodes_to_exclude", 7, "model.onnx"), ("openvino", "ignored_scope", 3, "model.xml")])
def test_climb_int8_ships_rung2_with_sensitive_layers_in_float(monkeypatch, tmp_path, tiny_model, tiny_data,
                                                                backend, excluded_key, n_layers, main_file):
    """The real ORT ladder in the compile stage, with a fake evaluation that fails every rung keeping
    no layer in float: rung 0 and both rung-1 settings are tried, the sensitivity pass runs, and the
    rung-2 artifact ships in artifacts/<target>/int8 with its record."""
    from types import SimpleNamespace

    from edgeprune.stages import ladder as ladder_stage
    from edgeprune.config import BenchConfig, TargetConfig
    from edgeprune.export import export_onnx

    extra: dict = {}
    if backend == "openvino":  # NNCF is slow per run: a 3-layer model, and rung 1 already in the options
        pytest.importorskip("nncf")
        torch.manual_seed(0)
        tiny_model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                         torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 4)).eval()
        extra = {"overflow_fix": "enable", "preset": "mixed"}
    onnx_path = export_onnx(tiny_model, tiny_data.images[:1], tmp_path / "m.onnx")
    real_evaluate = ladder_stage.evaluate_artifact

    def fake_evaluate(run, inp, model, artifact, target):
        parity, accuracy = real_evaluate(run, inp, model, artifact, target)
        if not artifact.meta.get(excluded_key):
            parity = {**parity, "top1_agreement": 0.5}
            accuracy = 0.0
        return parity, accuracy

    monkeypatch.setattr(ladder_stage, "evaluate_artifact", fake_evaluate)
    run = SimpleNamespace(dir=tmp_path / "run", progress=False, report={"accuracy": {"baseline": 0.0}},
                          cfg=SimpleNamespace(export=SimpleNamespace(parity_images=16),
                                              data=SimpleNamespace(batch_size=256),
                                              bench=BenchConfig(warmup_runs=1, warmup_s=0, min_runs=5, min_time_s=0)))
    run.dir.mkdir()
    inp = SimpleNamespace(calibration=SimpleNamespace(data=tiny_data), eval=tiny_data)
    target = TargetConfig(name="t", backend=backend, precisions=["int8"], dynamic_batch=True,
                          min_top1_agreement={"int8": 0.9},
                          options={"min_calibration": 16, "max_float_layers": 1, **extra})
    row = ladder_stage.climb_int8(run, inp, tiny_model, onnx_path, target)
    lad = row["ladder"]
    assert [a["rung"] for a in lad["attempts"]] == ([0, 2] if extra else [0, 1, 1, 2])
    assert lad["shipped_rung"] == 2 and len(lad["excluded"]) == 1 and row["status"] == "ok"
    assert lad["excluded"][0] == lad["sensitivity"][0]["layer"] and len(lad["sensitivity"]) == n_layers
    assert row["meta"][excluded_key] == lad["excluded"] and lad["rung0_p50_ms"] > 0 and lad["p50_vs_rung0"] > 0
    home = run.dir / "artifacts" / "t"
    assert sorted(p.name for p in home.iterdir()) == ["int8"] and (home / "int8" / main_file).exists()
    assert not [p for p in run.dir.iterdir() if p.name.startswith("tmp")]


def test_cli_doctor_shows_isa_and_int8_settings():
    from typer.testing import CliRunner

    from edgeprune.cli import app

    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "ISA: " in result.output and "reduce_range=" in result.output and "overflow_fix=" in result.output


def test_report_markdown_shows_isa_and_the_shipped_rung():
    import copy
    import json
    from pathlib import Path

    from edgeprune.report import render_markdown

    report = copy.deepcopy(json.loads((Path(__file__).parent / "data" / "report_example.json").read_text()))
    report["environment"] = {"cpu_model": "AMD EPYC", "isa": isa(EPYC_ZEN2), "isa_summary": isa_summary(isa(EPYC_ZEN2))}
    art = next(a for a in report["artifacts"] if a["precision"] == "int8")
    art.setdefault("meta", {})["int8_settings"] = {"reduce_range": True, "reason": "x86 without VNNI/AMX"}
    art["ladder"] = {"shipped_rung": 2, "shipped": "1 most sensitive layer(s) in float", "excluded": ["/fc/Gemm"],
                     "rung0_p50_ms": 0.08, "p50_vs_rung0": 1.1,
                     "attempts": [{"rung": 0, "name": "host defaults", "accuracy_drop_pt": 4.0},
                                  {"rung": 2, "name": "1 most sensitive layer(s) in float", "accuracy_drop_pt": 0.3}]}
    md = render_markdown(report)
    assert "ISA (AMD EPYC): x86_64: avx2" in md and "vnni" not in md.split("ISA (AMD EPYC):")[1].splitlines()[0]
    assert "rung 2 (1 most sensitive layer(s) in float), kept in float: /fc/Gemm, p50 1.10x rung 0" in md
    assert "x86 without VNNI/AMX" in md


def test_climb_int8_does_not_climb_when_pruning_itself_broke_the_budget(monkeypatch, tmp_path, tiny_model, tiny_data):
    """INT8 settings cannot recover accuracy lost by pruning: with the FP32 pruned model already over the
    budget, only rung 0 is compiled and the record says why."""
    from types import SimpleNamespace

    from edgeprune.stages import ladder as ladder_stage
    from edgeprune.config import BenchConfig, TargetConfig
    from edgeprune.export import export_onnx

    onnx_path = export_onnx(tiny_model, tiny_data.images[:1], tmp_path / "m.onnx")
    run = SimpleNamespace(dir=tmp_path / "run", progress=False,
                          report={"accuracy": {"baseline": 1.0, "pruned": 0.8}},
                          cfg=SimpleNamespace(export=SimpleNamespace(parity_images=16),
                                              data=SimpleNamespace(batch_size=256),
                                              bench=BenchConfig(warmup_runs=1, warmup_s=0, min_runs=5, min_time_s=0)))
    run.dir.mkdir()
    inp = SimpleNamespace(calibration=SimpleNamespace(data=tiny_data), eval=tiny_data)
    target = TargetConfig(name="t", backend="onnxruntime", precisions=["int8"], dynamic_batch=True,
                          options={"min_calibration": 16})
    row = ladder_stage.climb_int8(run, inp, tiny_model, onnx_path, target)
    assert [a["rung"] for a in row["ladder"]["attempts"]] == [0] and "20.00 pt" in row["ladder"]["not_climbed"]
    assert row["status"] == "failed"
