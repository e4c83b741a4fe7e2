"""One base error; each subclass says what was wrong and what is valid.

Every error raised for bad user input derives from :class:`EdgePruneError`. The CLI turns
it into a one-paragraph message and a non-zero exit code (``exit_code``), never a traceback:
2 for bad input, 1 for the environment (:class:`ResourceError`), 3 for a failed gate.
"""
from __future__ import annotations

from typing import Optional


class EdgePruneError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(EdgePruneError):
    """A YAML or option is malformed: names the field, the value and what is allowed."""


class UnknownNameError(ConfigError):
    """A name looked up in a registry (criterion, backend, target, model) does not exist."""


class ModelLoadError(EdgePruneError):
    """Weights or architecture cannot be loaded."""


class UntrustedPickleError(ModelLoadError):
    """A pickled object was offered without the explicit trust flag."""


class DataError(EdgePruneError):
    """A data set, image or calibration set is missing, corrupt or the wrong shape."""


class PruneError(EdgePruneError):
    """The model cannot be pruned as asked."""

    group_root: Optional[str] = None  # set when torch-pruning failed on one coupled group: its root layer


class ExportError(EdgePruneError):
    """ONNX export failed, the checker rejected it, or parity with PyTorch is off."""


class BackendUnavailableError(EdgePruneError):
    """An optional runtime is not installed or cannot use the requested device."""


class CompileError(EdgePruneError):
    """A backend failed to compile the ONNX for a target."""


class GateError(EdgePruneError):
    """A compiled artifact broke its target's accuracy or latency budget."""

    exit_code = 3


class ResourceError(EdgePruneError):
    """The machine cannot do what was asked right now: not enough memory for a setting, no space left on a
    disk, or the run folder held by another edgeprune process. An unfinished run is kept for ``--resume``."""

    exit_code = 1


class RemoteError(EdgePruneError):
    """A remote target (over OpenSSH) is unreachable or misbehaves."""
