"""Prunability report in seconds, before any long job: what torch-pruning sees in a model.

Coupled groups (channels that must go together) with their member layers, layers that will be
left alone and why, parameters torch-pruning cannot attribute to a layer, a trace that fails,
and the MACs/params a prune at ``max_layer_ratio`` would remove at most.

Segmentation / detection models (:func:`inspect_task_model`) are read as the task pipeline prunes
them: through their traced view (:mod:`edgeprune.tasks.models`), with the layers whose output
channels the task fixes listed under "kept (fixed by the task)", each with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from .errors import PruneError
from .graph import PRUNABLE, TRACE_TIMEOUT_S, Graph, GroupInfo, build_graph
from .prune import count_macs_params, resolve_ignored, unprunable_layers


@dataclass
class InspectReport:
    model: str
    input_shape: tuple
    macs: int
    params: int
    groups: list[GroupInfo] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> reason
    unwrapped: list[str] = field(default_factory=list)  # parameters outside a known layer
    trace_error: Optional[str] = None  # torch-pruning cannot build the dependency graph
    prune_error: Optional[str] = None  # the dry run at max_layer_ratio failed
    min_macs: Optional[int] = None  # after a uniform prune at max_layer_ratio
    min_params: Optional[int] = None
    max_layer_ratio: float = 0.8
    kept: dict[str, str] = field(default_factory=dict)  # layer -> why the task keeps it whole (task models)
    own_graph: dict[str, str] = field(default_factory=dict)  # layer -> the extra view that prunes it (task models)

    @property
    def prunable(self) -> bool:
        return self.trace_error is None and self.prune_error is None and any(g.prunable for g in self.groups)

    def table(self) -> str:
        lines = [f"{self.model} input {self.input_shape}: MACs {self.macs / 1e6:.2f}M, params {self.params / 1e6:.3f}M"]
        if self.trace_error:
            return "\n".join(lines + [f"NOT PRUNABLE: {self.trace_error}"])
        if self.min_macs is not None and self.min_params is not None:
            lines.append(f"at most removable (max_layer_ratio {self.max_layer_ratio}): MACs "
                         f"{(self.macs - self.min_macs) / 1e6:.2f}M ({self.macs / max(self.min_macs, 1):.2f}x), "
                         f"params {(self.params - self.min_params) / 1e6:.3f}M "
                         f"({self.params / max(self.min_params, 1):.2f}x)")
        if self.prune_error:
            lines.append(f"dry-run prune failed: {self.prune_error}")
        lines.append(f"{len(self.groups)} coupled groups ({sum(g.prunable for g in self.groups)} prunable):")
        for g in self.groups:
            state = "prunable" if g.prunable else f"skipped: {g.reason}"
            lines.append(f"  {g.name} [{g.channels} ch] {state}; out: {', '.join(g.members)}"
                         + (f"; in: {', '.join(g.consumers)}" if g.consumers else ""))
        for name, why in self.skipped.items():
            lines.append(f"  skip {name}: {why}")
        if self.own_graph:
            lines.append(f"pruned in a graph of their own (same ratio, L1): {len(self.own_graph)}")
            lines += [f"  {name}: {why}" for name, why in self.own_graph.items()]
        if self.kept:
            lines.append(f"kept (fixed by the task): {len(self.kept)}")
            lines += [f"  {name}: {why}" for name, why in self.kept.items()]
        if self.unwrapped:
            lines.append(f"unwrapped parameters (pruned along their last non-singleton dim): {', '.join(self.unwrapped)}")
        return "\n".join(lines)


def _groups(graph: Graph, ignored: dict[str, str], boundaries: dict[str, str]) -> list[GroupInfo]:
    out = []
    for g in graph.groups(ignored=list(boundaries)):  # torch-pruning would break building their groups
        blockers = [n for n in g.members if n in ignored]
        out.append(replace(g, prunable=not blockers,
                           reason=f"contains {blockers[0]} ({ignored[blockers[0]]})" if blockers else None))
    return out


def _skipped(graph: Graph, groups: list[GroupInfo], ignored: dict[str, str]) -> dict[str, str]:
    skipped = dict(ignored)
    for g in groups:
        for n in g.members:
            if not g.prunable and g.reason and n not in skipped:
                skipped[n] = f"coupled with {g.reason.removeprefix('contains ')}"
    for n in graph.untraced():
        skipped.setdefault(n, "not reached by tracing (never runs in forward)")
    return skipped


def _dry_run(model: nn.Module, x: torch.Tensor, ratio: float, ignore: tuple,
             trace_timeout_s: Optional[float]) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """A trial prune of a copy at ``ratio``: the same graph build and pruning code as ``prune``, same errors."""
    import torch_pruning as tp

    from .prune import prune_model

    try:
        res = prune_model(model, x, tp.importance.MagnitudeImportance(p=1), ratio=ratio, round_to=None,
                          max_layer_ratio=ratio, ignore=ignore, progress=False, trace_timeout_s=trace_timeout_s)
    except PruneError as exc:
        return None, None, str(exc)
    return res.macs_after, res.params_after, None


def inspect_model(model: nn.Module, example_inputs: torch.Tensor, *, ignore: tuple = (),
                  max_layer_ratio: float = 0.8, trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> InspectReport:
    """What torch-pruning can do with ``model``; never raises for an untraceable model (says so instead).

    ``trace_error`` / ``prune_error`` hold the same PruneError text that ``prune`` would raise."""
    model = model.eval()
    macs, params = count_macs_params(model, example_inputs)
    report = InspectReport(type(model).__name__, tuple(example_inputs.shape), macs, params,
                           max_layer_ratio=max_layer_ratio)
    ignored = resolve_ignored(model, example_inputs, ignore)
    try:
        graph = build_graph(model, example_inputs, timeout_s=trace_timeout_s)
        boundaries = unprunable_layers(model, example_inputs, ignored, trace_timeout_s)
    except PruneError as exc:  # untraceable, or past the time budget
        report.trace_error = str(exc)
        report.skipped = {n: "model cannot be traced" for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
        return report
    ignored.update(boundaries)
    report.groups = _groups(graph, ignored, boundaries)
    report.skipped = _skipped(graph, report.groups, ignored)
    report.unwrapped = graph.unwrapped()
    report.min_macs, report.min_params, report.prune_error = _dry_run(model, example_inputs, max_layer_ratio,
                                                                       tuple(ignore), trace_timeout_s)
    return report


# ----------------------------------------------------------------------------- segmentation / detection

VIEW_PREFIX = "model."  # the traced views of edgeprune.tasks.models hold the model as ``self.model``


def _kept_leaves(view: nn.Module, kept: dict[str, str]) -> dict[str, str]:
    """Each conv / linear inside a kept module (view names) -> the kept module's path."""
    out = {}
    for path in kept:
        for name, m in view.get_submodule(VIEW_PREFIX + path).named_modules():
            if isinstance(m, PRUNABLE):
                out[VIEW_PREFIX + path + (f".{name}" if name else "")] = path
    return out


