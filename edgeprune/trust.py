"""Which ``module:factory`` references may be imported and called, and with which keyword arguments.

A pruned-model folder, a bundle, a run folder or a pipeline YAML may come from someone else; the
``arch`` they name is imported and called to rebuild the model, so naming ``os:system`` (or a
library function that reads a pickle, such as ``torchvision.models._api:load_state_dict_from_url``)
there must not run anything. Only model *builders* are called:

- torchvision: the names its model listing returns (``torchvision.models.list_models()``), as a bare
  name (``resnet18``) or under any ``torchvision.models[.sub]`` module; the object found must be the very
  builder that ``torchvision.models.get_model_builder(name)`` returns;
- edgeprune's zoo: the factories in :data:`edgeprune.zoo.BUILDERS`;
- timm: names in its registry (``timm:<name>``, resolved in :mod:`edgeprune.models`);
- anything else only when the user trusts it, here and now:

  - ``edgeprune --trust-code MODULE[:FACTORY] ...`` or ``edgeprune run --trust-code ...``,
  - an ``--arch MODULE:FACTORY`` typed on the command line (the user named it),
  - ``EDGEPRUNE_TRUST_CODE=mod1,mod2:fn`` in the environment,
  - ``trust_code: [mod1, mod2:fn]`` in the user's own ``~/.config/edgeprune/config.yaml``
    (``$XDG_CONFIG_HOME`` respected).

  A ``MODULE`` entry trusts the factories *defined* in it and in its sub-modules (a function it only
  imports from elsewhere is refused); a ``MODULE:FACTORY`` entry trusts that one name. Even then the
  reference must resolve to an ``nn.Module`` subclass or a plain Python function (checked before the
  call); builtins such as ``os.system`` or other classes are refused.

The keyword arguments (``model.kwargs``, ``pruned.json``'s ``model_kwargs``) go to the builder only, and
are checked against its signature first (:func:`check_kwargs`): an argument it does not take is refused,
and so is any argument that would download or read weights (``weights``, ``checkpoint_path``, ...), since
weights come from ``model.weights`` alone, read without unpickling.
"""
from __future__ import annotations

import inspect
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ModelLoadError

ZOO_MODULE = "edgeprune.zoo"
TORCHVISION_MODELS = "torchvision.models"
ENV_VAR = "EDGEPRUNE_TRUST_CODE"
# Builder arguments that fetch or unpickle weights (torchvision: weights enums; timm.create_model's own loaders).
# Weights come from model.weights only, so these are refused whatever their value (None and false excepted).
LOADING_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                  "checkpoint_path", "cache_dir")
_session: set[str] = set()


class UntrustedCodeError(ModelLoadError):
    """A model reference names code that the user has not said they trust."""


def trust(*specs: str | None) -> None:
    """Trust ``module`` or ``module:factory`` for this process (from the command line)."""
    for spec in specs:
        if spec and spec.strip():
            _session.add(spec.strip())


def reset() -> None:
    """Forget what :func:`trust` added (tests)."""
    _session.clear()


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeprune" / "config.yaml"


def _user_list() -> list[str]:
    out = [s.strip() for s in os.environ.get(ENV_VAR, "").replace(";", ",").split(",") if s.strip()]
    path = user_config_path()
    if path.is_file():
        from .config import read_yaml

        listed = read_yaml(path).get("trust_code") or []
        if isinstance(listed, str):
            listed = [listed]
        out += [str(s) for s in listed]
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _covers(spec: str, arch: str) -> bool:
    if ":" in spec:
        return spec == arch
    return _within(arch.partition(":")[0], spec)


def _user_specs(extra: Iterable[str] = ()) -> list[str]:
    return [*_session, *extra, *_user_list()]


@lru_cache(maxsize=1)
def torchvision_builders() -> frozenset[str]:
    """Every model name torchvision lists (classification, segmentation, detection, ...)."""
    from torchvision import models as tvm

    return frozenset(tvm.list_models())


def _bundled_builder(arch: str) -> bool:
    """``torchvision.models[.sub]:<listed name>`` or ``edgeprune.zoo:<builder>`` (by name, before import)."""
    module, _, name = arch.partition(":")
    if module == ZOO_MODULE:
        from .zoo import BUILDERS

        return name in BUILDERS
    return _within(module, TORCHVISION_MODELS) and name in torchvision_builders()


