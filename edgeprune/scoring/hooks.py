"""Where each conv's output is consumed, and streaming passes that capture it batch by batch.

Choice (docs/scoring.md leaves the mechanism open): one probe forward pass on two images
records every leaf module call in execution order with the identity of its input and output
tensors. For each ``Conv2d`` we follow the data flow: if the conv output is the input of a
``BatchNorm2d`` the map moves there, and if that output is the input of an activation module
(ReLU & co, in-place ones included) it moves there too. The map is captured by a forward hook
on the last module of that chain, at the same call index (a module called several times, such
as a shared ReLU, is hooked only on the call that belongs to this conv). Functional
nonlinearities (``torch.relu(x)``) are invisible to module hooks; there the map is taken after
BN (or at the conv output), which the docs record. This follows the real data flow, unlike
module-registration order, and needs no symbolic tracing, so it works for any eager model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh)


@dataclass(frozen=True)
class Tap:
    """Where the map of conv ``conv`` is read: the output of ``module`` at its ``call``-th call."""

    conv: str
    module: str
    call: int
    chain: tuple[str, ...]  # conv -> [bn] -> [activation], for the report


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if not list(mod.children()):
            yield name, mod


def find_taps(model: nn.Module, example: torch.Tensor) -> dict[str, Tap]:
    """conv name -> :class:`Tap`, for every ``nn.Conv2d`` that runs in the forward pass."""
    calls: list[tuple[str, nn.Module, int, int, int]] = []  # name, module, call index, id(in), id(out)
    keep: list[torch.Tensor] = []  # hold tensors so that ids stay unique during the probe
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(mod, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            k = counts.get(name, 0)
            counts[name] = k + 1
            keep.extend([inputs[0], output])
            calls.append((name, mod, k, id(inputs[0]), id(output)))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in _leaf_modules(model)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return _follow(calls)


def _follow(calls: list[tuple[str, nn.Module, int, int, int]]) -> dict[str, Tap]:
    taps: dict[str, Tap] = {}
    for i, (name, mod, k, _, out_id) in enumerate(calls):
        if not isinstance(mod, nn.Conv2d) or name in taps:
            continue
        last, last_k, chain = name, k, [name]
        for kinds in ((nn.BatchNorm2d,), ACTIVATIONS):
            nxt = next(((j, c) for j, c in enumerate(calls[i + 1:], i + 1) if c[3] == out_id), None)
            if nxt is None or not isinstance(nxt[1][1], kinds):
                continue
            i, (last, _, last_k, _, out_id) = nxt[0], nxt[1]
            chain.append(last)
        taps[name] = Tap(name, last, last_k, tuple(chain))
    return taps


class TapRecorder:
    """Context manager: forward hooks that put each tapped map in ``self.maps[conv]`` per forward."""

    def __init__(self, model: nn.Module, taps: dict[str, Tap], transform: Optional[Callable] = None):
        self.model, self.taps, self.transform = model, taps, transform
        self.maps: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "TapRecorder":
        by_module: dict[str, list[Tap]] = {}
        for tap in self.taps.values():
            by_module.setdefault(tap.module, []).append(tap)
        modules = dict(self.model.named_modules())
        for mname, taps in by_module.items():
            self._handles.append(modules[mname].register_forward_hook(self._hook(mname, taps)))
        return self

    def _hook(self, mname: str, taps: list[Tap]):
        def hook(mod, inputs, output):
            k = self._counts.get(mname, 0)
            self._counts[mname] = k + 1
            for tap in taps:
                if tap.call == k:
                    self.maps[tap.conv] = output.detach().clone()  # clone: later in-place ops
        return hook

    def reset(self) -> None:
        self.maps.clear()
        self._counts.clear()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def iterate_maps(model: nn.Module, taps: dict[str, Tap], images: torch.Tensor, *, batch_size: int,
                 device: str, desc: str = "", progress: bool = False):
    """Yield ``(start, maps, logits)`` per batch: ``maps`` is conv name -> (B, C, H, W)."""
    from ..progress import progress_bar as tqdm

    starts = range(0, len(images), batch_size)
    with TapRecorder(model, taps) as rec, torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            rec.reset()
            x = images[start: start + batch_size].to(device)
            logits = model(x)
            yield start, dict(rec.maps), logits