def _unprefixed(g: GroupInfo) -> GroupInfo:
    def strip(names: tuple) -> tuple:
        return tuple(n.removeprefix(VIEW_PREFIX) for n in names)

    return replace(g, name=g.name.removeprefix(VIEW_PREFIX), members=strip(g.members), consumers=strip(g.consumers))


def _task_skipped(graph: Graph, view: nn.Module, leaves: dict[str, str], groups: list[GroupInfo]) -> dict[str, str]:
    """Conv / linear layers neither kept nor in a prunable group, and why."""
    grouped = {VIEW_PREFIX + n for g in groups for n in g.members}
    out = {}
    for name, m in view.named_modules():
        if isinstance(m, PRUNABLE) and name not in leaves and name not in grouped:
            out[name.removeprefix(VIEW_PREFIX)] = ("coupled with a kept layer" if graph.traced(m)
                                                   else "not reached by tracing (outside the traced view)")
    return out


def _task_dry_run(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """The task pipeline's own prune step (fixed layers kept) on a copy at ``ratio``."""
    from .tasks.models import model_macs_params, prune_once

    try:
        pruned = prune_once(model, x, ratio)
        macs, params = model_macs_params(pruned, x)
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises plain exceptions; reported, not raised
        return None, None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return macs, params, None


def inspect_task_model(model: nn.Module, example_inputs: torch.Tensor, *, max_layer_ratio: float = 0.8,
                       trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> InspectReport:
    """What the task pipeline's pruner does with a segmentation / detection model: the coupled groups of its
    traced view, the layers kept whole because the task fixes their output channels (``kept``, with the
    reasons of :func:`edgeprune.tasks.models.fixed_layer_names`), and a dry-run prune at ``max_layer_ratio``.
    MACs are those the pruner targets (:func:`edgeprune.tasks.models.model_macs`: the traced view, plus
    Faster R-CNN's box head once per proposal; detection post-processing is not counted)."""
    from .tasks.models import extra_views, fixed_layer_names, model_macs_params, traced_view

    model = model.eval()
    view = traced_view(model)
    macs, params = model_macs_params(model, example_inputs)
    extras = extra_views(model)
    own = {f"{e.prunes}.{n}": e.what for e in extras for n, m in model.get_submodule(e.prunes).named_modules()
           if isinstance(m, PRUNABLE)}
    report = InspectReport(f"{type(model).__name__} (traced view {type(view).__name__}"
                           f"{''.join(' + ' + e.what for e in extras)})", tuple(example_inputs.shape),
                           macs, params, max_layer_ratio=max_layer_ratio,
                           kept=fixed_layer_names(model), own_graph=own)
    leaves = _kept_leaves(view, report.kept)
    try:
        graph = build_graph(view, example_inputs, timeout_s=trace_timeout_s)
    except PruneError as exc:
        report.trace_error = str(exc)
        return report
    groups = graph.groups(ignored=list(leaves))  # torch-pruning leaves out every group holding a kept layer
    report.groups = [_unprefixed(g) for g in groups]
    report.skipped = {n: why for n, why in _task_skipped(graph, view, leaves, report.groups).items() if n not in own}
    report.unwrapped = [n.removeprefix(VIEW_PREFIX) for n in graph.unwrapped()]
    report.min_macs, report.min_params, report.prune_error = _task_dry_run(model, example_inputs, max_layer_ratio)
    return report
