"""Latency-driven pruning: the table, its cache and error, rollback of cuts that do not speed up, the budget."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgeprune.config import BackendName, TargetConfig
from edgeprune.errors import ConfigError
from edgeprune.latency import (LatencyTable, MeasureSettings, build_lut, latency_prune, lut_key,
                               prunable_groups)
from edgeprune.latency.groups import current_channels, normalized_scores
from edgeprune.latency.search import SearchSettings, latency_search

X = torch.zeros(1, 1, 16, 16)


def _target(name: str = "fake-cpu", round_to: int = 8) -> TargetConfig:
    return TargetConfig(name=name, backend=BackendName.onnxruntime, device="CPU", threads=1, round_to=round_to)


class FakeTimer:
    """Latency = base + sum of weight * out channels of the named convs (+ optional interaction); counts calls."""

    def __init__(self, weights: dict[str, float], base: float = 1.0, interaction: float = 0.0):
        self.weights, self.base, self.interaction, self.calls = weights, base, interaction, 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        widths = {n: current_channels(model, n) for n in self.weights}
        ms = self.base + sum(w * widths[n] for n, w in self.weights.items())
        if self.interaction:
            a, b = list(widths.values())[:2]
            ms += self.interaction * a * b
        return ms


def _lut(model: nn.Module, timer: FakeTimer, tmp_path, *, target: TargetConfig | None = None, holdout: int = 3,
         points: int = 2):
    target = target or _target()
    key = lut_key(model, X, target=target, round_to=8, max_layer_ratio=0.8, points=points, holdout=holdout,
                  measure_id={"custom": "FakeTimer"})
    return build_lut(model, X, groups=prunable_groups(model, X), measure=timer, key=key, round_to=8, points=points,
                     holdout=holdout, cache_dir=tmp_path, progress=False)


def test_groups_of_tiny_model(tiny_model):
    groups = {g.name: g for g in prunable_groups(tiny_model, X)}
    assert set(groups) == {"head.0", "dw.3", "dw.0", "res1.0"}  # the fc head is left alone
    assert {"stem.0", "res1.3", "dw.0"} <= set(groups["dw.0"].members)  # residual + depthwise coupled


@pytest.mark.slow
def test_lut_additive_model_is_exact_and_interaction_shows_as_error(tiny_model, tmp_path):
    additive = _lut(tiny_model, FakeTimer({"head.0": 0.01, "dw.3": 0.02}), tmp_path / "a")
    assert additive.error["n"] == 3
    assert additive.error["max_ape_pct"] < 1e-6
    assert additive.delta("head.0", 16) == pytest.approx(-0.16)
    assert additive.delta("res1.0", 8) == pytest.approx(0.0)
    coupled = _lut(tiny_model, FakeTimer({"head.0": 0.01, "dw.3": 0.02}, interaction=0.001), tmp_path / "b")
    assert coupled.error["max_ape_pct"] > 0.1  # the additive table cannot see the interaction; it is reported


@pytest.mark.slow
def test_lut_cache_reused_for_same_key_only(tiny_model, tmp_path):
    first = FakeTimer({"head.0": 0.01})
    t1 = _lut(tiny_model, first, tmp_path, holdout=1, points=1)
    assert first.calls == t1.measurements > 1 and not t1.from_cache
    assert len(list(tmp_path.glob("*.json"))) == 1
    again = FakeTimer({"head.0": 0.01})
    t2 = _lut(tiny_model, again, tmp_path, holdout=1, points=1)
    assert again.calls == 0 and t2.from_cache
    assert t2.deltas == t1.deltas and t2.base_ms == t1.base_ms
    other_target = FakeTimer({"head.0": 0.01})
    _lut(tiny_model, other_target, tmp_path, target=_target("other-cpu"), holdout=1, points=1)
    assert other_target.calls > 0
    from conftest import TinyNet

    other_model = FakeTimer({"head.0": 0.01})
    _lut(TinyNet(num_classes=5).eval(), other_model, tmp_path, holdout=1, points=1)
    assert other_model.calls > 0
    assert len(list(tmp_path.glob("*.json"))) == 3


def _wrong_table(model: nn.Module) -> LatencyTable:
    """Claims res1.0 is where the time goes; the real (fake) timer only depends on head.0."""
    groups = prunable_groups(model, X)
    full = {g.name: g.channels for g in groups}
    deltas = {g: {} for g in full}
    deltas["res1.0"] = {8: -5.0}
    deltas["head.0"] = {16: -0.16, 8: -0.24}
    return LatencyTable({"test": True}, 1.32, full, deltas)


@pytest.mark.parametrize("confirm_every", [1, 3])
def test_step_without_speedup_is_rolled_back_and_group_marked(tiny_model, confirm_every):
    timer = FakeTimer({"head.0": 0.01})  # 1.32 ms unpruned; only head.0's width matters
    groups = prunable_groups(tiny_model, X)
    settings = SearchSettings(budget_ms=1.16, round_to=8, confirm_every=confirm_every, tolerance=0.0)
    res = latency_search(tiny_model, X, groups=groups, lut=_wrong_table(tiny_model), measure=timer,
                         scores=normalized_scores(tiny_model, None), settings=settings, progress=False)
    first = res.trajectory[0]
    assert first.group == "res1.0" and first.rolled_back  # the table's favourite, measured useless
    assert "res1.0" in res.blocked
    assert current_channels(res.model, "res1.0") == 16  # rolled back: the cut is not in the result
    assert all(s.group != "res1.0" for s in res.trajectory if not s.rolled_back)
    assert res.met and res.final_ms == pytest.approx(1.16)
    assert current_channels(res.model, "head.0") == 16
    assert res.confirm_error["n"] >= 2
    assert current_channels(tiny_model, "head.0") == 32  # the caller's model is untouched


def test_anchored_confirm_error_cancels_a_table_measured_at_another_level(tiny_model):
    """A right table whose level is off (measured under other load, or read from the cache): the error at
    the table's level is that offset; the anchored error the search acts on is ~0."""
    timer = FakeTimer({"head.0": 0.01})  # 1.32 ms unpruned; -0.01 ms per head.0 channel
    groups = prunable_groups(tiny_model, X)
    full = {g.name: g.channels for g in groups}
    deltas = {g: {} for g in full}
    deltas["head.0"] = {16: -0.16, 8: -0.24}
    shifted = LatencyTable({"test": True}, 1.32 + 0.5, full, deltas)  # the same deltas, base 0.5 ms too high
    settings = SearchSettings(budget_ms=1.16, round_to=8, confirm_every=1, tolerance=0.0)
    res = latency_search(tiny_model, X, groups=groups, lut=shifted, measure=timer,
                         scores=normalized_scores(tiny_model, None), settings=settings, progress=False)
    assert res.met and res.confirm_error["n"] >= 1
    assert res.confirm_error["mape_pct"] > 30  # 0.5 ms over ~1.2 ms
    assert res.confirm_error_anchored["n"] == res.confirm_error["n"]
    assert res.confirm_error_anchored["max_ape_pct"] < 1e-6
    assert res.to_dict()["confirm_error_anchored"] == res.confirm_error_anchored


