"""The INT8 recovery ladder for task artifacts (segmentation, detection), on :mod:`edgeprune.int8_ladder`.

When a task's INT8 artifact breaks its gate (primary-metric drop > ``tasks.max_metric_drop_pt``),
the rungs of :class:`edgeprune.int8_ladder.Int8Ladder` are climbed with :func:`~edgeprune.int8_ladder.climb`:

rung 0  the host defaults (what a single compile gives)
rung 1  the backend's ``int8_rungs(target)``, one at a time
rung 2  segmentation only: the k most sensitive ops in float (k = 1 .. ``max_float_layers`` of the
        target, default 3), ranked by the per-layer pass of :class:`~edgeprune.int8_ladder.Int8Ladder`
        (relative L2 error of the logits against the pruned PyTorch model on :data:`SENSITIVITY_IMAGES`
        calibration images, one op left in float per compile). The pass compiles once per measured op,
        so it measures the segmentation head only (:func:`head_layers`: the ops outside the backbone
        that a quantizer touches, at most :data:`MAX_SENSITIVITY_LAYERS`, those nearest the output).
        On the example's LR-ASPP the INT8 loss sits there, in the sum of the two classifier branches'
        logits (``/model/classifier/Add``), an op a convolution-only pass does not see.
        A detector's outputs are boxes after NMS (padded to a fixed size): their L2 error jumps
        whenever NMS keeps another set, which ranks nothing. Detection's rung 2 is therefore one
        attempt without a ranking: every quantized op of the detector's heads (:data:`DETECTION_HEADS`:
        SSD head; RPN head, RoI box head and predictor) in float, the backbone alone in INT8.

For a detector, each rung's exclusions are merged with the post-processing float scope in
:func:`edgeprune.tasks.deploy.compile_artifact`. Every attempt compiles into its own folder under
``artifacts/<target>/int8/attempts/``; the one that ships is moved to ``.../int8/pruned`` and the
``attempts`` folder is removed, also when an attempt raises. ``Attempt.agreement`` holds the pixel
agreement (segmentation) or the matched-box fraction (detection) with the pruned PyTorch model; the
record says which under ``agreement_measure``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..config import TargetConfig
from ..int8_ladder import Attempt, Int8Ladder, Rung, climb, ladder_record, logit_error
from .deploy import op_names
from .det_ops import QUANTIZED_PREFIXES

SENSITIVITY_IMAGES = 8
MAX_SENSITIVITY_LAYERS = 12
SENSITIVITY_TASKS = ("segmentation",)  # tasks whose first output varies smoothly with the weights (logits)
ATTEMPTS = "attempts"

# (rung, out_dir) -> the row of check_artifact (with "passed", "drop_pt", "parity", "path", "artifact")
CheckFn = Callable[[Rung, Path], dict]


def agreement(parity: dict) -> tuple[float, str]:
    """The attempt's agreement with the pruned PyTorch model, and what it measures."""
    if "pixel_agreement" in parity:
        return float(parity["pixel_agreement"]), "pixel agreement"
    boxes = max(int(parity.get("ref_boxes", 0)), int(parity.get("got_boxes", 0)))
    return (float(parity["matched"]) / boxes if boxes else 1.0,
            "matched boxes / max(reference boxes, compiled boxes)")


# op types whose inputs a quantizer quantizes (per the names op_names gives for that backend)
HEAD_OP_TYPES = {
    "openvino": ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul", "Add", "Multiply",
                 "Interpolate", "ReduceMean", "AvgPool"),
    "onnxruntime": ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Resize", "GlobalAveragePool",
                    "ReduceMean", "AveragePool"),
}
BACKBONE = "/model/backbone/"
# the quantized heads of every detector kind: det_ops.QUANTIZED_PREFIXES without the backbone
DETECTION_HEADS = tuple(dict.fromkeys(p for prefixes in QUANTIZED_PREFIXES.values() for p in prefixes if p != BACKBONE))
DETECTION_HEAD_RUNG = "detection heads in float (backbone INT8)"


def _quantized_ops(onnx_path: Path, backend: str, keep: Callable[[str], bool]) -> list[str]:
    """The ops a quantizer touches (:data:`HEAD_OP_TYPES`) whose names ``keep`` accepts, in graph order."""
    types = HEAD_OP_TYPES.get(backend, HEAD_OP_TYPES["onnxruntime"])
    return [n for n, t in op_names(onnx_path, backend) if t in types and keep(n)]


def head_layers(onnx_path: Path, backend: str, cap: int = MAX_SENSITIVITY_LAYERS) -> list[str]:
    """The quantized ops of the task head (exported under ``/model/``, outside ``/model/backbone/``) in
    graph order; when there are more than ``cap``, the last ``cap`` (nearest the output)."""
    names = _quantized_ops(onnx_path, backend, lambda n: n.startswith("/model/") and not n.startswith(BACKBONE))
    return names[-cap:] if cap > 0 else []