def is_trusted(arch: str, extra: Iterable[str] = ()) -> bool:
    return _bundled_builder(arch) or any(_covers(s, arch) for s in _user_specs(extra))


def check_trusted(arch: str) -> None:
    """Raise UntrustedCodeError unless ``module:factory`` may be imported (before any import of it)."""
    if is_trusted(arch):
        return
    module, _, name = arch.partition(":")
    if module == ZOO_MODULE or _within(module, TORCHVISION_MODELS):
        _refuse_non_builder(module, name, arch)
    raise UntrustedCodeError(
        f"refusing to import and call {arch!r}: it is not a torchvision model or from edgeprune.zoo, "
        "and it is not trusted (a model folder, bundle, run folder or YAML may come from someone else)",
        hint=f"if you trust it, pass --trust-code {module} (or add it to trust_code: in "
             f"{user_config_path()} or to ${ENV_VAR})")


def _refuse_non_builder(module: str, name: str, arch: str) -> None:
    """An error for a name in the zoo or torchvision.models that is not a builder: unknown, or not a model
    builder (these library modules are safe to import to tell the two apart; nothing in them is called)."""
    import importlib

    from .errors import UnknownNameError
    from .zoo import BUILDERS

    valid = (f"the zoo's builders: {', '.join(BUILDERS)}" if module == ZOO_MODULE
             else "a name from torchvision.models.list_models() (`edgeprune models`)")
    try:
        exists = hasattr(importlib.import_module(module), name)
    except ImportError:
        exists = False
    if not exists:
        raise UnknownNameError(f"unknown model builder {arch!r}: {module} has no {name!r}", hint=f"valid: {valid}")
    raise UntrustedCodeError(f"refusing to import and call {arch!r}: it is not a model builder; only builders "
                             "are called (a model folder, bundle, run folder or YAML may come from someone else)",
                             hint=f"valid: {valid}")


def check_factory(obj: Any, arch: str) -> Any:
    """``obj`` if ``arch`` may call it; else ModelLoadError (nothing called).

    A bundled builder must be the very object torchvision or the zoo registers under its name; a user
    factory must be an nn.Module subclass or a plain Python function, defined inside the trusted module
    unless the user named this exact ``module:factory``."""
    from torch import nn

    module, _, name = arch.partition(":")
    if _bundled_builder(arch):
        if obj is _registered_builder(module, name):
            return obj
        raise UntrustedCodeError(f"{arch!r} is not the model builder registered as {name!r}; refusing to call it")
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ModelLoadError(f"{arch!r} is the class {obj.__qualname__}, not a torch.nn.Module subclass; "
                                 "refusing to call it")
    elif not inspect.isfunction(obj):
        raise ModelLoadError(f"{arch!r} is a {type(obj).__name__}, not a model class or factory function; "
                             "refusing to call it")
    specs = _user_specs()
    if arch not in specs and not any(_within(getattr(obj, "__module__", "") or "", s) for s in specs if ":" not in s):
        raise UntrustedCodeError(
            f"refusing to call {arch!r}: it is {obj.__module__}.{obj.__qualname__}, imported into {module!r} "
            "from a module you have not trusted",
            hint=f"trust the exact name with --trust-code {arch} if you mean it")
    return obj


def _registered_builder(module: str, name: str) -> Any:
    if module == ZOO_MODULE:
        from . import zoo

        return getattr(zoo, name)
    from torchvision import models as tvm

    return tvm.get_model_builder(name)


def check_kwargs(factory: Any, kwargs: Mapping[str, Any], arch: str) -> None:
    """ModelLoadError unless the builder takes every key of ``kwargs`` and none of them loads weights."""
    loading = sorted(k for k in kwargs if k in LOADING_KWARGS and kwargs[k] not in (None, False))
    if loading:
        raise ModelLoadError(f"model kwargs for {arch!r} set {', '.join(loading)}, which would download or read "
                             "weights; refusing (a model folder, bundle or YAML may come from someone else)",
                             hint="remove them; weights come from model.weights (.safetensors or a state-dict .pt)")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # a builtin-backed class: nothing to check against; it still only builds a module
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(named))
    if unknown:
        raise ModelLoadError(f"{arch!r} takes no argument {', '.join(map(repr, unknown))}",
                             hint=f"its arguments: {', '.join(named) or '(none)'}")
