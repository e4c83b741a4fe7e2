"""Which ``module:factory`` references may be imported and called.

A pruned-model folder, a bundle, a run folder or a pipeline YAML may come from someone else; the
``arch`` they name is imported and called to rebuild the model, so naming ``os:system`` there
must not run anything. Allowed without asking: torchvision model names, ``torchvision.models`` and the zoo
bundled with edgeprune (``edgeprune.zoo``). Anything else must be trusted by the user, here and now:

- ``edgeprune --trust-code MODULE[:FACTORY] ...`` or ``edgeprune run --trust-code ...``,
- an ``--arch MODULE:FACTORY`` typed on the command line (the user named it),
- ``EDGEPRUNE_TRUST_CODE=mod1,mod2:fn`` in the environment,
- ``trust_code: [mod1, mod2:fn]`` in the user's own ``~/.config/edgeprune/config.yaml``
  (``$XDG_CONFIG_HOME`` respected).

A ``MODULE`` entry trusts every factory in it and in its sub-modules. Even a trusted reference
must resolve to an ``nn.Module`` subclass or a plain Python function (checked before the call);
builtins such as ``os.system`` or other classes are refused.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelLoadError

ALWAYS_TRUSTED = ("edgeprune.zoo", "torchvision.models")  # not all of torchvision: torchvision.io writes files
ENV_VAR = "EDGEPRUNE_TRUST_CODE"
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


def _covers(spec: str, arch: str) -> bool:
    module = arch.partition(":")[0]
    if ":" in spec:
        return spec == arch
    return module == spec or module.startswith(spec + ".")


def is_trusted(arch: str, extra: Iterable[str] = ()) -> bool:
    specs = (*ALWAYS_TRUSTED, *_session, *extra, *_user_list())
    return any(_covers(s, arch) for s in specs)


def check_trusted(arch: str) -> None:
    """Raise UntrustedCodeError unless ``module:factory`` may be imported (before any import)."""
    if not is_trusted(arch):
        module = arch.partition(":")[0]
        raise UntrustedCodeError(
            f"refusing to import and call {arch!r}: it is not a torchvision model or from edgeprune.zoo, "
            "and it is not trusted (a model folder, bundle, run folder or YAML may come from someone else)",
            hint=f"if you trust it, pass --trust-code {module} (or add it to trust_code: in "
                 f"{user_config_path()} or to ${ENV_VAR})")


def check_factory(obj: Any, arch: str) -> Any:
    """``obj`` if it is an nn.Module subclass or a plain Python function; else ModelLoadError (not called)."""
    from torch import nn

    if inspect.isclass(obj):
        if issubclass(obj, nn.Module):
            return obj
        raise ModelLoadError(f"{arch!r} is the class {obj.__qualname__}, not a torch.nn.Module subclass; "
                             "refusing to call it")
    if inspect.isfunction(obj):
        return obj
    raise ModelLoadError(f"{arch!r} is a {type(obj).__name__}, not a model class or factory function; "
                         "refusing to call it")