@pytest.mark.slow
def test_search_meets_budget_with_sae_mi_scores(tiny_model, tiny_data, tmp_path):
    from edgeprune.scoring import score_model

    scores = score_model(tiny_model, tiny_data, criterion="sae-mi", num_classes=4, progress=False)
    timer = FakeTimer({"head.0": 0.01, "dw.3": 0.01, "dw.0": 0.02, "res1.0": 0.005})
    base = timer(tiny_model)
    res = latency_prune(tiny_model, X, target=_target(), budget_ms=0.8 * base, scores=scores.scores, measure=timer,
                        confirm_every=2, cache_dir=tmp_path, progress=False, lut_points=2, lut_holdout=2)
    assert res.met and res.final_ms <= 0.8 * base * 1.05
    assert res.final_ms == pytest.approx(timer(res.model))
    assert res.lut_error["n"] == 2 and res.lut_error["max_ape_pct"] < 1e-6
    assert all(c % 8 == 0 for c in res.plan_after.values())
    assert res.macs_after < res.macs_before
    assert res.model(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    # the first cut removes the lowest-score channels of its group: their normalized scores add up to score_lost
    first = res.trajectory[0]
    norm = normalized_scores(tiny_model, scores.scores)
    if first.group in ("head.0", "dw.3"):  # single scored conv in the group: direct check
        expect = float(torch.sort(norm[first.group]).values[: first.channels_before - first.channels_after].sum())
        assert first.score_lost == pytest.approx(expect, rel=1e-5)
    d = res.to_dict()
    json.dumps(d)
    assert d["trajectory"][0]["group"] == first.group and "predicted_ms" in d["trajectory"][0]
    png = res.plot(tmp_path / "trajectory.png")
    assert png.stat().st_size > 1000


def test_activation_criterion_without_scores_fails(tiny_model):
    with pytest.raises(ConfigError, match="needs channel scores"):
        latency_prune(tiny_model, X, target=_target(), budget_ms=1.0, scores=None, criterion="sae-mi",
                      measure=FakeTimer({"head.0": 0.01}), progress=False)


@pytest.mark.slow
def test_real_onnxruntime_cpu(tiny_model, tmp_path):
    try:
        from edgeprune.backends import get_backend

        ok, why = get_backend("onnxruntime").available()
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"backends not importable: {exc}")
    if not ok:
        pytest.skip(f"onnxruntime unavailable: {why}")
    torch.set_num_threads(1)
    settings = MeasureSettings(warmup_runs=3, warmup_s=0.02, min_runs=15, min_time_s=0.05)
    kw = dict(target=_target("cpu-onnxruntime-test"), criterion="l2", scores=None, progress=False,
              cache_dir=tmp_path, lut_points=1, lut_holdout=1, measure_settings=settings)
    res = latency_prune(tiny_model, X, budget_ms=1e-4, **kw)  # unreachable: the closest point is reported
    assert not res.met
    # Acceptance is decided by a paired A/B run; the level stored for an accepted point is a later, unpaired
    # run, so comparing final_ms with base_ms would be a timing assertion (it failed once in CI under load).
    # What the search guarantees: the returned model is the last accepted point, no bigger than the original.
    accepted = [s for s in res.trajectory if not s.rolled_back]
    assert res.macs_after <= res.macs_before and (res.macs_after < res.macs_before) == bool(accepted)
    assert res.final_ms > 0
    assert res.trajectory and all(s.measured_ms is None or s.measured_ms > 0 for s in res.trajectory)
    assert res.lut_error["n"] == 1 and not res.lut["from_cache"]
    assert set(res.lut["deltas"]) == {"head.0", "dw.3", "dw.0", "res1.0"}
    assert len(list(tmp_path.glob("cpu-onnxruntime-test-onnxruntime-CPU-*.json"))) == 1
    again = latency_prune(tiny_model, X, budget_ms=res.base_ms * 10, **kw)
    assert again.lut["from_cache"] and again.met and not again.trajectory


