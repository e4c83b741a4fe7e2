"""The typed shape of ``report.json``: one pydantic model per top-level section.

Stages build their sections with these models (:meth:`Section.dump` gives the JSON-ready dict they put
in ``ctx.report``), :func:`edgeprune.report.write_report` validates the whole report with
:class:`Report` before rendering it, and :func:`edgeprune.report.load_report` validates what it reads.
The JSON contract is the one the report always had (``run.*``, ``model.*``, ``accuracy.*``,
``artifacts[]``, ...): every field is optional so that partial reports (a crashed stage, an older run)
still load, keys not listed here are kept as they are, and a present key must have its type.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import DataError


class Section(BaseModel):
    """A report section: typed known keys, unknown keys kept."""

    model_config = ConfigDict(extra="allow")

    def dump(self) -> dict[str, Any]:
        """The section as report.json holds it (keys that were not given are left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


class RunSection(Section):
    name: Optional[str] = None
    started: Optional[str] = None
    finished: Optional[str] = None
    seconds: Optional[float] = None
    stage_seconds: Optional[dict[str, float]] = None  # wall seconds per stage run in this process
    command: Optional[str] = None
    edgeprune: Optional[str] = None
    device: Optional[str] = None
    targets: Optional[list[str]] = None
    config: Optional[dict[str, Any]] = None
    targets_config: Optional[list[dict[str, Any]]] = None


class AccuracySection(Section):
    """Top-1 on the eval split (fractions) and the drop of the fine-tuned model in points."""

    baseline: Optional[float] = None
    pruned_before_finetune: Optional[float] = None
    pruned: Optional[float] = None
    drop_pt: Optional[float] = None


class ModelSection(Section):
    """Size of the pruned model against the unpruned one."""

    arch: Optional[str] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    macs_reduction: Optional[float] = None
    params_reduction: Optional[float] = None

    @classmethod
    def from_counts(cls, arch: str, *, macs: tuple[int, int], params: tuple[int, int]) -> "ModelSection":
        """Before/after counts and the reductions (before / after, how many times smaller)."""
        return cls(arch=arch, macs_before=macs[0], macs_after=macs[1], params_before=params[0],
                   params_after=params[1], macs_reduction=round(macs[0] / max(macs[1], 1), 4),
                   params_reduction=round(params[0] / max(params[1], 1), 4))


class DataSection(Section):
    eval: Optional[str] = None
    eval_images: Optional[int] = None
    train_images: Optional[int] = None
    val_images: Optional[int] = None
    classes: Optional[list[str]] = None


class ScoringSection(Section):
    criterion: Optional[str] = None
    seconds: Optional[float] = None
    labels_source: Optional[str] = None
    num_images: Optional[int] = None
    scores: Optional[dict[str, list[float]]] = None  # conv name -> one score per output channel


class ExportSection(Section):
    path: Optional[str] = None
    opset: Optional[int] = None
    exporter: Optional[str] = None
    size_bytes: Optional[int] = None
    parity: Optional[dict[str, Any]] = None


class ArtifactRow(Section):
    """One compiled target/precision (see :func:`edgeprune.stages.check.summarize`); a row for an
    artifact that failed to build has only ``target``, ``precision``, ``status`` and ``error``."""

    target: str
    precision: str
    status: str  # "ok" | "failed"
    backend: Optional[str] = None
    device: Optional[str] = None
    path: Optional[str] = None
    size_bytes: Optional[int] = None
    parity: Optional[dict[str, Any]] = None
    accuracy: Optional[float] = None
    accuracy_drop_pt: Optional[float] = None
    latency_ms: Optional[dict[str, float]] = None
    throughput: Optional[float] = None
    batch_size: Optional[int] = None
    budget: Optional[dict[str, Any]] = None
    error: Optional[str] = None


class Report(Section):
    """``report.json``: the sections in the order the pipeline writes them."""

    run: Optional[RunSection] = None
    accuracy: Optional[AccuracySection] = None
    data: Optional[DataSection] = None
    preprocessing: Optional[dict[str, Any]] = None
    environment: Optional[dict[str, Any]] = None
    scoring: Optional[ScoringSection] = None
    model: Optional[ModelSection] = None
    prune: Optional[dict[str, Any]] = None
    latency_search: Optional[dict[str, Any]] = None
    finetune: Optional[dict[str, Any]] = None
    export: Optional[ExportSection] = None
    calibration: Optional[dict[str, Any]] = None
    artifacts: list[ArtifactRow] = []
    warnings: list[str] = []


def validate_report(report: dict[str, Any], source: str = "report") -> Report:
    """``report`` as a :class:`Report`; DataError naming each key whose value has the wrong type."""
    try:
        return Report.model_validate(report)
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r:.60})"
                        for e in exc.errors())
        raise DataError(f"{source} does not have the report's shape: {bad}",
                        hint="report.json is written by `edgeprune run`; re-run the pipeline to rebuild it") from None
