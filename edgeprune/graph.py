"""The one adapter over torch-pruning's ``DependencyGraph``: prune, inspect and the latency search use it.

torch-pruning finds the coupled channels (residual adds, concatenations, depthwise and grouped
convs); this module builds its graph within a time budget (failures as ``PruneError`` naming the
op or layer), names groups by their root layer (``GroupInfo``), and holds the one rule for how few
channels a layer may keep (``min_keep``). Every private torch-pruning name the package relies on is
listed in ``TP_PRIVATE`` and checked by ``tests/test_graph.py``, so an upgrade that removes one fails
there, by name, instead of deep inside a prune.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .errors import EdgePruneError, PruneError
from .watchdog import StageTimeout, time_budget

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TRACE_TIMEOUT_S = 60.0  # default budget for tracing + dependency-graph build (prune.trace_timeout_s)

# Private torch-pruning names used here: class -> attributes (methods, or instance attributes set by the
# graph build). torch-pruning is pinned (==1.6.1); tests/test_graph.py fails naming any that disappears.
TP_PRIVATE: dict[str, tuple[str, ...]] = {
    "torch_pruning.pruner.BasePruner": ("_is_atten_group", "_get_channel_groups", "_round_to"),
    "torch_pruning.DependencyGraph": ("_param_to_name",),
    "torch_pruning.dependency.node.Node": ("_name",),  # the module name scoring/adapters.py matches scores by
}


@dataclass(frozen=True)
class GroupInfo:
    """A coupled channel group, named by its root layer (the first conv/linear torch-pruning reaches for it)."""

    name: str
    channels: int
    members: tuple[str, ...]  # layers whose output channels are removed together
    consumers: tuple[str, ...] = ()  # layers whose input channels follow
    prunable: bool = True
    reason: Optional[str] = None  # why not, when not prunable


def min_keep(full: int, *, round_to: Optional[int], max_layer_ratio: float, current: Optional[int] = None) -> int:
    """Fewest channels a layer of ``full`` channels may keep: (1 - max_layer_ratio) of them, rounded up to
    ``round_to``, never more than it has now (``current``, default ``full``): a result equal to that
    means it cannot be cut."""
    keep = math.ceil(full * (1.0 - max_layer_ratio) - 1e-9)
    if round_to:
        keep = math.ceil(keep / round_to) * round_to
    return max(1, min(keep, full if current is None else current))


def out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    raise PruneError(f"{type(module).__name__} is not a conv or linear layer; it has no output channels to prune")


# ----------------------------------------------------------------------------- errors from inside torch-pruning


def _producers(node: Any, names: dict[int, str], limit: int = 3) -> list[str]:
    """The nearest model layers that feed a torch-pruning op node (breadth-first up its inputs)."""
    seen, queue, out = set(), list(getattr(node, "inputs", [])), []  # type: tuple[set[int], list[Any], list[str]]
    while queue and len(out) < limit:
        n = queue.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        name = names.get(id(getattr(n, "module", None)))
        if name:
            out.append(name)
        else:
            queue.extend(getattr(n, "inputs", []))
    return out


def _frame_culprit(values: list, names: dict[int, str]) -> tuple[Optional[str], Optional[str], list[str]]:
    """(layer, op, layers feeding op) among one frame's locals: torch-pruning Nodes, Dependencies, modules."""
    layer = op = None
    feeds: list[str] = []
    for value in values:
        target = getattr(value, "target", None)
        for cand in (value, target):
            module = getattr(cand, "module", cand)
            if not isinstance(module, nn.Module):
                continue
            if names.get(id(module)):
                layer = layer or names[id(module)]
            elif op is None and hasattr(cand, "inputs"):  # an op node (reshape, split, cat, ...) of the graph
                op = str(getattr(cand, "name", None) or type(module).__name__)
                feeds = _producers(cand, names)
    return layer, op, feeds


def culprit(exc: BaseException, model: nn.Module) -> tuple[Optional[str], Optional[str], list[str]]:
    """Where torch-pruning was when it raised: (layer, op, layers feeding op) from the innermost frame that
    holds one of ``model``'s modules or one of its graph's op nodes."""
    names = {id(m): n for n, m in model.named_modules() if n}
    found: tuple[Optional[str], Optional[str], list[str]] = (None, None, [])
    tb = exc.__traceback__
    while tb is not None:
        hit = _frame_culprit(list(tb.tb_frame.f_locals.values()), names)
        if hit[0] or hit[1]:
            found = hit
        tb = tb.tb_next
    return found


