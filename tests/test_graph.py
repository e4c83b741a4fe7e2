"""The torch-pruning adapter (edgeprune.graph): the private names it relies on exist, and its one rule for
how few channels a layer keeps."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from edgeprune.graph import TP_PRIVATE, Graph, min_keep


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("cls_name", sorted(TP_PRIVATE))
def test_private_torch_pruning_names_still_exist(cls_name):
    """An upgrade of torch-pruning that drops a private name the adapter uses fails here, by name."""
    cls = _resolve(cls_name)
    graph = Graph.build(_tiny(), torch.randn(1, 3, 8, 8), timeout_s=None)  # instance attributes are set by the build
    holders = [cls] + [obj for obj in (graph.dg, *graph.dg.module2node.values()) if isinstance(obj, cls)][:1]
    missing = [a for a in TP_PRIVATE[cls_name] if not any(hasattr(h, a) for h in holders)]
    assert not missing, (f"torch-pruning {importlib.import_module('torch_pruning').__version__} has no "
                         f"{', '.join(f'{cls_name}.{a}' for a in missing)}: edgeprune/graph.py relies on it")


def test_private_methods_keep_the_signatures_the_pruner_overrides():
    import inspect

    base = _resolve("torch_pruning.pruner.BasePruner")
    assert list(inspect.signature(base._round_to).parameters) == ["self", "n_pruned", "current_channels", "round_to"]
    assert list(inspect.signature(base._is_atten_group).parameters) == ["self", "group"]
    assert list(inspect.signature(base._get_channel_groups).parameters) == ["self", "group"]


def test_groups_named_by_root_with_members_and_consumers():
    graph = Graph.build(_tiny(), torch.randn(1, 3, 8, 8))
    groups = graph.groups()
    conv = next(g for g in groups if "0" in g.members)
    assert conv.name in conv.members and set(conv.members) == {"0", "2"}  # depthwise couples to its input
    assert conv.channels == 16 and conv.consumers == ("6",) and conv.prunable
    assert [g.members for g in graph.groups(ignored=[conv.name]) if "0" in g.members] == []
    assert graph.untraced() == [] and graph.unwrapped() == []
    graph.cut_to("0", 8)
    assert graph.module("0").out_channels == 8 and graph.module("2").out_channels == 8
    assert graph.module("6").in_features == 8


@pytest.mark.parametrize("full, round_to, ratio, current, want", [
    (64, 8, 0.8, None, 16),   # 12.8 -> 13 -> rounded up to 16
    (64, None, 0.8, None, 13),
    (10, 8, 0.5, None, 8),
    (6, 8, 0.5, None, 6),     # narrower than one rounding block: cannot be cut
    (12, 8, 0.1, None, 12),   # rounding overshoots the width: cannot be cut
    (64, 8, 0.8, 12, 12),     # already below the floor: keep what is there
    (1, None, 0.9, None, 1),
])
def test_min_keep(full, round_to, ratio, current, want):
    assert min_keep(full, round_to=round_to, max_layer_ratio=ratio, current=current) == want
