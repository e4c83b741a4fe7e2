"""Latency harness: protocol (warm-up, min runs AND min time, max time), statistics, artifacts, CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgeprune.bench import batch_sizes, bench_artifact, measure_latency, stats_from_samples
from edgeprune.config import BenchConfig, Precision, TargetConfig
from edgeprune.envinfo import environment_info
from edgeprune.errors import ConfigError

QUICK = dict(warmup_runs=0, warmup_s=0.0, progress=False)


class Counter:
    def __init__(self, sleep_s: float = 0.0):
        self.calls, self.sleep_s = 0, sleep_s

    def __call__(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)


def test_warmup_runs_are_not_measured():
    fn = Counter()
    stats = measure_latency(fn, warmup_runs=7, warmup_s=0.0, min_runs=30, min_time_s=0.0, progress=False)
    assert stats.n_runs == 30 and len(stats.samples_ms) == 30
    assert fn.calls == 37


@pytest.mark.timing
def test_warmup_lasts_at_least_warmup_s():
    fn = Counter(sleep_s=0.002)
    t0 = time.perf_counter()
    measure_latency(fn, warmup_runs=1, warmup_s=0.1, min_runs=1, min_time_s=0.0, progress=False)
    assert time.perf_counter() - t0 >= 0.1
    # the warm-up ran by time, past its 1-run count (2 ms sleeps: ~50 calls idle, fewer when the machine is loaded)
    assert fn.calls >= 3


def test_runs_until_min_count_and_min_time():
    stats = measure_latency(Counter(sleep_s=0.002), min_runs=5, min_time_s=0.15, **QUICK)
    assert stats.n_runs > 5  # min_time, not min_runs, was the binding limit
    assert sum(stats.samples_ms) >= 0.15 * 1e3 * 0.9
    stats = measure_latency(Counter(), min_runs=400, min_time_s=0.0, **QUICK)
    assert stats.n_runs == 400  # min_runs binding


@pytest.mark.timing
def test_max_time_bounds_the_measurement():
    t0 = time.perf_counter()
    stats = measure_latency(Counter(sleep_s=0.005), min_runs=10**9, min_time_s=10**9, max_time_s=0.1, **QUICK)
    assert time.perf_counter() - t0 < 5.0  # 0.1 s asked; the margin is for a loaded machine, not for the code
    assert 1 <= stats.n_runs < 10**9


def test_sync_is_called_inside_every_timed_run():
    fn, synced = Counter(), Counter(sleep_s=0.003)
    stats = measure_latency(fn, sync=synced, warmup_runs=3, warmup_s=0.0, min_runs=10, min_time_s=0.0, progress=False)
    assert synced.calls == fn.calls == 13
    assert stats.min >= 3.0  # the 3 ms of sync are inside the timing


def test_statistics_are_exact_percentiles_with_tails():
    samples = [float(v) for v in range(1, 101)]  # 1..100 ms
    s = stats_from_samples(samples, batch_size=4, scope="inference")
    assert (s.p50, s.p90, s.p95, s.p99) == pytest.approx((50.5, 90.1, 95.05, 99.01))
    assert (s.min, s.max, s.mean) == (1.0, 100.0, 50.5)
    assert s.throughput == pytest.approx(4 / 0.0505)
    d = s.to_dict()
    assert "samples_ms" not in d and d["n_runs"] == 100 and d["scope"] == "inference"
    assert len(s.to_dict(samples=True)["samples_ms"]) == 100


def test_unknown_scope_is_refused():
    with pytest.raises(ConfigError, match="valid: inference, end-to-end"):
        measure_latency(Counter(), scope="wall", **QUICK)


def test_environment_info_records_machine_and_runtimes():
    env = environment_info()
    for key in ("cpu_model", "cpu_cores_logical", "cpu_governor", "python", "platform", "runtimes"):
        assert key in env
    assert env["runtimes"]["numpy"] == np.__version__
    assert env["runtimes"]["edgeprune"] == "0.1.0"
    json.dumps(env)  # serializable as is
    assert "runtimes" not in environment_info(runtimes=False)


# ----------------------------------------------------------------------------- artifacts


@pytest.fixture
def ort_artifact(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from edgeprune.backends import get_backend

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_model, (torch.randn(1, 1, 16, 16),), str(onnx_path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    target = TargetConfig(name="cpu-onnxruntime", backend="onnxruntime", device="CPU", precisions=["fp32"],
                          threads=1, dynamic_batch=True, max_batch_size=8)
    art = get_backend("onnxruntime").compile(onnx_path, tmp_path / "art", target=target, precision=Precision.fp32)
    return art, target


def test_bench_artifact_times_every_batch_size(ort_artifact):
    art, target = ort_artifact
    cfg = BenchConfig(warmup_runs=2, warmup_s=0.0, min_runs=15, min_time_s=0.0, batch_sizes=[1, 4])
    out = bench_artifact(art, target=target, cfg=cfg, progress=False)
    assert [r["batch_size"] for r in out["results"]] == [1, 4]
    for r in out["results"]:
        assert r["n_runs"] == 15 and len(r["samples_ms"]) == 15 and r["scope"] == "inference"
        assert r["min"] <= r["p50"] <= r["p90"] <= r["p95"] <= r["p99"] <= r["max"]
        assert r["timed"] == "onnxruntime session, I/O binding pre-set"
    assert out["threads"] == 1 and "onnxruntime" in out["env"]["runtimes"]


def test_bench_artifact_end_to_end_scope(ort_artifact):
    art, target = ort_artifact
    cfg = BenchConfig(warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0, include_preprocessing=True)
    out = bench_artifact(art, target=target, cfg=cfg, progress=False)
    assert out["scope"] == "end-to-end" and out["results"][0]["scope"] == "end-to-end"
    assert out["results"][0]["timed"].startswith("uint8 image")


def test_inference_fast_path_runs_the_same_model_as_the_runner(ort_artifact):
    from edgeprune.backends import get_backend
    from edgeprune.bench import _inference_fn

    art, target = ort_artifact
    runner = get_backend("onnxruntime").load(art, target=target)
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)  # (B, C, H, W)
    fast = _inference_fn(runner, runner, x)
    fast()
    np.testing.assert_allclose(fast.binding.copy_outputs_to_cpu()[0], runner(x), rtol=1e-5, atol=1e-6)
    plain = _inference_fn(object(), runner, x)
    assert plain.timed == "runner call" and np.allclose(plain(), runner(x))


def test_static_batch_target_refuses_other_batch_sizes():
    target = TargetConfig(name="t", backend="onnxruntime", batch_size=1, dynamic_batch=False)
    assert batch_sizes(target, BenchConfig()) == [1]
    with pytest.raises(ConfigError, match="static batch of 1"):
        batch_sizes(target, BenchConfig(batch_sizes=[1, 8]))


def test_bench_cli_prints_table_and_writes_json(ort_artifact, tmp_path):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    art, _ = ort_artifact
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(Path(art.path).parent), "--threads", "1", "--min-runs", "10",
                                   "--min-time-s", "0", "--warmup-s", "0", "--json", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.output and "img/s" in res.output
    data = json.loads(out.read_text())
    assert data["results"][0]["n_runs"] == 10 and data["target"] == "cpu-onnxruntime"


def test_bench_cli_bad_scope_fails_cleanly(ort_artifact):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    art, _ = ort_artifact
    res = CliRunner().invoke(app, ["bench", str(Path(art.path).parent), "--scope", "wall"])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)


def test_openvino_fast_path_times_the_infer_request(ort_artifact, tmp_path):
    pytest.importorskip("openvino")
    from edgeprune.backends import get_backend

    art, _ = ort_artifact
    target = TargetConfig(name="intel-cpu-openvino", backend="openvino", device="CPU", threads=1)
    ov_art = get_backend("openvino").compile(Path(art.path), tmp_path / "ov", target=target, precision=Precision.fp32)
    cfg = BenchConfig(warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0)
    out = bench_artifact(ov_art, target=target, cfg=cfg, progress=False)
    assert out["results"][0]["timed"] == "openvino infer request, input tensor pre-set"
    assert out["results"][0]["n_runs"] == 5


# ----------------------------------------------------------------------------- interleaved (baseline vs pruned)


class FakeClock:
    """A clock that only moves when a candidate runs; each run costs its base time scaled by a drift
    that grows with the clock (a CPU slowing down over the measurement)."""

    def __init__(self, drift_per_s: float):
        self.ns, self.drift_per_s, self.log = 0, drift_per_s, []

    def __call__(self) -> int:
        return self.ns

    def candidate(self, name: str, base_ms: float):
        def run() -> None:
            self.log.append(name)
            self.ns += int(base_ms * 1e6 * (1 + self.drift_per_s * self.ns / 1e9))
        return run


def test_interleaved_order_alternates_direction():
    from edgeprune.bench import interleaved_order

    assert interleaved_order(["baseline", "pruned"], 4) == ["baseline", "pruned", "pruned", "baseline"] * 2
    assert interleaved_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]


def test_interleaved_slots_follow_the_order_and_drift_cancels():
    from edgeprune.bench import measure_interleaved

    clock = FakeClock(drift_per_s=5.0)  # runs get 5 % slower every 10 ms of measurement
    fns = {"baseline": clock.candidate("baseline", 2.0), "pruned": clock.candidate("pruned", 1.0)}
    stats = measure_interleaved(fns, rounds=4, warmup_runs=0, warmup_s=0.0, min_runs=40, min_time_s=0.0,
                                clock=clock)
    slots = [clock.log[i:i + 10] for i in range(0, len(clock.log), 10)]  # 40 runs / 4 rounds = 10 per slot
    assert [s[0] for s in slots] == ["baseline", "pruned", "pruned", "baseline"] * 2  # ABBA, slot by slot
    assert all(len(set(s)) == 1 and len(s) == 10 for s in slots)
    assert stats["baseline"].n_runs == stats["pruned"].n_runs == 40
    assert stats["baseline"].mean / stats["pruned"].mean == pytest.approx(2.0, rel=0.03)  # true ratio despite drift

    sequential = FakeClock(drift_per_s=5.0)  # the same drift, one candidate after the other (one round)
    fns = {"baseline": sequential.candidate("baseline", 2.0), "pruned": sequential.candidate("pruned", 1.0)}
    stats = measure_interleaved(fns, rounds=1, warmup_runs=0, warmup_s=0.0, min_runs=40, min_time_s=0.0,
                                clock=sequential)
    assert stats["baseline"].mean / stats["pruned"].mean < 1.9  # what interleaving protects against


def test_interleaved_refuses_bad_arguments():
    from edgeprune.bench import measure_interleaved

    with pytest.raises(ConfigError, match="rounds >= 1"):
        measure_interleaved({"a": Counter()}, rounds=0)
    with pytest.raises(ConfigError, match="unknown latency scope"):
        measure_interleaved({"a": Counter()}, scope="wall")


def test_bench_against_compares_two_artifacts(ort_artifact, tmp_path):
    import torch
    from typer.testing import CliRunner

    from edgeprune.backends import get_backend
    from edgeprune.cli import app

    art, target = ort_artifact
    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    onnx_path = tmp_path / "wide.onnx"
    torch.onnx.export(wide, (torch.randn(1, 1, 16, 16),), str(onnx_path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    other = get_backend("onnxruntime").compile(onnx_path, tmp_path / "wide", target=target, precision=Precision.fp32)
    out = tmp_path / "against.json"
    res = CliRunner().invoke(app, ["bench", str(Path(art.path).parent), "--against", str(Path(other.path).parent),
                                   "--threads", "1", "--min-runs", "20", "--min-time-s", "0", "--warmup-s", "0",
                                   "--rounds", "4", "--json", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "p50 B / A" in res.output and "interleaved" in res.output
    data = json.loads(out.read_text())
    a, b = data["results"]["A"], data["results"]["B"]
    assert a["n_runs"] == b["n_runs"] == 20 and data["rounds"] == 4
    assert b["p50"] > a["p50"]  # the wide model (64 channels) is slower than the tiny one
