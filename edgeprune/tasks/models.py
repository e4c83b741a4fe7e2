"""torchvision segmentation / detection models as torch-pruning sees them (no weights downloaded).

A model is pruned through a *traced view*: a thin module whose forward returns tensors only
(``SegmentationOut``: the ``out`` map; ``SSDHeadOut``: box regression and class logits of the
SSD head; ``RPNOut``: the RPN head's objectness and box deltas), so that torch-pruning's
dependency graph follows every layer that shapes the prediction. The layers whose output channels
the task fixes (class and box predictors; for Faster R-CNN also the FPN, whose 256 channels feed
the RoI heads outside the traced view) are listed, each with the reason, by
:func:`fixed_layer_names` (what ``edgeprune inspect`` prints) and passed to the pruner as
``ignored_layers`` by :func:`fixed_layers`: one list for both.

Measured here (torch-pruning 1.6.1, torchvision 0.29.1, L1 magnitude, one step): lraspp and
deeplabv3 reach 2x MACs of the traced view with the class convs kept; ssdlite320 reaches ~1.9x at
ratio 0.3 with every head predictor kept; Faster R-CNN fails when traced whole (the graph does not
link the FPN outputs to the RPN head through the ImageList transform: "expected input[1, 179, 10,
10] to have 256 channels"), and with FPN + RPN head + RoI heads kept only the body would be
slimmed (1.46x MACs at most). Its RoI box head (two fully connected layers run once per proposal, ~2 GMACs of the 2.3 GMACs at
160 px with 150 proposals) is therefore pruned in a second dependency graph of its own
(:class:`BoxHeadOut`, an :class:`ExtraView`), at the same ratio, with L1 magnitude (SAE needs a
spatial map; these layers have none), and its MACs count once per proposal.
"""
from __future__ import annotations

import copy
from math import log as math_log
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, cast

import torch
from torch import nn

from ..errors import PruneError, UnknownNameError

SEGMENTATION = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
DETECTION = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")


def build(name: str, num_classes: int) -> nn.Module:
    """A torchvision task model with random weights (``weights=None, weights_backbone=None``), or
    ``package.module:factory`` called with ``num_classes`` (it must return one of the four kinds)."""
    from torchvision.models import detection, segmentation

    if ":" in name:
        return _from_factory(name, num_classes)

    if name in SEGMENTATION:
        return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes)
    if name in DETECTION:
        return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)
    raise UnknownNameError(f"unknown task model {name!r}; valid: {', '.join(SEGMENTATION + DETECTION)}")


def _from_factory(spec: str, num_classes: int) -> nn.Module:
    """``package.module:factory(num_classes=...)``, trusted as in :mod:`edgeprune.trust`; torchvision-style
    ``weights`` / ``weights_backbone`` are set to None (their default backbone weights would be downloaded)."""
    import inspect

    from ..models import call_builder, resolve_factory

    factory = resolve_factory(spec)  # refuses untrusted modules before importing them
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict = {k: None for k in ("weights", "weights_backbone") if k in params}
    model = call_builder(factory, {"num_classes": num_classes, **kwargs}, spec)  # time-boxed; its errors named
    if type(model).__name__ not in FIXED:
        raise PruneError(f"{spec} returned a {type(model).__name__}; task models must be one of {', '.join(FIXED)}")
    return model


class SegmentationOut(nn.Module):
    """(B, 3, H, W) -> (B, K, H, W) logits: the ``out`` entry of a torchvision segmentation model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


class SSDHeadOut(nn.Module):
    """(B, 3, H, W) -> ((B, A, 4) box regression, (B, A, K) class logits) of an SSD, before decoding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        head = self.model.get_submodule("head")(list(self.model.get_submodule("backbone")(x).values()))
        return head["bbox_regression"], head["cls_logits"]


class RPNOut(nn.Module):
    """(B, 3, H, W) -> the RPN head's objectness and box deltas per FPN level (Faster R-CNN)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        objectness, deltas = self.model.get_submodule("rpn.head")(list(self.model.get_submodule("backbone")(x).values()))
        return tuple(objectness) + tuple(deltas)


class BoxHeadOut(nn.Module):
    """(P, C, R, R) pooled RoI features -> (class logits, box deltas): Faster R-CNN's box head and predictor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.get_submodule("roi_heads.box_predictor")(self.model.get_submodule("roi_heads.box_head")(x))


@dataclass
class ExtraView:
    """A part of the model that runs outside the traced view on inputs of its own (a second graph)."""

    view: nn.Module
    example: torch.Tensor  # one item of its input
    per_image: int  # how many times it runs per image (its MACs count that often)
    ignored: list[nn.Module]  # its layers whose output channels the task fixes
    what: str
    prunes: str  # the module path whose layers it slims