def tp_error(exc: BaseException, model: nn.Module, stage: str) -> PruneError:
    """A PruneError for an exception from inside torch-pruning: the stage, the op/layer if known, and what to do."""
    layer, op, feeds = culprit(exc, model)
    where = ""
    if op:
        where = f" at operation {op}" + (f" (fed by {', '.join(feeds)})" if feeds else "")
    elif layer:
        where = f" at layer {layer} ({type(model.get_submodule(layer)).__name__})"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if stage == "tracing":  # the graph itself cannot be built: --ignore does not reach this far
        hint = ("unsupported op: torch-pruning cannot build the dependency graph through it, so this model "
                "cannot be pruned as is; replace that construct in the model, or report it upstream "
                "(docs/upstream-torch-pruning.md)")
    else:
        culprits = feeds if op else ([layer] if layer else [])
        todo = [f"leave it alone with {' '.join('--ignore ' + n for n in culprits)}"] if culprits else []
        todo += ["prune less (a smaller ratio or target)",
                 "if the operation is unsupported by torch-pruning, --ignore the layers that feed it "
                 "(`edgeprune inspect` lists groups and layers)"]
        hint = "; or ".join(todo)
    return PruneError(f"torch-pruning cannot handle {type(model).__name__} (while {stage}){where}: "
                      f"{type(exc).__name__}: {first}", hint=hint)


def failing_root(exc: BaseException, model: nn.Module) -> Optional[str]:
    """The root layer of the torch-pruning Group being built or pruned when ``exc`` was raised."""
    from torch_pruning.dependency.group import Group

    names = {id(m): n for n, m in model.named_modules() if n}
    root, tb = None, exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, Group) and len(value) > 0:
                root = names.get(id(value[0].dep.target.module), root)
        tb = tb.tb_next
    return root


# ----------------------------------------------------------------------------- the graph


def build_dependency_graph(model: nn.Module, x: torch.Tensor, *, timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> Any:
    """torch-pruning's DependencyGraph of ``model`` on ``x``, within a time budget; failures as PruneError.

    torch-pruning traces autograd: grad is enabled and every parameter made to require it while it builds."""
    import torch_pruning as tp

    frozen = [p for p in model.parameters() if not p.requires_grad]
    stage = f"tracing {type(model).__name__} and building its dependency graph"
    with warnings.catch_warnings(), torch.enable_grad(), time_budget(timeout_s, stage):
        warnings.simplefilter("ignore")  # unwrapped-parameter notices; inspect reports them
        try:
            for p in frozen:
                p.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(model, example_inputs=x)
        except EdgePruneError:
            raise
        except Exception as exc:  # torch-pruning raises plain exceptions on graphs it cannot map
            raise tp_error(exc, model, "tracing") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)


