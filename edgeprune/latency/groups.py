"""Prunable channel groups of a model (torch-pruning's DependencyGraph) and how to cut them.

A group is named by its root module (the first conv/linear torch-pruning reaches for it); the
name stays valid while the model is pruned, so a group can be found again in a pruned copy.
Channel scores are kept per conv name and sliced as channels go, so they always match the layers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import PruneError
from ..graph import Graph, GroupInfo, min_keep, out_channels
from ..prune import resolve_ignored

__all__ = ["GroupInfo", "ROOT_TYPES", "build_graph", "current_channels", "cut", "group_channel_scores", "min_keep",
           "next_width", "prunable_groups", "pruning_group"]

ROOT_TYPES = (nn.Conv2d, nn.Linear)


def build_graph(model: nn.Module, example: torch.Tensor) -> Graph:
    """The model's :class:`~edgeprune.graph.Graph`, with no time budget (the search rebuilds it on copies)."""
    return Graph.build(model, example, timeout_s=None)


def _is_plain_grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) conv: cutting it needs whole channel groups, which this search does not do."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def prunable_groups(model: nn.Module, example: torch.Tensor, *, ignore: Sequence[str] = ()) -> list[GroupInfo]:
    """Every group torch-pruning can cut, the classifier head and ``ignore`` left alone."""
    ignored = list(resolve_ignored(model, example, ignore))
    graph = build_graph(model, example)
    out = [g for g in graph.groups(ignored=ignored, root_types=ROOT_TYPES)
           if not any(_is_plain_grouped(graph.module(n)) for n in g.members)]
    if not out:
        raise PruneError(f"{type(model).__name__} has no channel group torch-pruning can cut (head and ignore excluded)")
    return out


def current_channels(model: nn.Module, name: str) -> int:
    return out_channels(model.get_submodule(name))


def next_width(channels: int, round_to: int) -> int:
    """The next lower multiple of ``round_to`` (64 -> 56 with 8; 10 -> 8)."""
    return ((channels - 1) // round_to) * round_to


def pruning_group(dg: Graph, model: nn.Module, name: str, idxs: Sequence[int]) -> Any:
    """The Group removing output channels ``idxs`` of ``name`` (``dg`` is ``model``'s graph)."""
    return dg.out_group(name, idxs)


def group_channel_scores(group: Any, dg: Graph, model: nn.Module, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """(C_root,) mean over the group's scored members of their score, on the root's channel indices."""
    n = len(group[0].idxs)
    total, count = torch.zeros(n), torch.zeros(n)
    for i, (dep, idxs) in enumerate(group):
        s = scores.get(dg.name(dep.target.module) or "")
        root_idxs = group[i].root_idxs
        if s is None or not dg.removes_out_channels(dep) or any(r is None for r in root_idxs):
            continue
        root = torch.as_tensor(root_idxs, dtype=torch.long)
        total.scatter_add_(0, root, s[torch.as_tensor(idxs, dtype=torch.long)].float())
        count.scatter_add_(0, root, torch.ones(len(idxs)))
    if not bool((count > 0).all()):
        raise PruneError(f"group {dg.name(group[0].dep.target.module)} has channels no score covers")
    return total / count


def cut(model: nn.Module, example: torch.Tensor, name: str, k: int,
        scores: Optional[dict[str, torch.Tensor]] = None, *, dg: Optional[Graph] = None) -> tuple[float, list[int]]:
    """Remove the ``k`` lowest-score channels of group ``name`` in place; slice ``scores`` to match.

    Without scores the trailing channels go (for latency measurements, where which ones does not matter).
    ``dg``: the model's :class:`Graph`, reused (it stays valid across prunes); built when not given.
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
        _slice_scores(group, dg, scores)
    group.prune()
    return lost, idxs


def _slice_scores(group: Any, dg: Graph, scores: dict[str, torch.Tensor]) -> None:
    for dep, idxs in group:
        name = dg.name(dep.target.module)
        if name in scores and dg.removes_out_channels(dep):
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
