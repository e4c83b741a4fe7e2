"""Physical, dependency-aware channel pruning: a thin layer over torch-pruning.

torch-pruning's ``DependencyGraph`` finds the coupled channels (residual adds, concatenations,
depthwise and grouped convs) and ``BasePruner`` ranks and removes them; this module only adds

- reaching a MACs or parameter reduction within a tolerance (a safeguarded secant search on the
  pruning ratio, each trial pruning a deep copy, so the caller's model is never touched),
- a per-layer cap (``max_layer_ratio``) that also holds under global ranking,
- per-layer score normalization before a global ranking,
- the classifier head always left alone, plus the user's ``ignore`` names,
- a per-layer table, and a pickle-free save/load (architecture reference + channel plan +
  safetensors weights).
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .errors import EdgePruneError, ModelLoadError, PruneError
from .graph import (PRUNABLE, TRACE_TIMEOUT_S, build_graph, failing_root, min_keep, out_channels, pruner_class,
                    tp_error)
from .safety import atomic_write
from .watchdog import time_budget

PRUNED_JSON = "pruned.json"
WEIGHTS_FILE = "model.safetensors"
PRUNED_FORMAT = 2  # 2: + every state-dict shape and each module's structural attributes (exact rebuild)
_MAX_TRIALS = 8
_MAX_REFINE_LAYERS = 24  # local width search only where a move costs 2 x layers trials
_MAX_REFINE_MOVES = 8
_MIN_BRACKET = 0.02  # below this ratio width, rounding jumps dominate: mix the two ends per layer
_MAX_BOUNDARIES = 4  # groups torch-pruning breaks on that are turned into unprunable boundaries, then retried


# ----------------------------------------------------------------------------- results


@dataclass
class LayerRow:
    name: str
    channels_before: int
    channels_after: int
    score_mean: Optional[float]
    score_min: Optional[float]
    score_max: Optional[float]
    skipped: Optional[str]  # reason when the layer is left alone


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    plan: dict[str, int]  # module name -> out channels after pruning (every conv and linear)
    layers: list[LayerRow]
    steps: list[dict]  # per iterative step: macs, params, ratio
    ratio: float = 0.0  # the channel pruning ratio used
    target: Optional[dict] = None  # {"metric": "macs"|"params", "reduction": x, "tolerance": t}
    target_met: bool = True
    # torch-pruning's pruning history ([root module, out-channel pruning?, indices] per group pruned, in order):
    # replayed on the unpruned model it tells which original channels each layer kept (edgeprune.reconstruct)
    history: list[list] = field(default_factory=list)

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_reduction(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def table(self) -> str:
        head = (f"MACs {self.macs_before / 1e6:.2f}M -> {self.macs_after / 1e6:.2f}M ({self.macs_reduction:.3f}x), "
                f"params {self.params_before / 1e6:.3f}M -> {self.params_after / 1e6:.3f}M "
                f"({self.params_reduction:.3f}x), ratio {self.ratio:.3f}")
        return head + "\n" + _format_rows(self.layers)

    def to_dict(self) -> dict:
        return {
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_reduction": self.macs_reduction, "params_reduction": self.params_reduction,
            "ratio": self.ratio, "target": self.target, "target_met": self.target_met,
            "plan": dict(self.plan), "layers": [asdict(r) for r in self.layers], "steps": list(self.steps),
        }


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def _format_rows(rows: Sequence[LayerRow]) -> str:
    width = max([len("layer")] + [len(r.name) for r in rows])
    lines = [f"{'layer':<{width}}  {'before':>6}  {'after':>6}  {'kept':>5}  "
             f"{'score mean':>10}  {'min':>8}  {'max':>8}  skipped"]
    for r in rows:
        kept = r.channels_after / max(r.channels_before, 1)
        lines.append(f"{r.name:<{width}}  {r.channels_before:>6}  {r.channels_after:>6}  {kept:>5.0%}  "
                     f"{_fmt(r.score_mean):>10}  {_fmt(r.score_min):>8}  {_fmt(r.score_max):>8}  {r.skipped or ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def shape_pass():
    """For forwards that only trace shapes (MACs counts, checks) of one-off channel widths, as the target
    search makes dozens of: oneDNN builds a JIT kernel for every new conv shape (tens of ms each, more
    than the convolution itself at batch 1); ATen's own CPU convolution needs none. Same results."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters as torch-pruning counts them (one forward pass on ``example_inputs``)."""
    import torch_pruning as tp

    with shape_pass():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def plain_history(dg: Any) -> list[list]:
    """A dependency graph's pruning history as JSON-able ``[module name, out-channel pruning?, [indices]]``."""
    return [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in dg.pruning_history()]