class Graph:
    """``model``'s dependency graph with layers named as in ``model.named_modules()``.

    It stays valid while ``model`` is pruned through it (torch-pruning edits the modules in place)."""

    def __init__(self, model: nn.Module, dg: Any):
        self.model, self.dg = model, dg
        self._names = {id(m): n for n, m in model.named_modules() if n}

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, *, timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> "Graph":
        return cls(model, build_dependency_graph(model, x, timeout_s=timeout_s))

    def name(self, module: nn.Module) -> Optional[str]:
        return self._names.get(id(module))

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def traced(self, module: nn.Module) -> bool:
        """Whether tracing reached ``module`` (a layer that never runs in forward is not in the graph)."""
        return module in self.dg.module2node

    def untraced(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, PRUNABLE) and not self.traced(m)]

    def channels(self, module: nn.Module) -> int:
        return int(self.dg.get_out_channels(module))

    def removes_out_channels(self, dep: Any) -> bool:
        """Whether a group member's dependency removes output channels (else it follows on the input side)."""
        return bool(self.dg.is_out_channel_pruning_fn(dep.handler))

    def out_members(self, group: Any) -> list[str]:
        """Named layers of ``group`` whose output channels go, in group order, once each."""
        return list(dict.fromkeys(n for dep, _ in group if self.removes_out_channels(dep)
                                  and (n := self.name(dep.target.module)) is not None))

    def out_group(self, module_or_name: Any, idxs: Iterable[int]) -> Any:
        """The torch-pruning Group that removes output channels ``idxs`` of a layer (and all it couples)."""
        module = self.module(module_or_name) if isinstance(module_or_name, str) else module_or_name
        pruner = self.dg.get_pruner_of_module(module)
        if pruner is None:
            raise PruneError(f"torch-pruning has no pruner for {self.name(module)} ({type(module).__name__})")
        return self.dg.get_pruning_group(module, pruner.prune_out_channels, list(idxs))

    def groups(self, *, ignored: Sequence[str] = (), root_types: tuple[type, ...] = PRUNABLE) -> list[GroupInfo]:
        """Every coupled group whose root is none of ``ignored`` (its members may still include them)."""
        skip = [self.module(n) for n in ignored]
        out = []
        for group in self.dg.get_all_groups(ignored_layers=skip, root_module_types=list(root_types)):
            root = self.name(group[0].dep.target.module)
            if root is None:
                continue
            consumers = [n for dep, _ in group if not self.removes_out_channels(dep)
                         and isinstance(dep.target.module, PRUNABLE) and (n := self.name(dep.target.module))]
            out.append(GroupInfo(root, self.channels(group[0].dep.target.module), tuple(self.out_members(group)),
                                 tuple(dict.fromkeys(consumers))))
        return out

    def split_feeders(self) -> dict[str, str]:
        """Conv/linear layers whose channels reach a split/chunk/unbind: fixed sizes there, so left alone."""
        import torch_pruning as tp

        split_types = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND)
        out: dict[str, str] = {}
        for node in list(self.dg.module2node.values()):
            if node.type not in split_types:
                continue
            seen, queue = set(), list(node.inputs)
            while queue:
                n = queue.pop(0)
                if id(n) in seen:
                    continue
                seen.add(id(n))
                name = self.name(n.module)
                if name and isinstance(n.module, PRUNABLE):
                    out.setdefault(name, f"feeds a fixed-size split ({node.name})")
                else:
                    queue.extend(n.inputs)
        return out

    def unmappable_roots(self, skip: set, per_root_s: Optional[float]) -> dict[str, str]:
        """Layers whose coupled group torch-pruning cannot map (it raises while building it)."""
        out: dict[str, str] = {}
        visited: set = set()
        for module in list(self.dg.module2node):
            name = self.name(module)
            if not name or name in skip or module in visited or not isinstance(module, PRUNABLE):
                continue
            pruner = self.dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                with time_budget(per_root_s, f"mapping the group of {name}"):
                    group = self.out_group(module, range(pruner.get_out_channels(module)))
            except StageTimeout:
                out[name] = f"torch-pruning does not finish mapping its group within {per_root_s:g} s"
                continue
            except Exception as exc:  # noqa: BLE001 - any torch-pruning failure makes it a boundary
                out[name] = f"torch-pruning cannot map its channels ({type(exc).__name__})"
                continue
            visited.update(dep.target.module for dep, _ in group if self.removes_out_channels(dep))
        return out

    def unwrapped(self) -> list[str]:
        """Parameters outside a known layer (torch-pruning prunes them along their last non-singleton dim)."""
        return [self.dg._param_to_name.get(p.parameters, "?") for p in self.dg.unwrapped_parameters]

    def cut_to(self, name: str, want: int) -> None:
        """Prune layer ``name`` in place to ``want`` output channels by dropping the trailing ones."""
        have = out_channels(self.module(name))
        if have > want:
            self.out_group(name, range(want, have)).prune()


def build_graph(model: nn.Module, x: torch.Tensor, *, timeout_s: Optional[float] = TRACE_TIMEOUT_S) -> Graph:
    """:class:`Graph` of ``model`` traced on ``x`` within ``timeout_s`` (None: no limit)."""
    return Graph.build(model, x, timeout_s=timeout_s)


# ----------------------------------------------------------------------------- the pruner


def pruner_class() -> type:
    """``BasePruner`` whose channel rounding also holds for grouped convs.

    torch-pruning 1.6.1 rounds the number of pruned channels *per channel group* against the
    layer's *total* width, then repeats it for every group, so a grouped conv loses far more than
    asked (e.g. 1 channel asked -> half the layer). Here the remaining width per group is rounded
    so that the total stays a multiple of ``round_to``. The group's channel-group count is taken
    from ``_is_atten_group``, which torch-pruning calls on each group just before rounding.
    """
    import torch_pruning as tp

    class _GroupAwarePruner(tp.pruner.BasePruner):
        _ch_groups = 1

        def _is_atten_group(self, group):  # noqa: ANN001 - torch-pruning's signature
            self._ch_groups = self._get_channel_groups(group)
            return super()._is_atten_group(group)

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            g = max(1, self._ch_groups)
            if g == 1:
                return super()._round_to(n_pruned, current_channels, round_to)
            per_group = current_channels // g
            step = round_to // math.gcd(round_to, g)
            remaining = per_group - n_pruned
            remaining -= remaining % step
            return max(per_group - remaining, 0)

        def channel_groups(self, group: Any) -> int:
            return int(self._get_channel_groups(group))

    return _GroupAwarePruner