def test_cli_without_budget_fails_before_loading(tmp_path):
    from edgeprune.commands.latency import run_latency_prune

    with pytest.raises(ConfigError, match="no latency budget"):
        run_latency_prune(config=None, target="cpu-onnxruntime", budget_ms=None, weights=None, arch=None,
                          criterion=None, confirm_every=3, cache_dir=tmp_path, out=tmp_path / "out", threads=None,
                          lut_points=1, lut_holdout=0, overrides=[], progress=False)


@pytest.mark.timing
def test_paired_timing_sees_the_ratio():
    import time

    from edgeprune.latency.measure import _p50_paired

    s = MeasureSettings(warmup_runs=1, min_runs=10, min_time_s=0.0)
    # 20 vs 10 ms sleeps: a few ms of scheduling delay on a loaded 2-core machine cannot hide the 2x ratio
    cand, ref = _p50_paired(lambda: time.sleep(0.020), lambda: time.sleep(0.010), s)
    assert cand > ref > 9.0  # ms; both timed in the same window
    assert 1.3 < cand / ref < 2.5


def test_cut_to_a_slow_width_is_retried_bigger_before_marking(tiny_model, tmp_path):
    import math

    def aligned16(model: nn.Module) -> float:  # only multiples of 16 channels of head.0 are faster
        return 1.0 + 0.01 * math.ceil(current_channels(model, "head.0") / 16) * 16

    res = latency_prune(tiny_model, X, target=_target(), budget_ms=1.16, criterion="l2", measure=aligned16,
                        confirm_every=1, tolerance=0.0, cache_dir=tmp_path, progress=False, lut_points=2,
                        lut_holdout=1)
    head = [s for s in res.trajectory if s.group == "head.0"]
    assert (head[0].channels_after, head[0].rolled_back) == (24, True) and "retrying" in head[0].note
    assert (head[1].channels_before, head[1].channels_after, head[1].rolled_back) == (32, 16, False)
    assert "head.0" not in res.blocked and res.met
    assert current_channels(res.model, "head.0") == 16


