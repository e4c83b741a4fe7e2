"""Per-channel conv scores -> a torch-pruning group importance.

A torch-pruning group couples channels that must go together: a conv's output channels with
the BN after it, the convs joined by a residual add, a depthwise conv and its producer, the
slices of a concatenation (through ``root_idxs``). For a group, every member whose pruning
function removes conv *output* channels and that has a score contributes ``score[idxs]``,
scattered onto the group's root indices; the group score is their mean. A group where no
member has a score (e.g. a conv that never ran on the calibration data, or a Linear) falls back
to torch-pruning's group L2 magnitude, normalized the same way.

Normalization (``mean`` | ``max`` | ``sum`` | ``none``) is applied to each layer's full score
vector before aggregation, so that layers with different score scales can be compared when the
pruner ranks globally; it does not change a ranking inside one layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError, PruneError

NORMALIZERS = ("mean", "max", "sum", "none")


def check_normalize(normalize: str) -> Optional[str]:
    """Our option -> torch-pruning's ``normalizer`` argument."""
    if normalize not in NORMALIZERS:
        raise ConfigError(f"unknown score normalization {normalize!r}; valid: {', '.join(NORMALIZERS)}")
    return None if normalize == "none" else normalize


def normalize_scores(s: torch.Tensor, normalize: str) -> torch.Tensor:
    """(C,) -> (C,) divided by its mean / max / sum (left alone when that is 0)."""
    check_normalize(normalize)
    if normalize == "none":
        return s
    denom = {"mean": s.mean, "max": s.max, "sum": s.sum}[normalize]()
    return s / denom if float(denom) > 0 else s


def _conv_out_fns():
    from torch_pruning.pruner import function

    return (function.prune_conv_out_channels, function.prune_depthwise_conv_out_channels)


def _layer_name(dep) -> Optional[str]:
    return getattr(dep.target, "_name", None)


def make_score_importance(scores: dict[str, torch.Tensor], *, normalize: str = "mean"):
    """An instance of a ``tp.importance.Importance`` subclass built from conv-name -> (C,) scores."""
    import torch_pruning as tp

    class ScoreImportance(tp.importance.Importance):
        """Group importance = mean of the member convs' (normalized) activation scores."""

        def __init__(self) -> None:
            self.normalize = normalize
            self.scores = {k: normalize_scores(v.detach().float().cpu(), normalize) for k, v in scores.items()}
            self.fallback = tp.importance.GroupMagnitudeImportance(p=2, normalizer=check_normalize(normalize))

        @torch.no_grad()
        def __call__(self, group) -> torch.Tensor:
            n = len(group[0].idxs)
            total, count = torch.zeros(n), torch.zeros(n)
            conv_out = _conv_out_fns()
            for i, (dep, idxs) in enumerate(group):
                s = self.scores.get(_layer_name(dep))
                root_idxs = group[i].root_idxs
                if s is None or dep.pruning_fn not in conv_out or any(r is None for r in root_idxs):
                    continue
                _check_length(_layer_name(dep), s, dep.layer)
                root = torch.as_tensor(root_idxs, dtype=torch.long)
                total.scatter_add_(0, root, s[torch.as_tensor(idxs, dtype=torch.long)])
                count.scatter_add_(0, root, torch.ones(len(idxs)))
            covered = count > 0
            if bool(covered.all()):
                return total / count
            # channels no scored conv covers: the group's normalized magnitude
            fallback = self.fallback(group).float().cpu()
            return torch.where(covered, total / count.clamp_min(1), fallback)

    return ScoreImportance()


def _check_length(name: str, s: torch.Tensor, layer) -> None:
    if len(s) != layer.out_channels:
        raise PruneError(
            f"scores for {name} cover {len(s)} channels but the layer now has {layer.out_channels}",
            hint="re-score between pruning steps (prune.rescore_between_steps) or prune in one step",
        )
