"""Build a model from a torchvision name or ``package.module:factory``, and load its weights.

Weights come from safetensors or a weights-only ``.pt``/``.pth`` state dict. A whole pickled
model (``torch.save(model)``) runs arbitrary code when loaded, so it is refused unless the
caller passes ``trust_pickle=True``.
"""
from __future__ import annotations

import importlib
import inspect
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import ModelConfig, REPO_ROOT
from .errors import ModelLoadError, UnknownNameError, UntrustedPickleError

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "assets" / "fmnist_cnn.safetensors"


def torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def resolve_factory(arch: str):
    if ":" in arch:
        from .trust import check_factory, check_trusted

        check_trusted(arch)  # before any import: a model folder or YAML may name os:system
        mod_name, _, attr = arch.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {mod_name!r} for arch {arch!r}: {exc}") from exc
        if not hasattr(mod, attr):
            public = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
            raise UnknownNameError(f"{mod_name} has no factory {attr!r}; callables there: {', '.join(public)}")
        return check_factory(getattr(mod, attr), arch)
    from torchvision import models as tvm

    names = torchvision_names()
    if arch not in names:
        import difflib

        close = difflib.get_close_matches(arch, names, n=3)
        raise UnknownNameError(
            f"unknown architecture {arch!r}: not a torchvision classification model and not 'module:factory'",
            hint=f"close torchvision names: {', '.join(close)}" if close else "see `edgeprune models`",
        )
    return lambda **kw: tvm.get_model(arch, weights=None, **kw)


def _adapt_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first conv when the input has a different channel count (random weights)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return model
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, 1, mod.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return model
    return model


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    factory = resolve_factory(cfg.arch)
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "num_classes" in params or accepts_kw:
        kwargs.setdefault("num_classes", cfg.num_classes)
    if "in_channels" in params:
        kwargs.setdefault("in_channels", in_channels)
    if ":" not in cfg.arch and cfg.arch.startswith(("inception", "googlenet")):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"cannot build {cfg.arch!r} with {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{cfg.arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return _adapt_in_channels(model, in_channels)


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A state dict from safetensors or weights-only torch files; a pickled module only if trusted."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}", hint="valid: .safetensors, .pt/.pth state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ModelLoadError(f"unsupported weights format {path.suffix!r} for {path}",
                             hint="valid: .safetensors, .pt, .pth, .bin, .ckpt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} holds pickled Python objects, not just tensors; loading it can run arbitrary code",
                hint="re-save it as a state dict or safetensors, or pass --trust-pickle if you trust its origin",
            ) from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def load_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The model in eval mode, with its weights when ``cfg.weights`` is set."""
    if cfg.weights is not None:
        sd = read_state_dict(cfg.weights, trust_pickle=cfg.trust_pickle)
        if isinstance(sd, nn.Module):
            return sd.eval()
    model = build_model(cfg, in_channels)
    if cfg.weights is not None:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            problem = (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        except RuntimeError as exc:  # shape mismatches
            missing, unexpected, problem = [None], [], str(exc).split("\n\t")[1:4]
        if missing or unexpected:
            raise ModelLoadError(f"weights {cfg.weights} do not fit {cfg.arch}: {problem}",
                                 hint="check model.arch, model.num_classes and model.kwargs")
    return model.eval()


def save_safetensors(model: nn.Module, path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    from .safety import atomic_path

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