def extra_views(model: nn.Module) -> list[ExtraView]:
    """Faster R-CNN: its RoI box head, run on up to ``post_nms_top_n`` proposals per image. Others: none."""
    if type(model).__name__ != "FasterRCNN":
        return []
    m: Any = model  # torchvision's FasterRCNN (untyped attributes)
    res = m.roi_heads.box_roi_pool.output_size
    rh, rw = (res, res) if isinstance(res, int) else res
    proposals = int(m.rpn._post_nms_top_n["testing"])
    example = torch.zeros(1, int(m.backbone.out_channels), int(rh), int(rw))
    return [ExtraView(BoxHeadOut(model), example, proposals, [model.get_submodule("roi_heads.box_predictor")],
                      f"RoI box head x {proposals} proposals", "roi_heads.box_head")]


def traced_view(model: nn.Module) -> nn.Module:
    """The tensor-only view of ``model`` that torch-pruning traces (shares the parameters)."""
    kind = type(model).__name__
    if kind in ("LRASPP", "DeepLabV3"):
        return SegmentationOut(model)
    if kind == "SSD":
        return SSDHeadOut(model)
    if kind == "FasterRCNN":
        return RPNOut(model)
    raise PruneError(f"no traced view for {kind}; supported: LRASPP, DeepLabV3, SSD, FasterRCNN")


def _out(module: nn.Module) -> int:
    return int(cast(nn.Conv2d, module).out_channels)


def _ssd_predictors(model: nn.Module) -> dict[str, str]:
    """Each SSD head's 1x1 predictor per feature map: anchors x classes (or x 4 box deltas) channels."""
    out = {}
    for kind, what in (("classification", "class"), ("regression", "box")):
        head = model.get_submodule(f"head.{kind}_head")
        cols = int(cast(int, head.num_columns))  # classes, or 4 box deltas
        for i, block in enumerate(cast(nn.ModuleList, head.module_list)):
            # each block: Sequential(depthwise conv block, 1x1 predictor conv)
            last = f".{len(block) - 1}" if isinstance(block, nn.Sequential) else ""
            path = f"head.{kind}_head.module_list.{i}{last}"
            n = _out(model.get_submodule(path))
            per = "classes" if what == "class" else "box deltas"
            out[path] = (f"{what} predictor of feature map {i}: out channels fixed by the task = {n // cols} anchors "
                         f"x {cols} {per}")
    return out


def _deeplab_predictors(model: nn.Module) -> dict[str, str]:
    out = {}
    for name in ("classifier", "aux_classifier"):
        head = cast(Optional[nn.Sequential], getattr(model, name))
        if head is not None:
            path = f"{name}.{len(head) - 1}"
            out[path] = (f"{'auxiliary ' if name == 'aux_classifier' else ''}class predictor: out channels fixed by "
                         f"the task = num_classes ({_out(model.get_submodule(path))})")
    return out


def _lraspp_predictors(model: nn.Module) -> dict[str, str]:
    return {f"classifier.{b}_classifier": f"class predictor ({b}-level branch): out channels fixed by the task = "
                                          f"num_classes ({_out(model.get_submodule(f'classifier.{b}_classifier'))})"
            for b in ("low", "high")}


def _fasterrcnn_kept(model: nn.Module) -> dict[str, str]:
    """The FPN is kept for the tracing, not the task: the graph does not reach the RoI heads (module docstring)."""
    rpn, box = model.get_submodule("rpn.head"), model.get_submodule("roi_heads.box_predictor")
    anchors = _out(rpn.get_submodule("cls_logits"))
    classes = int(cast(nn.Linear, box.get_submodule("cls_score")).out_features)
    fpn = int(cast(int, getattr(model.get_submodule("backbone"), "out_channels")))
    return {"backbone.fpn": f"FPN: its {fpn} output channels also feed the RoI "
                            "heads, which run outside the traced view",
            "rpn.head": f"RPN head: out channels fixed by the task's anchors = {anchors} anchors per location "
                        f"(objectness) and 4 x {anchors} box deltas",
            "roi_heads.box_predictor": f"RoI class and box predictors: out features fixed by the task = "
                                       f"num_classes ({classes}) and 4 x {classes} box deltas (the box head before "
                                       "them is pruned in a graph of its own)"}


# kind -> {module path: why it is kept whole}; the one list both the pruner and ``inspect`` read
FIXED: dict[str, Callable[[nn.Module], dict[str, str]]] = {
    "LRASPP": _lraspp_predictors,
    "DeepLabV3": _deeplab_predictors,
    "SSD": _ssd_predictors,
    "FasterRCNN": _fasterrcnn_kept,
}