def channel_plan(model: nn.Module) -> dict[str, int]:
    """Module name -> out channels, for every conv and linear layer."""
    return {name: out_channels(m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def find_head(model: nn.Module, example_inputs: torch.Tensor) -> str:
    """Name of the last conv/linear layer that runs in the forward pass: the classifier head."""
    return forward_order(model, example_inputs)[-1]


def forward_order(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers in the order they first run."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_a, _n=n: order.append(_n))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    try:
        _forward(model, example_inputs, "the unpruned model")
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise PruneError(f"{type(model).__name__} has no Conv or Linear layer that runs in forward; nothing to prune")
    return list(dict.fromkeys(order))


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor, what: str) -> Any:
    was_training = model.training
    model.eval()
    try:
        with shape_pass():
            return model(x)
    except Exception as exc:  # any failure in user code: report which model and input
        raise PruneError(f"forward of {what} ({type(model).__name__}) on input {tuple(x.shape)} failed: "
                         f"{type(exc).__name__}: {exc}",
                         hint="check --input-shape / in_channels against the model") from exc
    finally:
        model.train(was_training)


def resolve_ignored(model: nn.Module, example_inputs: torch.Tensor, ignore: Sequence[str]) -> dict[str, str]:
    """Module name -> reason it is left alone: the classifier head and the user's ``ignore`` names."""
    modules = dict(model.named_modules())
    unknown = [n for n in ignore if n not in modules]
    if unknown:
        names = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
        raise PruneError(f"ignore names not in the model: {unknown}",
                         hint=f"conv/linear names include: {', '.join(names[:12])}{'...' if len(names) > 12 else ''}")
    reasons = {n: "ignored (user)" for n in ignore}
    reasons[find_head(model, example_inputs)] = "classifier head"
    return reasons


def unprunable_layers(model: nn.Module, x: torch.Tensor, ignored: dict[str, str],
                      timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> dict[str, str]:
    """Layers left alone because torch-pruning would break on them: those feeding a fixed-size split, and
    those whose coupled group it cannot map (unknown ops become boundaries instead of crashes)."""
    graph = build_graph(model, x, timeout_s=timeout_s)
    out = {k: v for k, v in graph.split_feeders().items() if k not in ignored}
    stage = f"checking which coupled groups of {type(model).__name__} torch-pruning can map"
    with time_budget(timeout_s, stage):
        per_root = None if not timeout_s else max(5.0, timeout_s / 6)
        out.update(graph.unmappable_roots(set(ignored) | set(out), per_root))
    return out


def _modules_by_name(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    mods = dict(model.named_modules())
    return [mods[n] for n in names]


# ----------------------------------------------------------------------------- importance


GLOBAL_NORMALIZERS = ("rank", "zscore", "mean")


def _normalized(importance: Any, mode: str = "rank") -> Any:
    """Wrap an importance so each group's scores become comparable across layers before a global ranking:
    ``rank`` (rank / (C - 1) within the group, the default), ``zscore``, or ``mean`` (divided by the mean
    magnitude: rescales but does not make layers comparable; kept for reproducing older runs)."""
    import torch_pruning as tp

    from .scoring.adapters import normalize_scores

    class _PerLayerNormalized(tp.importance.Importance):
        def __init__(self, inner: Any):
            self.inner = inner

        def __call__(self, group: Any) -> Optional[torch.Tensor]:
            imp = self.inner(group)
            if imp is None:
                return None
            if mode == "mean":
                return imp / imp.abs().mean().clamp_min(1e-12)
            return normalize_scores(imp.detach().float().cpu(), mode).to(imp.device)

    return _PerLayerNormalized(importance)


# ----------------------------------------------------------------------------- one trial


@dataclass
class _Settings:
    round_to: Optional[int]
    max_layer_ratio: float
    global_ranking: bool
    iterative_steps: int
    ignored: dict[str, str]
    before_step: Optional[Callable[[nn.Module, int], object]]
    global_normalize: str = "rank"
    trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S


@dataclass
class _Trial:
    model: nn.Module
    ratio: float
    macs: int
    params: int
    steps: list[dict] = field(default_factory=list)
    history: list[list] = field(default_factory=list)  # torch-pruning's pruning history of this trial


def _build_pruner(model: nn.Module, x: torch.Tensor, importance: Any, ratio: float, s: _Settings,
                  layer_ratios: Optional[dict[str, float]] = None) -> Any:
    ratio_dict = None
    if layer_ratios:
        mods = dict(model.named_modules())
        ratio_dict = {mods[n]: r for n, r in layer_ratios.items()}
    stage = f"tracing {type(model).__name__} and building its dependency graph (pruner setup)"
    with warnings.catch_warnings(), time_budget(s.trace_timeout_s, stage):
        warnings.simplefilter("ignore")  # unwrapped-parameter notices; inspect reports them
        try:
            return pruner_class()(
                model, x, importance=_normalized(importance, s.global_normalize) if s.global_ranking else importance,
                global_pruning=s.global_ranking, pruning_ratio=ratio, pruning_ratio_dict=ratio_dict,
                max_pruning_ratio=s.max_layer_ratio,
                iterative_steps=s.iterative_steps, ignored_layers=_modules_by_name(model, list(s.ignored)),
                round_to=s.round_to,
            )
        except EdgePruneError:
            raise
        except Exception as exc:  # torch-pruning raises plain exceptions on untraceable graphs
            raise tp_error(exc, model, "tracing") from exc


def _cap_group(pruner: Any, group: Any, s: _Settings) -> Optional[Any]:
    """Enforce ``max_layer_ratio`` on the root layer of a group (global ranking can exceed it)."""
    dg = pruner.DG
    root = group[0]
    module, fn = root.dep.target.module, root.dep.handler
    init = pruner.layer_init_out_ch.get(module)
    if init is None or not dg.is_out_channel_pruning_fn(fn):
        return group
    current = dg.get_out_channels(module)
    allowed = current - min_keep(init, round_to=s.round_to, max_layer_ratio=s.max_layer_ratio, current=current)
    idxs = list(root.idxs)
    if len(idxs) <= allowed:
        return group
    if allowed <= 0 or pruner.channel_groups(group) > 1:
        return None
    full = dg.get_pruning_group(module, fn, list(range(current)))
    imp = pruner.estimate_importance(full)
    chosen = set(idxs)
    order = [int(i) for i in torch.argsort(imp.cpu()) if int(i) in chosen]
    return dg.get_pruning_group(module, fn, sorted(order[:allowed]))


def _run_steps(pruner: Any, model: nn.Module, x: torch.Tensor, ratio: float, s: _Settings) -> list[dict]:
    steps = []
    for step in range(s.iterative_steps):
        if s.before_step is not None:
            s.before_step(model, step)
        for group in pruner.step(interactive=True):
            capped = _cap_group(pruner, group, s)
            if capped is not None:
                capped.prune()
        macs, params = count_macs_params(model, x)
        steps.append({"step": step + 1, "ratio": ratio * (step + 1) / s.iterative_steps, "macs": macs, "params": params})
    return steps


def _trial(model: nn.Module, x: torch.Tensor, importance: Any, ratio: float, s: _Settings,
           layer_ratios: Optional[dict[str, float]] = None) -> _Trial:
    """Prune a deep copy of ``model`` at ``ratio`` (``layer_ratios``: name -> ratio overrides) and measure it."""
    pruned = copy.deepcopy(model).eval()
    with shape_pass():  # the graph build traces a forward, too
        pruner = _build_pruner(pruned, x, importance, ratio, s, layer_ratios)
    try:
        steps = _run_steps(pruner, pruned, x, ratio, s)
    except EdgePruneError:
        raise
    except Exception as exc:  # an index or shape error inside torch-pruning while removing channels
        err = tp_error(exc, pruned, f"pruning at ratio {ratio:.3f}")
        err.group_root = failing_root(exc, pruned)
        raise err from exc
    _forward(pruned, x, f"the model pruned at ratio {ratio:.3f}")
    return _Trial(pruned, ratio, steps[-1]["macs"], steps[-1]["params"], steps, plain_history(pruner.DG))


# ----------------------------------------------------------------------------- target search


@dataclass
class _Target:
    metric: str  # "macs" | "params"
    reduction: float
    tolerance: float
    base: int

    def achieved(self, t: _Trial) -> float:
        return self.base / max(getattr(t, self.metric), 1)

    def error(self, t: _Trial) -> float:
        return self.achieved(t) / self.reduction - 1.0

    def met(self, t: _Trial) -> bool:
        return abs(self.error(t)) <= self.tolerance


def _next_ratio(target: _Target, lo: tuple[float, float], hi: Optional[tuple[float, float]], r_max: float) -> float:
    """Before a bracket: the model reduction = (1 - r)^-k fitted to ``lo``; inside one: log-linear
    interpolation, kept 10% away from the bracket ends so that it always shrinks."""
    if hi is None:
        r, f = lo
        k = math.log(max(f, 1.0 + 1e-6)) / -math.log(1.0 - r) if r > 0 else 2.0
        guess = 1.0 - target.reduction ** (-1.0 / max(k, 0.5))
        return min(max(guess, lo[0] + 0.25 * (r_max - lo[0])), r_max)
    (r0, f0), (r1, f1) = lo, hi
    t = (math.log(target.reduction) - math.log(f0)) / max(math.log(f1) - math.log(f0), 1e-12)
    return r0 + (r1 - r0) * min(max(t, 0.1), 0.9)


def _search(model: nn.Module, x: torch.Tensor, importance: Any, target: _Target, s: _Settings,
            progress: bool) -> _Trial:
    """Bracket the target on the global ratio, then (if channel rounding makes it jump over the
    target) mix the two bracketing ratios layer by layer."""
    from .progress import progress_bar as tqdm

    r_max = s.max_layer_ratio
    lo: tuple[float, float] = (0.0, 1.0)
    hi: Optional[tuple[float, float]] = None
    trials: dict[float, _Trial] = {}
    ratio = min(1.0 - target.reduction ** -0.5, r_max)
    with tqdm(total=_MAX_TRIALS, desc=f"prune to {target.reduction:g}x {target.metric}", disable=not progress,
              leave=False) as bar:
        for _ in range(_MAX_TRIALS):
            trial = trials[ratio] = _trial(model, x, importance, ratio, s)
            bar.update(1)
            if target.met(trial):
                return trial
            point = (ratio, target.achieved(trial))
            if point[1] < target.reduction:
                lo = point
                if ratio >= r_max - 1e-9:
                    break  # unreachable under the per-layer cap
            else:
                hi = point
            if hi is not None and lo[0] in trials and hi[0] - lo[0] < _MIN_BRACKET:
                return _mix(model, x, importance, target, s, trials[lo[0]], trials[hi[0]], progress)
            ratio = _next_ratio(target, lo, hi, r_max)
    if hi is not None and lo[0] in trials:
        return _mix(model, x, importance, target, s, trials[lo[0]], trials[hi[0]], progress)
    return min(trials.values(), key=lambda t: abs(target.error(t)))


def _mix(model: nn.Module, x: torch.Tensor, importance: Any, target: _Target, s: _Settings,
         lo: _Trial, hi: _Trial, progress: bool) -> _Trial:  # noqa: ARG001 - progress kept for symmetry
    """Bisection on k: the first k layers (forward order) take ``hi.ratio``, the others ``lo.ratio``."""
    names = [n for n in forward_order(model, x) if n not in s.ignored]
    a, b = 0, len(names)
    best = min((lo, hi), key=lambda t: abs(target.error(t)))
    while b - a > 1:
        k = (a + b) // 2
        trial = _trial(model, x, importance, lo.ratio, s, {n: hi.ratio for n in names[:k]})
        trial.ratio = lo.ratio + (hi.ratio - lo.ratio) * k / len(names)  # nominal, for the report
        if abs(target.error(trial)) < abs(target.error(best)):
            best = trial
        if target.met(trial):
            return trial
        a, b = (k, b) if target.achieved(trial) < target.reduction else (a, k)
    return best


def _refine(model: nn.Module, x: torch.Tensor, importance: Any, target: _Target, s: _Settings,
            start: _Trial) -> _Trial:
    """Local search on per-layer widths when channel rounding makes every global ratio miss the
    target: move one layer by one rounding block (either way) at a time, keeping the move that
    lands closest to the target, until within tolerance or no move helps. Small models only."""
    names = [n for n in forward_order(model, x) if n not in s.ignored]
    if len(names) > _MAX_REFINE_LAYERS:
        return start
    init, step = channel_plan(model), s.round_to or 1
    best = start
    for _ in range(_MAX_REFINE_MOVES):
        plan = channel_plan(best.model)
        moved = None
        for name in names:
            for keep in (plan[name] - step, plan[name] + step):
                if not min_keep(init[name], round_to=s.round_to, max_layer_ratio=s.max_layer_ratio) <= keep <= init[name]:
                    continue
                widths = {n: plan[n] for n in names} | {name: keep}
                try:
                    trial = _trial(model, x, importance, start.ratio, s,
                                   {n: (init[n] - w) / init[n] for n, w in widths.items()})
                except PruneError:
                    continue
                if channel_plan(trial.model).get(name) != keep:
                    continue  # coupled layer: the group moved differently than asked
                if abs(target.error(trial)) < abs(target.error(moved or best)):
                    moved = trial
        if moved is None:
            return best
        best = moved
        if target.met(best):
            return best
    return best


# ----------------------------------------------------------------------------- per-layer rows


def _skip_reasons(model: nn.Module, x: torch.Tensor, ignored: dict[str, str],
                  trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> dict[str, str]:
    """Why each conv/linear that cannot change is left alone: ignored, coupled to an ignored layer, untraced."""
    graph = build_graph(model, x, timeout_s=trace_timeout_s)
    reasons = dict(ignored)
    for n in graph.untraced():
        reasons.setdefault(n, "not reached by tracing")
    # the ignored roots are not searched again: some are there because torch-pruning's group search
    # does not end on them (unmappable_roots); the rest of the search gets the trace budget
    modules = dict(model.named_modules())
    with time_budget(trace_timeout_s, "mapping the coupled groups for the per-layer table"):
        groups = graph.groups(ignored=[n for n in ignored if n in modules])
    for group in groups:
        blockers = [n for n in group.members if n in ignored]
        for n in group.members:
            if blockers and n not in ignored:
                reasons.setdefault(n, f"coupled with {blockers[0]} ({ignored[blockers[0]]})")
    return reasons


def _score_summary(scores: Optional[dict[str, torch.Tensor]],
                   name: str) -> tuple[Optional[float], Optional[float], Optional[float]]:
    if not scores or name not in scores:
        return (None, None, None)
    s = torch.as_tensor(scores[name]).detach().float().flatten()
    if s.numel() == 0:
        return (None, None, None)
    return (float(s.mean()), float(s.min()), float(s.max()))


def _layer_rows(before: dict[str, int], after: dict[str, int], reasons: dict[str, str],
                scores: Optional[dict[str, torch.Tensor]]) -> list[LayerRow]:
    rows = []
    for name, c0 in before.items():
        c1 = after.get(name, c0)
        reason = reasons.get(name) if c1 == c0 else None
        rows.append(LayerRow(name, c0, c1, *_score_summary(scores, name), reason))
    return rows


# ----------------------------------------------------------------------------- public API


def _choose_target(target_macs_reduction: Optional[float], target_params_reduction: Optional[float],
                   tolerance: float, macs: int, params: int) -> Optional[_Target]:
    if target_params_reduction is not None:
        return _Target("params", float(target_params_reduction), tolerance, params)
    if target_macs_reduction is not None:
        return _Target("macs", float(target_macs_reduction), tolerance, macs)
    return None


def _check_args(ratio: Optional[float], target: Optional[_Target], round_to: Optional[int],
                max_layer_ratio: float, iterative_steps: int) -> None:
    if ratio is None and target is None:
        raise PruneError("nothing asked: give ratio, target_macs_reduction or target_params_reduction")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise PruneError(f"ratio must be in (0, 1), got {ratio}")
    if target is not None and ratio is None and target.reduction <= 1.0:
        raise PruneError(f"target {target.metric} reduction must be > 1, got {target.reduction}")
    if not 0.0 < max_layer_ratio < 1.0:
        raise PruneError(f"max_layer_ratio must be in (0, 1), got {max_layer_ratio}")
    if round_to is not None and round_to < 1:
        raise PruneError(f"round_to must be >= 1 or None, got {round_to}")
    if iterative_steps < 1:
        raise PruneError(f"iterative_steps must be >= 1, got {iterative_steps}")


def prune_model(model: nn.Module, example_inputs: torch.Tensor, importance: Any, *,
                target_macs_reduction: Optional[float] = 2.0, target_params_reduction: Optional[float] = None,
                ratio: Optional[float] = None, round_to: Optional[int] = 8, max_layer_ratio: float = 0.8,
                global_ranking: bool = False, iterative_steps: int = 1, ignore: Sequence[str] = (),
                tolerance: float = 0.02, scores: Optional[dict[str, torch.Tensor]] = None,
                before_step: Optional[Callable[[nn.Module, int], object]] = None,
                rescore: Optional[Rescorer] = None, global_normalize: str = "rank",
                progress: bool = True, trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> PruneResult:
    """Prune a copy of ``model`` with torch-pruning; ``model`` itself is left untouched.

    ``ratio`` (fixed channel ratio) wins over a target; a params target wins over the MACs target.
    ``importance`` is any ``torch_pruning.importance.Importance``. ``before_step(model, step)`` runs
    before each iterative step on the model being pruned (``loss.backward()`` for Taylor).
    ``rescore(model) -> (importance, scores)``, with ``iterative_steps`` > 1: prune in that many steps,
    each reaching its share of the target, re-scoring the slimmed model between steps (see
    :func:`prune_rescoring`). ``global_normalize``: how group scores meet in a global ranking
    (``rank`` | ``zscore`` | ``mean``). Tracing and each dependency-graph build stop after
    ``trace_timeout_s`` (None: no limit); every exception from torch-pruning comes out as a
    PruneError naming the stage and, if found, the layer or operation.
    """
    if global_normalize not in GLOBAL_NORMALIZERS:
        raise PruneError(f"unknown global_normalize {global_normalize!r}; valid: {', '.join(GLOBAL_NORMALIZERS)}")
    if rescore is not None and iterative_steps > 1:
        return prune_rescoring(model, example_inputs, importance, rescore, steps=iterative_steps,
                               target_macs_reduction=target_macs_reduction,
                               target_params_reduction=target_params_reduction, ratio=ratio, round_to=round_to,
                               max_layer_ratio=max_layer_ratio, global_ranking=global_ranking, ignore=ignore,
                               tolerance=tolerance, scores=scores, before_step=before_step,
                               global_normalize=global_normalize, progress=progress,
                               trace_timeout_s=trace_timeout_s)
    ignored = resolve_ignored(model, example_inputs, ignore)  # also checks that the model runs on the input
    ignored.update(unprunable_layers(model, example_inputs, ignored, trace_timeout_s))
    macs0, params0 = count_macs_params(model, example_inputs)
    target = _choose_target(target_macs_reduction, target_params_reduction, tolerance, macs0, params0)
    _check_args(ratio, target, round_to, max_layer_ratio, iterative_steps)
    s = _Settings(round_to, max_layer_ratio, global_ranking, iterative_steps, ignored, before_step, global_normalize,
                  trace_timeout_s)
    for attempt in range(_MAX_BOUNDARIES + 1):
        try:
            best, target = _prune_to(model, example_inputs, importance, ratio, target, s, progress)
            break
        except PruneError as exc:  # a group torch-pruning breaks on becomes an unprunable boundary, then retry
            root = getattr(exc, "group_root", None)
            if root is None or root in s.ignored or attempt == _MAX_BOUNDARIES:
                raise
            s.ignored[root] = f"torch-pruning failed on its group ({exc.message.rpartition(': ')[0][-80:]})"
    plan = channel_plan(best.model)
    rows = _layer_rows(channel_plan(model), plan, _skip_reasons(model, example_inputs, ignored, trace_timeout_s), scores)
    result = PruneResult(best.model, macs0, best.macs, params0, best.params, plan, rows, best.steps, best.ratio,
                         None if target is None else {"metric": target.metric, "reduction": target.reduction,
                                                      "tolerance": target.tolerance},
                         True if target is None else target.met(best), best.history)
    if target is not None and not result.target_met:
        _raise_or_warn_unmet(target, best, s)
    return result


def _prune_to(model: nn.Module, x: torch.Tensor, importance: Any, ratio: Optional[float],
              target: Optional[_Target], s: _Settings, progress: bool) -> tuple[_Trial, Optional[_Target]]:
    if ratio is not None:
        return _trial(model, x, importance, ratio, s), None
    if target is None:
        raise PruneError("nothing asked: give ratio, target_macs_reduction or target_params_reduction")
    best = _search(model, x, importance, target, s, progress)
    if not target.met(best):
        best = _refine(model, x, importance, target, s, best)
    return best, target


# ----------------------------------------------------------------------------- iterative schedule with re-scoring

Rescorer = Callable[[nn.Module], tuple[Any, Optional[dict[str, torch.Tensor]]]]


def _step_share(total: float, step: int, steps: int) -> float:
    """Reduction reached after ``step`` of ``steps`` equal (geometric) shares of ``total``."""
    return total ** (step / steps)


def prune_rescoring(model: nn.Module, example_inputs: torch.Tensor, importance: Any, rescore: Rescorer, *,
                    steps: int, target_macs_reduction: Optional[float] = 2.0,
                    target_params_reduction: Optional[float] = None, ratio: Optional[float] = None,
                    round_to: Optional[int] = 8, max_layer_ratio: float = 0.8, global_ranking: bool = False,
                    ignore: Sequence[str] = (), tolerance: float = 0.02,
                    scores: Optional[dict[str, torch.Tensor]] = None,
                    before_step: Optional[Callable[[nn.Module, int], object]] = None,
                    global_normalize: str = "rank", progress: bool = True,
                    trace_timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> PruneResult:
    """Prune in ``steps`` one-shot steps, re-scoring the slimmed model between them.

    Step j reaches ``target ** (j / steps)`` of the original MACs (or params); the last one aims at
    the full target from wherever the previous steps landed, so the tolerance holds for the end
    result. A fixed ``ratio`` is split as ``1 - (1 - ratio) ** (1 / steps)`` per step. The per-layer
    cap is split the same way (``1 - (1 - max_layer_ratio) ** (1 / steps)`` per step), so that no
    layer loses more than ``max_layer_ratio`` of its original width overall. ``importance`` /
    ``scores`` are those of the unpruned model; ``rescore(model)`` gives them for each slimmed one.
    """
    if steps < 1:
        raise PruneError(f"iterative_steps must be >= 1, got {steps}")
    macs0, params0 = count_macs_params(model, example_inputs)
    target = _choose_target(target_macs_reduction, target_params_reduction, tolerance, macs0, params0)
    _check_args(ratio, target, round_to, max_layer_ratio, steps)
    if ratio is not None:
        target = None  # a fixed ratio wins over a target, as in prune_model
    step_cap = 1.0 - (1.0 - max_layer_ratio) ** (1.0 / steps)
    current, imp, records, res, history = model, importance, [], None, []
    for j in range(1, steps + 1):
        if j > 1:
            imp, _ = rescore(current)
        kw: dict[str, Any] = {"target_macs_reduction": None, "target_params_reduction": None, "ratio": None}
        if ratio is not None:
            kw["ratio"] = 1.0 - (1.0 - ratio) ** (1.0 / steps)
        elif target is not None:  # _check_args: a ratio or a target is given
            now = count_macs_params(current, example_inputs)[0 if target.metric == "macs" else 1]
            reached = target.base / max(now, 1)
            want = _step_share(target.reduction, j, steps) / reached  # reduction still to reach from `current`
            kw[f"target_{target.metric}_reduction"] = max(want, 1.0 + 1e-3)
        with warnings.catch_warnings():
            if j < steps:
                warnings.simplefilter("ignore")  # an intermediate step off by rounding is caught up by the next
            res = prune_model(current, example_inputs, imp, **kw, round_to=round_to, max_layer_ratio=step_cap,
                              global_ranking=global_ranking, ignore=ignore, tolerance=tolerance,
                              before_step=before_step, global_normalize=global_normalize, progress=progress,
                              trace_timeout_s=trace_timeout_s)
        current = res.model
        history += res.history  # each step's indices count the channels left by the steps before: replayable in order
        records.append({"step": j, "ratio": res.ratio, "macs": res.macs_after, "params": res.params_after,
                        "rescored": j > 1})
    if res is None:
        raise PruneError(f"iterative_steps must be >= 1, got {steps}")
    plan = channel_plan(current)
    ignored = resolve_ignored(model, example_inputs, ignore)
    ignored.update(unprunable_layers(model, example_inputs, ignored, trace_timeout_s))
    rows = _layer_rows(channel_plan(model), plan, _skip_reasons(model, example_inputs, ignored, trace_timeout_s),
                       scores)
    result = PruneResult(current, macs0, res.macs_after, params0, res.params_after, plan, rows, records, res.ratio,
                         None if target is None else {"metric": target.metric, "reduction": target.reduction,
                                                      "tolerance": target.tolerance, "steps": steps},
                         history=history)
    if target is not None:
        trial = _Trial(current, res.ratio, res.macs_after, res.params_after)
        result.target_met = target.met(trial)
        if not result.target_met:
            warnings.warn(f"iterative pruning in {steps} steps reached {target.achieved(trial):.3f}x {target.metric}, "
                          f"asked {target.reduction:g}x within {target.tolerance:.0%}", stacklevel=2)
    return result


def _raise_or_warn_unmet(target: _Target, best: _Trial, s: _Settings) -> None:
    got = target.achieved(best)
    msg = (f"asked {target.reduction:g}x {target.metric}, closest reachable is {got:.3f}x "
           f"(ratio {best.ratio:.3f}, round_to={s.round_to}, max_layer_ratio={s.max_layer_ratio})")
    if got < target.reduction * (1 - target.tolerance) and best.ratio >= s.max_layer_ratio - 1e-9:
        raise PruneError(f"target unreachable: {msg}",
                         hint="raise max_layer_ratio, lower the target, or un-ignore layers")
    warnings.warn(f"target not met within {target.tolerance:.0%}: {msg}; channel rounding is too coarse "
                  "for this model (use a smaller round_to or global_ranking)", stacklevel=3)


# ----------------------------------------------------------------------------- save / load


def save_pruned(model: nn.Module, out_dir: Path, *, arch: str, model_kwargs: dict, num_classes: int,
                in_channels: int, input_shape: tuple, history: Optional[list] = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/pruned.json``: arch reference, channel plan, every
    state-dict shape and each module's integer attributes (channels, groups, split sizes), and torch-pruning's
    pruning history when known (which channels were kept: calibration-only reconstruction needs it). No pickle."""
    from .models import save_safetensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": PRUNED_FORMAT, "arch": arch, "model_kwargs": dict(model_kwargs), "num_classes": num_classes,
            "in_channels": in_channels, "input_shape": list(input_shape), "plan": channel_plan(model),
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}, "attrs": structural_attrs(model)}
    if history is not None:
        meta["history"] = history
    save_safetensors(model, out_dir / WEIGHTS_FILE, metadata={"edgeprune": "pruned", "arch": arch})
    atomic_write(out_dir / PRUNED_JSON, json.dumps(meta, indent=1))
    return out_dir


def read_meta(out_dir: Path) -> dict:
    path = Path(out_dir) / PRUNED_JSON
    if not path.is_file() or not (Path(out_dir) / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{out_dir} is not a pruned-model folder: needs {PRUNED_JSON} and {WEIGHTS_FILE}")
    from .safety import read_json

    return read_json(path, "pruned-model file", keys=("arch", "model_kwargs", "num_classes", "in_channels",
                                                     "input_shape", "plan"))


def apply_plan(model: nn.Module, example_inputs: torch.Tensor, plan: dict[str, int]) -> nn.Module:
    """Prune ``model`` in place to the out-channel ``plan`` by dropping trailing channels (weights are loaded after)."""
    graph = build_graph(model, example_inputs, timeout_s=None)
    modules = dict(model.named_modules())
    for name, want in plan.items():
        if name not in modules:
            raise ModelLoadError(f"plan names {name!r}, which the rebuilt architecture does not have")
        have = out_channels(modules[name])
        if want > have or (want < have and not graph.traced(modules[name])):
            raise ModelLoadError(f"cannot bring {name} from {have} to {want} channels")
        graph.cut_to(name, want)
    return model


def _is_structural(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(type(v) is int for v in value)
    return type(value) in (int, bool)


def structural_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name -> its int/bool attributes and int tuples/lists (channels, groups, split sizes, features)."""
    out = {}
    for name, module in model.named_modules():
        attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(module).items()
                 if not k.startswith("_") and k != "training" and _is_structural(v)}
        if attrs:
            out[name] = attrs
    return out


def _restore_attrs(modules: dict[str, nn.Module], attrs: dict[str, dict[str, Any]]) -> None:
    for name, values in attrs.items():
        module = modules.get(name)
        if module is None:
            raise ModelLoadError(f"the saved model has a module {name!r}, which the rebuilt architecture does not have")
        for key, value in values.items():
            current = getattr(module, key, None)
            if _is_structural(current) and isinstance(value, list) == isinstance(current, (list, tuple)):
                setattr(module, key, type(current)(value) if isinstance(current, (list, tuple)) else value)


def _resize_tensors(modules: dict[str, nn.Module], shapes: dict[str, list[int]]) -> None:
    """Replace every parameter and buffer whose saved shape differs by an empty one of that shape."""
    def resized(name: str, key: str, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        full = f"{name}.{key}" if name else key
        if t is None or full not in shapes or list(t.shape) == shapes[full]:
            return None
        return torch.empty(shapes[full], dtype=t.dtype)

    for name, module in modules.items():
        for key, p in list(module._parameters.items()):
            if (new := resized(name, key, p)) is not None and p is not None:
                module._parameters[key] = nn.Parameter(new, requires_grad=p.requires_grad)
        for key, b in list(module._buffers.items()):
            if (new := resized(name, key, b)) is not None:
                module._buffers[key] = new


def rebuild_to_shapes(model: nn.Module, shapes: dict[str, list[int]], attrs: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize a freshly built ``model`` in place to a pruned one's saved shapes and attributes (weights loaded after)."""
    modules = dict(model.named_modules())
    _restore_attrs(modules, attrs)
    _resize_tensors(modules, shapes)
    return model


def load_pruned(out_dir: Path) -> nn.Module:
    """Rebuild the original architecture, resize it to the saved shapes (format 1: replay the channel
    plan), load the weights (eval mode)."""
    from safetensors.torch import load_file

    from .config import ModelConfig
    from .models import build_model, check_finite

    meta = read_meta(Path(out_dir))
    cfg = ModelConfig(arch=meta["arch"], num_classes=meta["num_classes"], kwargs=meta["model_kwargs"],
                      in_channels=meta["in_channels"])
    model = build_model(cfg, meta["in_channels"]).eval()
    if "shapes" in meta and "attrs" in meta:
        rebuild_to_shapes(model, meta["shapes"], meta["attrs"])
    else:
        apply_plan(model, torch.zeros(1, *meta["input_shape"]), meta["plan"])
    try:
        state = OrderedDict(load_file(str(Path(out_dir) / WEIGHTS_FILE)))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"{Path(out_dir) / WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    check_finite(state, Path(out_dir) / WEIGHTS_FILE)
    setattr(state, "_metadata", getattr(model.state_dict(), "_metadata", None))  # per-module versions (MNASNet)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {out_dir} do not fit the rebuilt pruned {meta['arch']}: {exc}") from exc
    return model.eval()
