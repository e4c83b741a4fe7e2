"""Layer-wise least-squares reconstruction of a pruned model from calibration images alone.

After torch-pruning removes channels, every layer downstream of the first shrunken input sees another
input than the one it was trained on. Going through the conv and linear layers in forward order, on the
already-refit prefix of the pruned model, each layer's weights are refit by ridge least squares so that
its output on the pruned model's own input matches the unpruned model's output at the channels it kept
(He et al. 2017, "Channel pruning for accelerating very deep neural networks"; ThiNet):

    W* = argmin_W  || Y_t[:, kept] - X_s W ||^2 + lam * mean(diag(X_s^T X_s)) * ||W||^2

``X_s`` holds one row per output position (the unfolded input patch of a conv; the input vector of a
linear layer), ``Y_t`` the unpruned layer's output there, before any BatchNorm. Because the target is the
unpruned layer's pre-BN output, the BatchNorm statistics that fit it are the unpruned model's: they are
restored at the kept channels first (:func:`restore_bn`), undoing any re-estimation.

Coupled layers (the convs on both sides of a residual add, depthwise convs, concatenations) need nothing
special: each layer is fit to its own unpruned output, at the channels the dependency graph kept for it.
Grouped and depthwise convs are solved per group. Layers whose weight is not used as it is in forward
(subclasses such as timm's ``StdConv2d`` or ``Conv2dSame``, non-zero padding modes, transposed convs) are
left as they are, with the reason in the layer rows.

Which original channels each layer kept comes from torch-pruning's own pruning history
(``PruneResult.history``), replayed on a copy of the unpruned model whose weights encode their
output-channel index (:func:`kept_channels`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import PruneError
from .patches import conv_rows

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class LayerFit:
    """One layer's refit: the relative output error ||Y - XW||^2 / ||Y||^2 before and after, or why not."""

    name: str
    rows: int = 0
    error_before: Optional[float] = None
    error_after: Optional[float] = None
    skipped: Optional[str] = None


@dataclass
class ReconstructResult:
    layers: list[LayerFit] = field(default_factory=list)

    @property
    def refit(self) -> list[LayerFit]:
        return [r for r in self.layers if r.skipped is None]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "refit": len(self.refit)}


# ----------------------------------------------------------------------------- which channels were kept


def _encodable(module: nn.Module) -> bool:
    return type(module) in (nn.Conv2d, nn.Linear) or (isinstance(module, _BN) and module.running_mean is not None)


@torch.no_grad()
def kept_channels(teacher: nn.Module, example: torch.Tensor, history: Sequence[Sequence[Any]],
                  *, timeout_s: Optional[float] = None) -> dict[str, torch.Tensor]:
    """Module name -> indices of the unpruned output channels it kept, for every conv, linear and BatchNorm.

    ``history`` is torch-pruning's pruning history of the pruned model; it is replayed on a copy of
    ``teacher`` whose conv/linear weights hold their output-channel index (and BN running means theirs),
    so that the values left after pruning are the kept indices. Exact for up to 2**24 channels."""
    from .graph import build_dependency_graph

    probe = copy.deepcopy(teacher).cpu().eval()
    for m in probe.modules():
        if _encodable(m):
            code = _code(m)  # BN: running_mean (C,); conv/linear: weight (out, ...), every entry of row o is o
            idx = torch.arange(code.shape[0], dtype=code.dtype)
            code.copy_(idx.view(-1, *[1] * (code.dim() - 1)).expand_as(code))
    dg = build_dependency_graph(probe, example.cpu(), timeout_s=timeout_s)
    dg.load_pruning_history([[name, out, list(idxs)] for name, out, idxs in history])
    return {name: _code(m).reshape(_code(m).shape[0], -1)[:, 0].round().long()
            for name, m in probe.named_modules() if _encodable(m)}


def _stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = bn.running_mean, bn.running_var
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
    return mean, var