class _HeadLayers:
    """The backend, with ``quantizable_layers`` = :func:`head_layers` (what rung 2 measures)."""

    def __init__(self, backend: Any):
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def quantizable_layers(self, onnx_path: Path) -> list[str]:
        return head_layers(onnx_path, self._backend.name)


def task_rungs(backend: Any, target: TargetConfig, onnx_path: Path, task: str,
               error_of: Optional[Callable[[dict[str, Any]], float]]) -> tuple[Iterator[Rung], Int8Ladder]:
    """The lazy rungs for one target (rung 2 only where ``error_of`` is given and the task allows it)."""
    rung2 = error_of is not None and task in SENSITIVITY_TASKS
    t = target if rung2 else target.model_copy(update={"options": {**target.options, "max_float_layers": 0}})
    ladder = Int8Ladder(_HeadLayers(backend), t, onnx_path, error_of or (lambda options: float("nan")))
    if task == "detection":
        return _then_heads_in_float(ladder, backend, onnx_path), ladder
    return ladder.rungs(), ladder


def detection_head_layers(onnx_path: Path, backend: str) -> list[str]:
    """Every op a quantizer touches under the detector's heads (:data:`DETECTION_HEADS`), in graph order."""
    return _quantized_ops(onnx_path, backend, lambda n: n.startswith(DETECTION_HEADS))


def _then_heads_in_float(ladder: Int8Ladder, backend: Any, onnx_path: Path) -> Iterator[Rung]:
    """Rungs 0 and 1 of ``ladder``, then (where the backend climbs at all) the heads in float."""
    yield from ladder.rungs()
    if not ladder.supported(backend):
        return
    layers = detection_head_layers(onnx_path, backend.name)
    if layers:
        yield Rung(2, DETECTION_HEAD_RUNG, backend.exclude_options(layers), layers)


def error_probe(compile_fn: Callable[[dict[str, Any], Path], Callable[[np.ndarray], list[np.ndarray]]],
                images: np.ndarray, reference: np.ndarray, tmp: Path) -> Callable[[dict[str, Any]], float]:
    """``error_of(options)`` for the sensitivity pass: ``compile_fn(options, out_dir)`` returns a runner
    ((1, C, H, W) -> outputs); the error is :func:`logit_error` of the first output on ``images``
    (N, C, H, W) against ``reference`` (N, K, H, W). Each compile is removed after it is measured."""
    counter = iter(range(10_000))

    def error_of(options: dict[str, Any]) -> float:
        out = tmp / f"s{next(counter)}"
        try:
            run = compile_fn(options, out)
            got = np.concatenate([run(images[i: i + 1])[0] for i in range(len(images))])  # (N, K, H, W)
            return logit_error(got, reference)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return error_of


def climb_task(check: CheckFn, rungs: Iterator[Rung], home: Path, *, ladder: Optional[Int8Ladder] = None,
               not_climbed: Optional[str] = None) -> dict:
    """Compile and gate each rung into ``home.parent/attempts/rung<i>-<j>`` until one passes; move the
    shipped one to ``home`` (any old ``home`` removed first). Returns the shipped row, with
    ``int8_ladder`` = {shipped_rung, shipped, options, excluded, attempts, agreement_measure, ...}."""
    work = home.parent / ATTEMPTS
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    counter = iter(range(10_000))
    measure: list[str] = []

    def attempt(rung: Rung) -> Attempt:
        row = check(rung, work / f"rung{rung.index}-{next(counter)}")
        value, what = agreement(row["parity"])
        measure[:] = [what]
        return Attempt(rung, bool(row["passed"]), float(row["drop_pt"]), value, result=row)

    try:
        shipped, tried = climb(rungs, attempt)
        row = shipped.result
        _move(row, home)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record: dict[str, Any] = {**ladder_record(shipped, tried), "agreement_measure": measure[0]}
    if ladder is not None and ladder.sensitivity:
        record["sensitivity"] = [{"layer": n, "gain": round(g, 6)} for n, g in ladder.sensitivity]
    if not_climbed:
        record["not_climbed"] = not_climbed
    row["int8_ladder"] = record
    return row


def _move(row: dict, home: Path) -> None:
    """Move the row's artifact folder to ``home`` and rewrite the row's path."""
    row["path"] = str(row["artifact"].move_to(home).path)


def for_model(rung: Rung, backend: Any, onnx_path: Path) -> dict[str, Any]:
    """The rung's option overrides for another model of the same architecture (the unpruned one, timed
    against the shipped artifact): layers kept in float that this model does not have are dropped."""
    if not rung.excluded:
        return dict(rung.options)
    present = {n for n, _ in op_names(onnx_path, backend.name)}
    return {**rung.options, **backend.exclude_options([n for n in rung.excluded if n in present])}
