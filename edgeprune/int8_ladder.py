"""INT8 recovery ladder: when an INT8 artifact breaks its target's accuracy gate, try again before giving up.

rung 0  the host-accurate defaults (the backend picks them from the CPU's ISA)
rung 1  other quantizer settings, one at a time (ORT: reduce_range, percentile calibration;
        OpenVINO: overflow fix on every layer, mixed preset)
rung 2  the k most sensitive layers kept in float (k = 1 .. max_float_layers), ranked by a
        per-layer sensitivity pass: quantize all but one layer and measure the logit error against
        the FP32 model on calibration images; the layer whose exclusion helps most is the most sensitive

The first rung whose artifact passes the gate ships. :func:`climb` is the pure control flow (tested
with fake attempts); :class:`Int8Ladder` supplies the rungs for a backend that has the hooks
``int8_rungs(target)``, ``exclude_options(layers)`` and ``quantizable_layers(onnx_path)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

DEFAULT_MAX_FLOAT_LAYERS = 3
SENSITIVITY_IMAGES = 256


@dataclass
class Rung:
    """One attempt's settings: option overrides on top of the target's options."""

    index: int
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rung": self.index, "name": self.name, "options": self.options, "excluded": self.excluded}


@dataclass
class Attempt:
    """A compiled rung and its gate verdict. ``result`` is whatever the caller needs afterwards."""

    rung: Rung
    passed: bool
    drop_pt: float
    agreement: float
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.rung.to_dict(), "passed": self.passed, "accuracy_drop_pt": round(self.drop_pt, 3),
                "top1_agreement": round(self.agreement, 5)}


def climb(rungs: Iterable[Rung], attempt: Callable[[Rung], Attempt]) -> tuple[Attempt, list[Attempt]]:
    """Try the rungs in order; stop at the first that passes. ``rungs`` is consumed lazily, so an
    expensive rung (the sensitivity pass) is only built when the ones before it failed.
    Returns (the attempt to ship, every attempt); when none passes, the one with the smallest drop ships."""
    tried: list[Attempt] = []
    for rung in rungs:
        a = attempt(rung)
        tried.append(a)
        if a.passed:
            return a, tried
    if not tried:
        raise ValueError("the ladder has no rungs")
    return min(tried, key=lambda a: (a.drop_pt, -a.agreement)), tried


def ladder_record(shipped: Attempt, tried: list[Attempt]) -> dict[str, Any]:
    """What every report records of a climb: the shipped rung, its settings and every attempt."""
    return {"shipped_rung": shipped.rung.index, "shipped": shipped.rung.name, "excluded": shipped.rung.excluded,
            "options": shipped.rung.options, "attempts": [a.to_dict() for a in tried]}


def rank_sensitivity(errors: dict[str, float], baseline_error: float) -> list[tuple[str, float]]:
    """``{layer: error with that layer left in float}`` -> [(layer, gain)] most sensitive first,
    gain = baseline_error - error (how much keeping the layer in float helps)."""
    gains = [(name, baseline_error - err) for name, err in errors.items()]
    return sorted(gains, key=lambda t: -t[1])


def logit_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 error of (N, K) logits against the FP32 reference."""
    return float(np.linalg.norm(logits - reference) / max(float(np.linalg.norm(reference)), 1e-12))


class Int8Ladder:
    """The rungs for one backend and target. ``error_of(options) -> float`` compiles with the given
    option overrides and returns :func:`logit_error` on the sensitivity images (used by rung 2 only)."""

    def __init__(self, backend: Any, target: Any, onnx_path: Any, error_of: Callable[[dict[str, Any]], float]):
        self.backend, self.target, self.onnx_path, self.error_of = backend, target, onnx_path, error_of
        self.sensitivity: Optional[list[tuple[str, float]]] = None

    @staticmethod
    def supported(backend: Any) -> bool:
        return all(hasattr(backend, h) for h in ("int8_rungs", "exclude_options", "quantizable_layers"))

    def max_float_layers(self) -> int:
        return int(self.target.options.get("max_float_layers", DEFAULT_MAX_FLOAT_LAYERS))

    def rungs(self) -> Iterator[Rung]:
        yield Rung(0, "host defaults")
        if not self.supported(self.backend):
            return
        for name, options in self.backend.int8_rungs(self.target):
            yield Rung(1, name, dict(options))
        k_max = self.max_float_layers()
        if k_max < 1:
            return
        ranked = self.rank()
        for k in range(1, min(k_max, len(ranked)) + 1):
            layers = [name for name, _ in ranked[:k]]
            yield Rung(2, f"{k} most sensitive layer(s) in float", self.backend.exclude_options(layers), layers)

    def rank(self) -> list[tuple[str, float]]:
        """The sensitivity pass: one compile per quantizable layer, that layer left in float."""
        layers = self.backend.quantizable_layers(self.onnx_path)
        base = self.error_of({})
        errors = {name: self.error_of(self.backend.exclude_options([name])) for name in layers}
        self.sensitivity = rank_sensitivity(errors, base)
        return self.sensitivity