def _code(m: nn.Module) -> torch.Tensor:
    """The tensor whose first dimension is the output channel and that holds the index code."""
    t = m.running_mean if isinstance(m, _BN) else m.weight
    assert isinstance(t, torch.Tensor)
    return t


@torch.no_grad()
def restore_bn(student: nn.Module, teacher: nn.Module, kept: dict[str, torch.Tensor]) -> int:
    """The unpruned model's BatchNorm running statistics at the kept channels; returns the layers restored."""
    teachers = dict(teacher.named_modules())
    n = 0
    for name, m in student.named_modules():
        t = teachers.get(name)
        if isinstance(m, _BN) and isinstance(t, _BN) and name in kept and _encodable(m):
            (mean, var), (t_mean, t_var) = _stats(m), _stats(t)
            idx = kept[name].to(mean.device)
            mean.copy_(t_mean[idx])
            var.copy_(t_var[idx])
            n += 1
    return n


# ----------------------------------------------------------------------------- activations of one layer


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """The input (``what="input"``) or output of ``module`` when ``model`` runs on ``x``."""
    got: list[torch.Tensor] = []

    def hook(_m, inputs, output=None):
        got.append(inputs[0] if what == "input" else output)
        raise _Stop

    handle = (module.register_forward_pre_hook(hook) if what == "input"
              else module.register_forward_hook(hook))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise PruneError(f"{type(module).__name__} did not run in forward; cannot reconstruct it")
    return got[0].detach()


