"""Build a model from a torchvision name, ``timm:<name>`` or ``package.module:factory``; load its weights.

``timm:<name>`` is a name in timm's registry (``timm.list_models()``), always built with
``pretrained=False`` (nothing is downloaded); timm is the optional extra ``edgeprune[timm]``.
A ``module:factory`` is imported from the installed packages, the current directory or the
folders given with ``--app-dir`` (like uvicorn's app discovery), after the trust check.
Weights come from safetensors, a weights-only ``.pt``/``.pth`` state dict or a timm training
checkpoint (``state_dict`` / ``state_dict_ema`` inside). A whole pickled
model (``torch.save(model)``) runs arbitrary code when loaded, so it is refused unless the
caller passes ``trust_pickle=True``.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import inspect
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .config import BUILD_TIMEOUT_S, ModelConfig, REPO_ROOT
from .errors import BackendUnavailableError, ModelLoadError, UnknownNameError, UntrustedPickleError

BUNDLED_ARCH = "edgeprune.zoo:fmnist_cnn"
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "assets" / "fmnist_cnn.safetensors"
TIMM_PREFIX = "timm:"
APP_DIR_ENV = "EDGEPRUNE_APP_DIR"
_app_dirs: list[str] = []


def add_app_dir(*dirs: str | Path | None) -> None:
    """Search ``dirs`` first for ``module:factory`` modules (``--app-dir``)."""
    for d in dirs:
        if d:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise ModelLoadError(f"--app-dir {d}: no such folder")
            _app_dirs.append(str(path))


def _search_path() -> None:
    """Put the app dirs (first) and the current directory (last) on ``sys.path``, once each."""
    extra = [*_app_dirs, *[d for d in os.environ.get(APP_DIR_ENV, "").split(os.pathsep) if d]]
    for d in reversed(extra):
        if d not in sys.path:
            sys.path.insert(0, d)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def require_timm():
    """Import timm, or fail naming the extra to install."""
    try:
        return importlib.import_module("timm")
    except ImportError as exc:
        raise BackendUnavailableError(f"timm models need the Python package 'timm', which is not installed ({exc})",
                                      hint="pip install 'edgeprune[timm]'  (or: pip install timm)") from exc


def _timm_factory(arch: str):
    """A factory for a timm registry name: validated against ``timm.list_models()``; never pretrained."""
    timm = require_timm()
    name = arch[len(TIMM_PREFIX):]
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise UnknownNameError(f"unknown timm model {name!r} (from {arch!r}); timm {timm.__version__} has "
                               f"{len(names)} models",
                               hint=f"close names: {', '.join('timm:' + c for c in close)}" if close
                               else "list them with: python -c 'import timm; print(timm.list_models())'")

    def create(num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
        kw.pop("pretrained", None)  # no downloads: weights come from model.weights only
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)

    return create


def torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def resolve_factory(arch: str):
    if arch.startswith(TIMM_PREFIX):
        return _timm_factory(arch)  # a registry name, not an import: trusted like torchvision names
    if ":" in arch:
        from .trust import check_factory, check_trusted

        check_trusted(arch)  # before any import: a model folder or YAML may name os:system
        mod_name, _, attr = arch.partition(":")
        _search_path()
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {mod_name!r} for arch {arch!r}: {exc}",
                                 hint="run from the folder that holds it, or pass --app-dir DIR") from exc
        if not hasattr(mod, attr):
            public = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
            raise UnknownNameError(f"{mod_name} has no factory {attr!r}; callables there: {', '.join(public)}")
        return check_factory(getattr(mod, attr), arch)
    from torchvision import models as tvm

    names = torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        raise UnknownNameError(
            f"unknown architecture {arch!r}: not a torchvision classification model and not 'module:factory'",
            hint=f"close torchvision names: {', '.join(close)}" if close else "see `edgeprune models`",
        )
    return functools.partial(tvm.get_model_builder(arch), weights=None)  # a listed builder, never downloading


def _adapt_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first conv when the input has a different channel count (random weights)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return model
            # torch's stubs type Conv2d's kernel_size/stride/padding/dilation as tuple[int, ...] (from _ConvNd)
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride,  # type: ignore[arg-type]
                            mod.padding, mod.dilation, 1, mod.bias is not None)  # type: ignore[arg-type]
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return model
    return model


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """``cfg.arch`` built with ``cfg.kwargs`` (checked against the builder's signature by
    :func:`edgeprune.trust.check_kwargs` first: they go to the builder and nowhere else)."""
    from .trust import check_kwargs

    factory = resolve_factory(cfg.arch)
    check_kwargs(factory, cfg.kwargs, cfg.arch)
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    params: Mapping[str, inspect.Parameter]
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
    model = call_builder(factory, kwargs, cfg.arch, cfg.build_timeout_s)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{cfg.arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return _adapt_in_channels(model, in_channels)


def call_builder(factory: Any, kwargs: dict[str, Any], arch: str, timeout_s: Optional[float] = BUILD_TIMEOUT_S) -> Any:
    """``factory(**kwargs)`` within ``timeout_s`` (``model.build_timeout_s``); whatever goes wrong in it (it raises,
    exits, hangs) is a ModelLoadError or StageTimeout naming ``arch``, never an exit or an edgeprune bug."""
    from .errors import EdgePruneError
    from .watchdog import time_budget

    try:
        with time_budget(timeout_s, f"building the model with {arch}",
                         hint="the model builder must return a torch.nn.Module without waiting on anything; fix it, "
                              "or raise model.build_timeout_s if it is just slow"):
            return factory(**kwargs)
    except EdgePruneError:
        raise
    except TypeError as exc:
        raise ModelLoadError(f"cannot build {arch!r} with {kwargs}: {exc}") from exc
    except SystemExit as exc:
        raise ModelLoadError(f"model builder {arch} called sys.exit({exc.code!r}) instead of returning a model",
                             hint="fix the factory: it must return a torch.nn.Module") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        first = (str(exc).strip().splitlines() or ["(no message)"])[0][:300]
        raise ModelLoadError(f"model builder {arch} raised {type(exc).__name__}: {first}",
                             hint="fix the factory or model.kwargs; it must return a torch.nn.Module") from exc


def check_finite(state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """ModelLoadError naming the tensors of ``state`` (read from ``source``) that hold NaN or inf."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(
            f"weights {source} hold NaN or inf values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; a model with them predicts nothing",
            hint="these weights are broken (a diverged training run or a damaged file): use a checkpoint from "
                 "before the divergence, or re-export them")


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A state dict from safetensors or weights-only torch files; a pickled module only if trusted.
    Non-finite (NaN / inf) weights are refused."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}", hint="valid: .safetensors, .pt/.pth state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from exc
        check_finite(state, path)
        return state
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ModelLoadError(f"unsupported weights format {path.suffix!r} for {path}",
                             hint="valid: .safetensors, .pt, .pth, .bin, .ckpt")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm checkpoints keep their args
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
    obj = _unwrap_checkpoint(obj)
    if isinstance(obj, nn.Module):
        check_finite(obj.state_dict(), path)
        return obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    check_finite(obj, path)
    return obj


