"""Prunable channel groups of a model (torch-pruning's DependencyGraph) and how to cut them.

A group is named by its root module (the first conv/linear torch-pruning reaches for it); the
name stays valid while the model is pruned, so a group can be found again in a pruned copy.
Channel scores are kept per conv name and sliced as channels go, so they always match the layers.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import PruneError
from ..prune import resolve_ignored

ROOT_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class GroupInfo:
    """A prunable group: root module name, its out channels, and every member whose out channels go with it."""

    name: str
    channels: int
    members: tuple[str, ...]


def build_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """torch-pruning traces autograd: grad is enabled and every parameter made to require it while it builds."""
    import torch_pruning as tp

    frozen = [p for p in model.parameters() if not p.requires_grad]
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        try:
            for p in frozen:
                p.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as exc:  # torch-pruning raises plain exceptions on untraceable graphs
            raise PruneError(f"torch-pruning cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)


def _is_plain_grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) conv: cutting it needs whole channel groups, which this search does not do."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def prunable_groups(model: nn.Module, example: torch.Tensor, *, ignore: Sequence[str] = ()) -> list[GroupInfo]:
    """Every group torch-pruning can cut, the classifier head and ``ignore`` left alone."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    ignored = [modules[n] for n in resolve_ignored(model, example, ignore)]
    dg = build_graph(model, example)
    out: list[GroupInfo] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        members = [d.target.module for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)]
        if root not in names or any(_is_plain_grouped(m) for m in members):
            continue
        out.append(GroupInfo(names[root], int(dg.get_out_channels(root)),
                             tuple(names[m] for m in members if m in names)))
    if not out:
        raise PruneError(f"{type(model).__name__} has no channel group torch-pruning can cut (head and ignore excluded)")
    return out


def current_channels(model: nn.Module, name: str) -> int:
    m = dict(model.named_modules())[name]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def min_keep(full: int, *, round_to: int, max_layer_ratio: float) -> int:
    """Fewest channels a group may keep: (1 - max_layer_ratio) of its width, rounded up to round_to."""
    keep = math.ceil(full * (1.0 - max_layer_ratio) - 1e-9)
    return max(round_to, math.ceil(keep / round_to) * round_to) if full >= round_to else full


def next_width(channels: int, round_to: int) -> int:
    """The next lower multiple of ``round_to`` (64 -> 56 with 8; 10 -> 8)."""
    return ((channels - 1) // round_to) * round_to


def pruning_group(dg: Any, model: nn.Module, name: str, idxs: Sequence[int]) -> Any:
    module = dict(model.named_modules())[name]
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, list(idxs))


def group_channel_scores(group: Any, dg: Any, model: nn.Module, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """(C_root,) mean over the group's scored members of their score, on the root's channel indices."""
    names = {m: n for n, m in model.named_modules()}
    n = len(group[0].idxs)
    total, count = torch.zeros(n), torch.zeros(n)
    for i, (dep, idxs) in enumerate(group):
        s = scores.get(names.get(dep.target.module, ""))
        root_idxs = group[i].root_idxs
        if s is None or not dg.is_out_channel_pruning_fn(dep.handler) or any(r is None for r in root_idxs):
            continue
        root = torch.as_tensor(root_idxs, dtype=torch.long)
        total.scatter_add_(0, root, s[torch.as_tensor(idxs, dtype=torch.long)].float())
        count.scatter_add_(0, root, torch.ones(len(idxs)))
    if not bool((count > 0).all()):
        raise PruneError(f"group {names.get(group[0].dep.target.module)} has channels no score covers")
    return total / count


def cut(model: nn.Module, example: torch.Tensor, name: str, k: int,
        scores: Optional[dict[str, torch.Tensor]] = None, *, dg: Any = None) -> tuple[float, list[int]]:
    """Remove the ``k`` lowest-score channels of group ``name`` in place; slice ``scores`` to match.

    Without scores the trailing channels go (for latency measurements, where which ones does not matter).
    ``dg``: the model's DependencyGraph, reused (it stays valid across prunes); built when not given.
    Returns (sum of the removed channels' scores, removed root indices).
    """
    dg = dg if dg is not None else build_graph(model, example)
    c = current_channels(model, name)
    full = pruning_group(dg, model, name, range(c))
    if scores is None:
        idxs, lost = list(range(c - k, c)), 0.0
    else:
        s = group_channel_scores(full, dg, model, scores)  # (c,)
        order = torch.argsort(s)[:k]
        idxs, lost = sorted(int(i) for i in order), float(s[order].sum())
    group = pruning_group(dg, model, name, idxs)
    if scores is not None:
        _slice_scores(group, dg, model, scores)
    group.prune()
    return lost, idxs


def _slice_scores(group: Any, dg: Any, model: nn.Module, scores: dict[str, torch.Tensor]) -> None:
    names = {m: n for n, m in model.named_modules()}
    for dep, idxs in group:
        name = names.get(dep.target.module)
        if name in scores and dg.is_out_channel_pruning_fn(dep.handler):
            keep = torch.ones(len(scores[name]), dtype=torch.bool)
            keep[torch.as_tensor(list(idxs), dtype=torch.long)] = False
            scores[name] = scores[name][keep]


def magnitude_scores(model: nn.Module, p: int = 2) -> dict[str, torch.Tensor]:
    """conv/linear name -> (C_out,) Lp norm of each output channel's weights."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ROOT_TYPES):
            w = m.weight.detach().float()
            out[name] = w.flatten(1).norm(p=p, dim=1)  # (C_out, rest) -> (C_out,)
    return out


def normalized_scores(model: nn.Module, scores: Optional[dict[str, torch.Tensor]], *, p: int = 2,
                      normalize: str = "rank") -> dict[str, torch.Tensor]:
    """Every conv/linear gets its scores normalized per layer (default the rank / (C - 1), so that the
    search compares layers on one scale); layers without scores fall back to Lp magnitude."""
    from ..scoring import normalize_scores

    out = {k: normalize_scores(v.detach().float().cpu(), normalize) for k, v in magnitude_scores(model, p).items()}
    for k, v in (scores or {}).items():
        if k in out and len(v) != len(out[k]):
            raise PruneError(f"scores for {k} cover {len(v)} channels but the layer has {len(out[k])}")
        if k in out:
            out[k] = normalize_scores(torch.as_tensor(v).detach().float().cpu(), normalize)
    return out
