"""The latency search: cut the channels that cost the least score per millisecond saved, confirm on the target.

Each step removes channels from one group, down to a lower multiple of ``round_to`` (at least
``step_fraction`` of its width): the group whose (sum of the removed channels' normalized scores) /
(ms saved by the lookup table) is the smallest. Every ``confirm_every`` steps, and whenever the
prediction says the budget is reached, the model is measured. A confirmation that is not faster
than the last accepted point rolls the pending steps back (to a deep copy); if it was a single
step, that group's cut is retried 2x and 4x bigger (an unaligned width can be slower than a wider
aligned one) before the group is marked as not worth cutting; several steps are replayed one at a
time to find the culprit. The search stops
when the measured p50 is within ``tolerance`` of the budget or nothing can be cut any more (the
result is then the closest reachable point: the last accepted one).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..prune import count_macs_params
from .groups import GroupInfo, current_channels, cut, min_keep, next_width
from .lut import LatencyTable, error_stats

_EPS_MS = 1e-6


@dataclass
class Step:
    step: int
    group: str
    channels_before: int
    channels_after: int
    score_lost: float  # sum of the removed channels' normalized scores
    predicted_saving_ms: float  # from the table
    predicted_ms: float  # the table's prediction for the whole configuration
    measured_ms: Optional[float]  # p50 when this step was confirmed on the target
    macs: int
    params: int
    rolled_back: bool = False
    note: str = ""


@dataclass
class LatencySearchResult:
    model: nn.Module
    budget_ms: float
    tolerance: float
    base_ms: float  # measured p50 of the unpruned model
    final_ms: float  # measured p50 of the returned model
    met: bool
    trajectory: list[Step]
    blocked: dict[str, str]  # group -> why it is no longer cut
    plan_before: dict[str, int]
    plan_after: dict[str, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    lut_error: dict[str, Any]  # held-out configurations measured when the table was built
    confirm_error: dict[str, Any]  # table prediction vs measurement at every confirmation of the search
    lut: dict[str, Any] = field(default_factory=dict)  # base, deltas, key, cache flag
    criterion: str = "sae-mi"
    seconds: float = 0.0
    # what the search acts on: the last measured point plus the table's change since, vs the measurement
    confirm_error_anchored: dict[str, Any] = field(default_factory=dict)

    @property
    def groups_cut(self) -> dict[str, tuple[int, int]]:
        return {g: (c, self.plan_after[g]) for g, c in self.plan_before.items() if self.plan_after.get(g) != c}

    def summary(self) -> str:
        state = "met" if self.met else "NOT met (closest reachable point)"
        lines = [f"latency {self.base_ms:.3f} -> {self.final_ms:.3f} ms (budget {self.budget_ms:.3f} ms "
                 f"+{self.tolerance:.0%}: {state}); MACs {self.macs_before / 1e6:.2f}M -> {self.macs_after / 1e6:.2f}M; "
                 f"{len(self.trajectory)} steps, {sum(s.rolled_back for s in self.trajectory)} rolled back"]
        lines += [f"  {g}: {a} -> {b}" for g, (a, b) in self.groups_cut.items()]
        lines += [f"  not cut further: {g} ({why})" for g, why in self.blocked.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_ms": self.budget_ms, "tolerance": self.tolerance, "base_ms": self.base_ms,
                "final_ms": self.final_ms, "met": self.met, "criterion": self.criterion,
                "speedup": self.base_ms / max(self.final_ms, 1e-9),
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "plan_before": self.plan_before, "plan_after": self.plan_after,
                "groups_cut": {g: list(v) for g, v in self.groups_cut.items()}, "blocked": self.blocked,
                "lut_error": self.lut_error, "confirm_error": self.confirm_error,
                "confirm_error_anchored": self.confirm_error_anchored, "lut": self.lut,
                "seconds": self.seconds, "trajectory": [asdict(s) for s in self.trajectory]}

    def plot(self, path: Path) -> Path:
        from .plot import plot_trajectory

        return plot_trajectory(self.to_dict(), Path(path))


@dataclass
class _State:
    model: nn.Module
    scores: dict[str, torch.Tensor]
    plan: dict[str, int]
    measured_ms: float
    dg: Any = None  # the model's DependencyGraph, built on first use and kept valid across cuts

    def graph(self, example: torch.Tensor) -> Any:
        from .groups import build_graph

        if self.dg is None:
            self.dg = build_graph(self.model, example)
        return self.dg

    def copy(self) -> "_State":
        return _State(copy.deepcopy(self.model), {k: v.clone() for k, v in self.scores.items()}, dict(self.plan),
                      self.measured_ms)


@dataclass
class _Candidate:
    group: str
    k: int
    score_lost: float
    saving_ms: float


@dataclass
class SearchSettings:
    budget_ms: float
    round_to: int
    confirm_every: int = 3
    tolerance: float = 0.05
    max_layer_ratio: float = 0.8
    step_fraction: float = 1 / 16  # a step cuts at least this much of a group's width (in round_to multiples)
    max_steps: int = 10_000

    max_escalation: int = 4  # a cut that is not faster is retried 2x, 4x bigger before its group is marked

    def width_after_step(self, full: int, current: int, mult: int = 1) -> int:
        """Width after one step: the next multiple of round_to, at least step_fraction of ``full`` less, x ``mult``."""
        chunk = self.round_to * int(full * self.step_fraction // self.round_to)
        floor = min_keep(full, round_to=self.round_to, max_layer_ratio=self.max_layer_ratio)
        to = min(next_width(current, self.round_to), current - chunk)
        to = current - (current - to) * mult
        return max(to, floor) if current > floor else current


def _lowest_scores_sum(state: _State, dg: Any, name: str, k: int) -> float:
    """Score lost by cutting the ``k`` lowest-score channels of group ``name`` (nothing is changed)."""
    from .groups import group_channel_scores, pruning_group

    c = current_channels(state.model, name)
    s = group_channel_scores(pruning_group(dg, state.model, name, range(c)), dg, state.model, state.scores)  # (c,)
    return float(torch.sort(s).values[:k].sum())


def _candidates(state: _State, example: torch.Tensor, groups: list[GroupInfo], lut: LatencyTable,
                blocked: dict[str, str], mult: dict[str, int], s: SearchSettings) -> list[_Candidate]:
    dg = state.graph(example)
    out = []
    for g in groups:
        if g.name in blocked:
            continue
        c = state.plan[g.name]
        to = s.width_after_step(g.channels, c, mult.get(g.name, 1))
        if to >= c or to < 1:
            continue
        saving = lut.saving(state.plan, g.name, c, to)
        out.append(_Candidate(g.name, c - to, _lowest_scores_sum(state, dg, g.name, c - to), saving))
    return out


def _choose(cands: list[_Candidate]) -> Optional[_Candidate]:
    """Least score per ms saved among cuts the table says are faster; else the cheapest cut (table too coarse)."""
    faster = [c for c in cands if c.saving_ms > _EPS_MS]
    if faster:
        return min(faster, key=lambda c: c.score_lost / c.saving_ms)
    return min(cands, key=lambda c: c.score_lost, default=None)


class _Search:
    def __init__(self, model: nn.Module, example: torch.Tensor, *, groups: list[GroupInfo], lut: LatencyTable,
                 scores: dict[str, torch.Tensor], measure: Callable[[nn.Module], float], settings: SearchSettings,
                 between_rounds: Optional[Callable[[nn.Module], object]], progress: bool):
        self.example, self.groups, self.lut, self.measure, self.s = example, groups, lut, measure, settings
        self.between_rounds, self.progress = between_rounds, progress
        plan = {g.name: current_channels(model, g.name) for g in groups}
        work = copy.deepcopy(model).eval()
        self.state = _State(work, {k: v.clone() for k, v in scores.items()}, plan, float(measure(work)))
        self.base_ms = self.state.measured_ms
        self.anchor = self.state.copy()
        self.pending: list[Step] = []
        self.trajectory: list[Step] = []
        self.blocked: dict[str, str] = {}
        self.mult: dict[str, int] = {}  # group -> cut multiplier after cuts that were not faster
        self.confirmations: list[tuple[float, float]] = []
        self.anchored: list[tuple[float, float]] = []  # (anchored prediction, measured) per confirmation
        self.every = settings.confirm_every

    # ------------------------------------------------------------------ one step
    def met(self, ms: float) -> bool:
        return ms <= self.s.budget_ms * (1.0 + self.s.tolerance) + _EPS_MS

    def anchored_prediction(self) -> float:
        return self.anchor.measured_ms + self.lut.predict(self.state.plan) - self.lut.predict(self.anchor.plan)

    def step(self) -> bool:
        """Propose, apply and maybe confirm one cut; False when nothing is left to cut."""
        cand = _choose(_candidates(self.state, self.example, self.groups, self.lut, self.blocked, self.mult, self.s))
        if cand is None:
            return False
        before = self.state.plan[cand.group]
        lost, _ = cut(self.state.model, self.example, cand.group, cand.k, self.state.scores,
                      dg=self.state.graph(self.example))
        self.state.plan[cand.group] = before - cand.k
        macs, params = count_macs_params(self.state.model, self.example)
        step = Step(len(self.trajectory) + 1, cand.group, before, before - cand.k, lost, cand.saving_ms,
                    self.lut.predict(self.state.plan), None, macs, params)
        self.trajectory.append(step)
        self.pending.append(step)
        if len(self.pending) >= self.every or self.met(self.anchored_prediction()):
            self.confirm()
        return True

    def confirm(self) -> None:
        anchored = self.anchored_prediction()
        ms = float(self.measure(self.state.model))
        last = self.pending[-1]
        last.measured_ms = ms
        self.confirmations.append((last.predicted_ms, ms))
        self.anchored.append((anchored, ms))
        if ms < self.anchor.measured_ms:
            if hasattr(self.measure, "absolute"):  # A/B decided; the level for the budget: a longer, unpaired run
                ms = last.measured_ms = float(self.measure.absolute(self.state.model))
            self.state.measured_ms = ms
            if self.between_rounds is not None:
                self.between_rounds(self.state.model)
            self.anchor, self.pending, self.every = self.state.copy(), [], self.s.confirm_every
            if hasattr(self.measure, "rebase"):  # next confirmation: paired against this accepted point
                self.measure.rebase(self.state.model, ms)  # same widths as the anchor, already compiled
            return
        self.rollback(ms)

    def rollback(self, ms: float) -> None:
        for st in self.pending:
            st.rolled_back = True
        if len(self.pending) == 1:
            self.escalate_or_block(self.pending[0], ms)
        else:
            self.pending[-1].note = f"rolled back {len(self.pending)} steps; replaying one at a time"
            self.every = 1
        self.state, self.pending = self.anchor.copy(), []

    def escalate_or_block(self, st: Step, ms: float) -> None:
        """Retry the group with a bigger cut (odd widths can be slower than wider, aligned ones); else mark it."""
        g, m = st.group, self.mult.get(st.group, 1) * 2
        full = next(x.channels for x in self.groups if x.name == g)
        if m <= self.s.max_escalation and self.s.width_after_step(full, st.channels_before, m) < st.channels_after:
            self.mult[g] = m
            st.note = f"rolled back; retrying with a {m}x cut"
            return
        self.blocked[g] = (f"cut {st.channels_before}->{st.channels_after} measured {ms:.3f} ms, "
                           f"not faster than {self.anchor.measured_ms:.3f} ms")
        st.note = "rolled back; group marked"

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        from ..progress import progress_bar as tqdm

        bar = tqdm(desc=f"latency search to {self.s.budget_ms:.3f} ms", unit="step", disable=not self.progress,
                   leave=False)
        while not self.met(self.anchor.measured_ms) and len(self.trajectory) < self.s.max_steps:
            if not self.step():
                break
            bar.update(1)
            bar.set_postfix(ms=f"{self.anchor.measured_ms:.3f}")
        if self.pending:  # the last steps before running out of cuts: confirm them too
            self.confirm()
        bar.close()


def latency_search(model: nn.Module, example: torch.Tensor, *, groups: list[GroupInfo], lut: LatencyTable,
                   scores: dict[str, torch.Tensor], measure: Callable[[nn.Module], float], settings: SearchSettings,
                   between_rounds: Optional[Callable[[nn.Module], object]] = None, criterion: str = "sae-mi",
                   progress: bool = True) -> LatencySearchResult:
    """Run the search on a copy of ``model`` (``scores``: normalized, every member of every group covered)."""
    t0 = time.perf_counter()
    macs0, params0 = count_macs_params(model, example)
    search = _Search(model, example, groups=groups, lut=lut, scores=scores, measure=measure, settings=settings,
                     between_rounds=between_rounds, progress=progress)
    search.run()
    final = search.anchor
    macs1, params1 = count_macs_params(final.model, example)
    return LatencySearchResult(
        model=final.model, budget_ms=settings.budget_ms, tolerance=settings.tolerance, base_ms=search.base_ms,
        final_ms=final.measured_ms, met=search.met(final.measured_ms), trajectory=search.trajectory,
        blocked=search.blocked, plan_before={g.name: g.channels for g in groups}, plan_after=dict(final.plan),
        macs_before=macs0, macs_after=macs1, params_before=params0, params_after=params1, lut_error=lut.error,
        confirm_error=error_stats(search.confirmations), confirm_error_anchored=error_stats(search.anchored),
        lut={"base_ms": lut.base_ms, "from_cache": lut.from_cache, "measurements": lut.measurements,
             "seconds": lut.seconds, "key": lut.key, "full": lut.full,
             "deltas": {g: {str(c): v for c, v in t.items()} for g, t in lut.deltas.items()},
             "holdout": lut.holdout, "cost_model": lut.fit.get("model", "additive"),
             "fit": {k: v for k, v in lut.fit.items() if k not in ("layers", "fit_configs")}},
        criterion=criterion, seconds=time.perf_counter() - t0)