def _unwrap_checkpoint(obj: Any) -> Any:
    """The state dict inside a training checkpoint (timm: ``state_dict``, else ``model``/``state_dict_ema``)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def _is_bundled(path: Optional[Path]) -> bool:
    if path is None:
        return False
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    return p.resolve() == BUNDLED_WEIGHTS


def weights_for(cfg: ModelConfig) -> Optional[Path]:
    """``cfg.weights``, except the bundled Fashion-MNIST weights for any other architecture (random init)."""
    if _is_bundled(cfg.weights) and cfg.arch != BUNDLED_ARCH:
        print(f"note: {cfg.arch} starts from random init (no --weights given; the bundled weights are for "
              f"{BUNDLED_ARCH} only)", file=sys.stderr)
        return None
    return cfg.weights


def load_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The model in eval mode, with its weights when ``cfg.weights`` is set."""
    cfg = cfg.model_copy(update={"weights": weights_for(cfg)})
    loaded = read_state_dict(cfg.weights, trust_pickle=cfg.trust_pickle) if cfg.weights is not None else None
    if isinstance(loaded, nn.Module):
        return loaded.eval()
    model = build_model(cfg, in_channels)
    if loaded is not None:
        sd = OrderedDict((k.removeprefix("module."), v) for k, v in loaded.items())
        setattr(sd, "_metadata", getattr(model.state_dict(), "_metadata", None))  # per-module versions (MNASNet)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            problem = (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        except RuntimeError as exc:  # shape mismatches
            missing, unexpected, problem = ["?"], [], "; ".join(str(exc).split("\n\t")[1:4])
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
