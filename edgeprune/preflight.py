"""Checks run before the first stage, so that no bad input costs minutes of scoring, pruning and
fine-tuning before it is found. Each check is cheap: file existence, names against registries,
class folders (not images) against the model head, runtimes and devices, one ssh round trip per
remote target, and a write probe in the output folder.

:func:`config_fingerprint` / :func:`changed_keys` let ``--resume`` refuse a changed config.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .config import REPO_ROOT, DataConfig, DatasetKind, PipelineConfig, TargetConfig
from .errors import BackendUnavailableError, ConfigError, DataError, ModelLoadError

# keys that may change between a crash and --resume without changing what the run computes
RESUMABLE_KEYS = ("fail_on_gate", "device")


def preflight(cfg: PipelineConfig, targets: list[TargetConfig], *, run_dir: Optional[Path] = None,
              remote: bool = True) -> None:
    """Every check that does not need the model or the data loaded; raises the first problem."""
    check_files(cfg)
    check_names(cfg)
    check_classes(cfg.data, cfg.model.num_classes, splits(cfg))
    check_device(cfg.device)
    check_targets(targets)
    if remote:
        check_remotes(targets)
    if run_dir is not None:
        from .safety import check_writable

        check_writable(Path(run_dir).parent, "output folder")


def _existing(p: Path) -> Path:
    p = Path(p)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def check_files(cfg: PipelineConfig) -> None:
    """The model source is trusted; weights, data roots and the calibration folder exist (``--dry-run`` too)."""
    from .models import TIMM_PREFIX
    from .trust import check_trusted

    if ":" in cfg.model.arch and not cfg.model.arch.startswith(TIMM_PREFIX):
        check_trusted(cfg.model.arch)  # a name check only: nothing is imported here
    if cfg.model.weights is not None and not _existing(cfg.model.weights).is_file():
        raise ModelLoadError(f"model.weights: weights file not found: {cfg.model.weights}",
                             hint="give a .safetensors or state-dict .pt file, or null for random weights")
    d = cfg.data
    if d.kind == DatasetKind.fashion_mnist:
        from .data import DEBIAN_FASHION_MNIST, _find_idx

        root = _existing(d.root) if d.root else DEBIAN_FASHION_MNIST
        stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
        for split in splits(cfg):
            for stem in stems[split]:
                _find_idx(root, stem)
    else:
        from .data import split_folder

        for split in splits(cfg):
            split_folder(d, split)
    if not _existing(d.calibration).is_dir():
        raise DataError(f"data.calibration: calibration folder not found: {d.calibration}",
                        hint="an image folder (root/<class>/<images>), e.g. calibration/fashion-mnist-500")


def splits(cfg: PipelineConfig) -> tuple[str, ...]:
    """The data splits a run reads: the training split only when ``finetune.mode`` is ``full``."""
    return ("train", "eval") if cfg.finetune.mode == "full" else ("eval",)


def check_names(cfg: PipelineConfig) -> None:
    """Criterion, optimizer, schedule, augmentation and exporter names."""
    from .augment import get_augmentation
    from .export import EXPORTERS
    from .finetune import validate_config
    from .scoring import CRITERIA

    CRITERIA.get(cfg.score.criterion)
    validate_config(cfg.finetune)
    get_augmentation(cfg.finetune.augment)
    if cfg.export.exporter not in EXPORTERS:
        raise ConfigError(f"export.exporter {cfg.export.exporter!r} is not valid; valid: {', '.join(EXPORTERS)}")


def check_classes(data: DataConfig, num_classes: int, split_names: tuple[str, ...] = ("train", "eval")) -> None:
    """The class folders of every split read match the model head (count), before any image is read."""
    if data.kind == DatasetKind.fashion_mnist:
        from .data import FASHION_MNIST_CLASSES

        found = {"Fashion-MNIST": list(FASHION_MNIST_CLASSES)}
    else:
        from .data import class_folders, split_folder

        found = {f"{split} folder {split_folder(data, split)}": class_folders(split_folder(data, split))
                 for split in split_names}
    for where, classes in found.items():
        if len(classes) != num_classes:
            shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise DataError(f"the data has {len(classes)} classes ({where}: {shown}) but the model head has "
                            f"{num_classes} outputs (model.num_classes={num_classes})",
                            hint="make the class folders match the model, or set model.num_classes "
                                 "(a new head needs weights that fit it)")
    lists = list(found.values())
    if len(lists) == 2 and lists[0] != lists[1]:
        raise DataError(f"train and eval class folders differ: train has {sorted(set(lists[0]) - set(lists[1]))} "
                        f"that eval lacks, eval has {sorted(set(lists[1]) - set(lists[0]))} that train lacks")


def check_device(name: str) -> None:
    """``auto``, ``cpu``, or ``cuda[:N]`` with CUDA present."""
    import torch

    if name in ("auto", "cpu"):
        return
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {name!r} was asked for, but CUDA is not available on this machine",
                                          hint="use device=auto or device=cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    raise ConfigError(f"device {name!r} is not valid; valid: auto, cpu, cuda, cuda:N")


def check_targets(targets: list[TargetConfig]) -> None:
    """Every local target's runtime is installed and builds each of its precisions on its device here."""
    from .backends import get_backend

    problems = []
    for t in targets:
        if t.host is not None:  # compiled on the box; checked by check_remotes
            continue
        backend = get_backend(t.backend.value)
        for p in t.precisions:
            ok, why = backend.supports(p, t.device)
            if not ok:
                problems.append(f"{t.name} ({t.backend.value} {t.device}, {p.value}): {why}")
    if problems:
        raise BackendUnavailableError("target(s) cannot be compiled on this machine:\n  - " + "\n  - ".join(problems),
                                      hint="`edgeprune doctor` lists the runtimes, devices and precisions here")


def check_remotes(targets: list[TargetConfig]) -> None:
    """One ssh round trip per remote target (the worker's version probe), under a timeout."""
    from .remote import RemoteSession, probe

    for t in targets:
        if t.host is not None:
            probe(RemoteSession.from_config(t.host), timeout_s=t.host.connect_timeout_s + 20)


# ----------------------------------------------------------------------------- resume fingerprint


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_fingerprint(cfg: PipelineConfig, targets: list[TargetConfig]) -> dict[str, Any]:
    """``{"sha256", "keys"}``: the flattened config and targets a run was started with."""
    keys = _flatten({**cfg.model_dump(mode="json"), "targets": {t.name: t.model_dump(mode="json") for t in targets}})
    for k in RESUMABLE_KEYS:
        keys.pop(k, None)
    keys["target_list"] = [t.name for t in targets]
    text = json.dumps(keys, sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "keys": keys}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = old.get("keys", {}), new.get("keys", {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