def fixed_layer_names(model: nn.Module) -> dict[str, str]:
    """``{module path: why it is kept whole}``: the layers whose output channels the task fixes."""
    kind = type(model).__name__
    if kind not in FIXED:
        raise PruneError(f"no fixed-layer rule for {kind}; supported: {', '.join(FIXED)}")
    return FIXED[kind](model)


def fixed_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose output channels the task fixes (kept whole by the pruner)."""
    return [model.get_submodule(path) for path in fixed_layer_names(model)]


def count_macs(view: nn.Module, example: torch.Tensor) -> int:
    from ..prune import count_macs_params

    return count_macs_params(view, example)[0]


def model_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs of the traced view plus each extra view times its runs per image (Faster R-CNN: the box head
    once per proposal, at the RPN's post-NMS maximum), and the parameters of the traced view."""
    from ..prune import count_macs_params

    macs, params = count_macs_params(traced_view(model), example)
    return macs + sum(e.per_image * count_macs(e.view, e.example) for e in extra_views(model)), params


def model_macs(model: nn.Module, example: torch.Tensor) -> int:
    """The MACs of :func:`model_macs_params`: what :func:`prune_to_macs` targets."""
    return model_macs_params(model, example)[0]


def macs_of(model: nn.Module) -> str:
    """What :func:`model_macs` counts, in words (for the report)."""
    extra = "".join(f" + {e.what}" for e in extra_views(model))
    return f"the traced view {type(traced_view(model)).__name__}{extra}; detection post-processing not counted"


def prune_once(model: nn.Module, example: torch.Tensor, ratio: float, importance=None,
               round_to: Optional[int] = None) -> nn.Module:
    """A pruned copy of ``model``: one step at ``ratio`` with the fixed layers kept. ``importance``:
    a torch-pruning importance over the traced view's module names (default L1 magnitude)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    view = traced_view(m)
    imp = importance if importance is not None else tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(view, example, importance=imp, pruning_ratio=ratio, round_to=round_to,
                                  ignored_layers=fixed_layers(m))
    pruner.step()
    for extra in extra_views(m):  # a graph of its own, L1 magnitude (no spatial map to score)
        tp.pruner.MetaPruner(extra.view, extra.example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                             pruning_ratio=ratio, round_to=round_to, ignored_layers=extra.ignored).step()
    return m


@dataclass
class PrunedModel:
    model: nn.Module
    ratio: float
    macs_before: int
    macs_after: int

    @property
    def reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)


def _next_ratio(ratio: float, got: float, target: float, lo: float, hi: float) -> float:
    """Fit ``MACs ratio = (1 - r)^-p`` through the last trial and solve for the target; stay in (lo, hi)."""
    p = math_log(max(got, 1.0 + 1e-6)) / -math_log(1.0 - ratio)
    guess = 1.0 - target ** (-1.0 / p)
    return guess if lo < guess < hi else (lo + hi) / 2


def prune_to_macs(model: nn.Module, example: torch.Tensor, *, reduction: float = 2.0, tolerance: float = 0.1,
                  max_trials: int = 6, importance=None, round_to: Optional[int] = None) -> PrunedModel:
    """Search the pruning ratio until :func:`model_macs` drops by ``reduction`` +- ``tolerance``.

    The first guess assumes MACs scale with ``(1 - r)^2`` (both channel sides of most convs shrink);
    each later one refits the exponent to the last trial, kept inside the bracket found so far.
    """
    before = model_macs(model, example)
    lo, hi, best = 0.0, 0.95, None
    ratio = 1.0 - reduction ** -0.5
    for _ in range(max_trials):
        pruned = prune_once(model, example, ratio, importance, round_to)
        got = PrunedModel(pruned, ratio, before, model_macs(pruned, example))
        if best is None or abs(got.reduction - reduction) < abs(best.reduction - reduction):
            best = got
        if abs(got.reduction - reduction) <= tolerance:
            return got
        lo, hi = (ratio, hi) if got.reduction < reduction else (lo, ratio)
        ratio = _next_ratio(ratio, got.reduction, reduction, lo, hi)
    if best is None:
        raise PruneError(f"{type(model).__name__}: no pruning trial was run (max_trials {max_trials})",
                         hint="set max_trials to 1 or more")
    raise PruneError(f"{type(model).__name__}: no ratio gave {reduction}x MACs +- {tolerance} in {max_trials} trials; "
                     f"closest {best.reduction:.3f}x at ratio {best.ratio:.3f}",
                     hint="the fixed layers may hold most of the MACs; lower the target")