class MacsTimer:
    """Latency = 0.2 ms + rate x MACs of every conv/linear of the model as it is (input x output widths interact)."""

    def __init__(self, rates: dict[str, float], default: float = 2e-6):
        self.rates, self.default, self.calls = rates, default, 0

    def __call__(self, model: nn.Module) -> float:
        from edgeprune.latency.lut import _layer_macs

        self.calls += 1
        return 0.2 + sum(self.rates.get(n, self.default) * macs for n, (macs, _) in _layer_macs(model, X).items())


def _fitted(model: nn.Module, timer, tmp_path, cost_model: str):
    key = lut_key(model, X, target=_target(), round_to=8, max_layer_ratio=0.8, points=2, holdout=4,
                  measure_id={"custom": type(timer).__name__})
    return build_lut(model, X, groups=prunable_groups(model, X), measure=timer, key=key, round_to=8, points=2,
                     holdout=4, cache_dir=tmp_path, progress=False, cost_model=cost_model, fit_configs=3)


def test_fitted_macs_table_predicts_interacting_groups(tiny_model, tmp_path):
    timer = MacsTimer({"head.0": 6e-6})  # the head conv is slower per MAC than the rest
    table = _fitted(tiny_model, timer, tmp_path, "auto")
    assert table.fit["model"] == "macs"  # chosen: it predicts the whole-model configurations better
    assert table.measurements == timer.calls == 1 + sum(len(t) for t in table.deltas.values()) + 3 + 4
    additive = [abs(h["additive_ms"] - h["measured_ms"]) / h["measured_ms"] for h in table.holdout]
    assert table.error["n"] == 4 and table.error["max_ape_pct"] < 3.0  # held out, every group cut
    assert max(additive) > 0.05  # what the per-group sum misses: cuts of coupled groups interact
    plan = {g: c for g, c in table.full.items()}
    full_ms = timer(tiny_model)
    assert table.predict(plan) == pytest.approx(full_ms, rel=0.02)
    saving = table.saving(plan, "head.0", 32, 16)
    assert saving > 0 and saving == pytest.approx(table.predict(plan) - table.predict({**plan, "head.0": 16}))
    again = _fitted(tiny_model, MacsTimer({"head.0": 6e-6}), tmp_path, "auto")
    assert again.from_cache and again.fit["model"] == "macs" and again.predict(plan) == table.predict(plan)


def test_auto_table_keeps_the_additive_model_when_it_predicts_better(tiny_model, tmp_path):
    table = _fitted(tiny_model, FakeTimer({"head.0": 0.01, "dw.3": 0.02}), tmp_path, "auto")
    assert table.fit["model"] == "additive" and table.error["max_ape_pct"] < 1e-6
    with pytest.raises(ConfigError, match="cost_model"):
        _fitted(tiny_model, FakeTimer({}), tmp_path, "quadratic")