def _rows_linear(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., I) input, (..., O) target -> (1, R, I), (1, R, O)."""
    return x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])


# ----------------------------------------------------------------------------- the fit


def _why_not(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Linear:
        return None
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__}: only plain Conv2d and Linear weights are refit"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding {module.padding!r}"
    return None


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch_size):
        yield images[i: i + batch_size]


@torch.no_grad()
def _fit_layer(name: str, s_mod: nn.Module, t_mod: nn.Module, student: nn.Module, teacher: nn.Module,
               images: torch.Tensor, kept: Optional[torch.Tensor], *, ridge: float, max_rows: int,
               batch_size: int, gen: torch.Generator) -> LayerFit:
    """Refit ``s_mod``'s weight (and bias) in place; the relative errors before and after."""
    bias = s_mod.bias is not None
    xtx: Optional[torch.Tensor] = None
    xty: Optional[torch.Tensor] = None
    yty = torch.zeros((), dtype=torch.float64)
    rows = 0
    for xb in _batches(images, batch_size):
        x = _capture(student, s_mod, xb, "input")
        y = _capture(teacher, t_mod, xb, "output")
        if kept is not None:
            y = y.index_select(1 if isinstance(s_mod, nn.Conv2d) else y.dim() - 1, kept)
        if isinstance(s_mod, nn.Conv2d):
            cols, conv_tgt = conv_rows(s_mod, x, y, max(1, max_rows * len(xb) // len(images)), gen)
            assert conv_tgt is not None
            tgt = conv_tgt
        else:
            cols, tgt = _rows_linear(x, y)
        if bias:
            cols = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=cols.dtype, device=cols.device)], dim=2)
        # per batch in float32, summed over batches in float64
        a, c = (cols.transpose(1, 2) @ cols).double().cpu(), (cols.transpose(1, 2) @ tgt).double().cpu()
        xtx, xty = (a, c) if xtx is None or xty is None else (xtx + a, xty + c)  # (G, D, D), (G, D, O/G)
        yty = yty + tgt.double().pow(2).sum().cpu()
        rows += cols.shape[1]
    assert xtx is not None and xty is not None  # images is not empty (checked by reconstruct)
    w_old = _current(s_mod).cpu()  # (G, D, O/G)
    d = xtx.shape[-1]
    scale = torch.diagonal(xtx, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # (G,)
    reg = ridge * scale.view(-1, 1, 1) * torch.eye(d, dtype=xtx.dtype)
    try:
        w_new = torch.linalg.solve(xtx + reg, xty)
    except RuntimeError as exc:  # singular even with the ridge term: leave the layer
        return LayerFit(name, rows, skipped=f"least squares failed: {exc}")

    def err(w: torch.Tensor) -> float:
        e = yty - 2 * (w * xty).sum() + (w * (xtx @ w)).sum()
        return float(e / yty.clamp_min(1e-30))

    before, after = err(w_old), err(w_new)
    if after >= before:
        return LayerFit(name, rows, before, before, skipped="the refit did not lower the error")
    _assign(s_mod, w_new)
    return LayerFit(name, rows, before, after)


def _current(m: nn.Module) -> torch.Tensor:
    """The layer's weight (and bias) in the fit's layout: (G, D[+1], O/G)."""
    if isinstance(m, nn.Conv2d):
        g, o = m.groups, m.out_channels
        w = m.weight.reshape(g, o // g, -1).transpose(1, 2)  # (G, C/G*kh*kw, O/G)
        if m.bias is not None:
            w = torch.cat([w, m.bias.view(g, 1, o // g)], dim=1)
        return w.double()
    assert isinstance(m, nn.Linear)
    w = m.weight.t().unsqueeze(0)  # (1, I, O)
    if m.bias is not None:
        w = torch.cat([w, m.bias.view(1, 1, -1)], dim=1)
    return w.double()


def _assign(m: nn.Module, w: torch.Tensor) -> None:
    """Write a (G, D[+1], O/G) solution back into the layer's weight (and bias)."""
    assert isinstance(m, (nn.Conv2d, nn.Linear))
    if m.bias is not None:
        m.bias.copy_(w[:, -1, :].reshape(-1).to(m.bias.dtype))
        w = w[:, :-1, :]
    if isinstance(m, nn.Conv2d):
        m.weight.copy_(w.transpose(1, 2).reshape(m.out_channels, *m.weight.shape[1:]).to(m.weight.dtype))
    else:
        m.weight.copy_(w[0].t().to(m.weight.dtype))


def reconstruct(student: nn.Module, teacher: nn.Module, images: torch.Tensor, kept: dict[str, torch.Tensor], *,
                ridge: float = 1e-3, max_rows: int = 65536, batch_size: int = 128, seed: int = 0,
                device: str = "cpu") -> ReconstructResult:
    """Refit ``student``'s conv/linear layers in place, in forward order, from the first one whose input
    shrank (the layers before it see what they saw unpruned). ``kept`` comes from :func:`kept_channels`;
    BatchNorm statistics are restored to the unpruned model's first (:func:`restore_bn`).
    ``max_rows``: output positions sampled per conv layer over all images (seeded)."""
    from .prune import forward_order

    if len(images) == 0:
        raise PruneError("reconstruction needs calibration images; none were given")
    student.eval().to(device)
    teacher.eval().to(device)
    images = images.to(device)
    restore_bn(student, teacher, kept)
    teachers = dict(teacher.named_modules())
    modules = dict(student.named_modules())
    gen = torch.Generator().manual_seed(seed)
    result = ReconstructResult()
    started = False
    for name in forward_order(student, images[:1]):
        s_mod, t_mod = modules[name], teachers.get(name)
        if t_mod is None:
            result.layers.append(LayerFit(name, skipped="not in the unpruned model"))
            continue
        started = started or _in_features(s_mod) < _in_features(t_mod)
        if not started:
            continue  # upstream of every pruned input: it sees exactly what the unpruned model sees
        why = _why_not(s_mod)
        if why is not None:
            result.layers.append(LayerFit(name, skipped=why))
            continue
        k = kept.get(name)
        if k is not None and len(k) == _out_features(t_mod):
            k = None
        result.layers.append(_fit_layer(name, s_mod, t_mod, student, teacher, images,
                                        None if k is None else k.to(device), ridge=ridge, max_rows=max_rows,
                                        batch_size=batch_size, gen=gen))
    return result


def _in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels
    return 0


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    return 0
