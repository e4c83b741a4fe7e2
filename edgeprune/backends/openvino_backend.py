"""OpenVINO: IR via openvino.convert_model; FP16 by weight compression; INT8 by NNCF.

Target options: ``preset`` (performance | mixed), ``fast_bias_correction`` (default true),
``accuracy_control`` (true: nncf.quantize_with_accuracy_control, keeping top-1 agreement with the
FP32 model within ``accuracy_drop_budget_pt``), ``inference_precision`` (f32 | f16 | bf16:
overrides the precision the device computes non-quantized layers in), ``overflow_fix`` (enable |
first_layer_only | disable; default chosen from the host's ISA by :func:`int8_settings`),
``ignored_scope`` (OpenVINO op names kept in float), ``min_calibration``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Precision, TargetConfig
from ..errors import BackendUnavailableError, CompileError, UnknownNameError
from . import calibration as cal
from .base import Backend, CompiledArtifact, Runner, prepare_out_dir, require, run_in_batches

VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO")
OVERFLOW_FIX = ("enable", "first_layer_only", "disable")
QUANTIZABLE_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")


def int8_settings(isa: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """NNCF settings accurate on a CPU with ``isa``: ``overflow_fix`` (7-bit weights, NNCF's answer to
    the same int16 saturation of u8*s8 multiply-adds that ORT's reduce_range addresses) on every layer
    when the host is x86 without VNNI/AMX; NNCF's default (first layer only) elsewhere.
    An explicit ``overflow_fix`` option wins. Returns ``{"overflow_fix", "reason"}``."""
    if "overflow_fix" in options:
        fix = str(options["overflow_fix"])
        if fix not in OVERFLOW_FIX:
            raise UnknownNameError(f"unknown overflow_fix {fix!r}; valid: {', '.join(OVERFLOW_FIX)}")
        return {"overflow_fix": fix, "reason": "overflow_fix set in the target options"}
    if isa.get("arch") == "x86_64" and not isa.get("int8_dot"):
        return {"overflow_fix": "enable", "reason": "x86 without VNNI/AMX: int16 multiply-add saturation, "
                                                      "7-bit weights on every layer"}
    return {"overflow_fix": "first_layer_only", "reason": "NNCF default: no int16 saturation on this ISA"}


def compute_precision(precision: Precision, device: str, options: dict[str, Any]) -> Optional[str]:
    """The precision non-quantized layers run in: fp32 -> f32 (never the CPU's silent bf16 default),
    fp16 -> f16, int8 -> f32 on CPU and the device's native default (None) on GPU/NPU."""
    if "inference_precision" in options:
        return str(options["inference_precision"])
    if precision == Precision.int8:
        return "f32" if _physical(device) == "CPU" else None
    return {Precision.fp32: "f32", Precision.fp16: "f16"}[precision]


def _ov():
    return require("openvino", backend="openvino", package="openvino")


def _nncf():
    from ..progress import filter_third_party_noise, quiet_nncf_progress_off_terminal

    filter_third_party_noise()  # nncf imports torch.utils.cpp_extension, which warns about CUDA_HOME on a CPU box
    nncf = require("nncf", backend="openvino", package="nncf")
    quiet_nncf_progress_off_terminal()
    return nncf


def device_available(device: str, available: list[str]) -> bool:
    """``GPU`` matches ``GPU.0``; ``AUTO:GPU,CPU`` / ``HETERO:NPU,CPU`` need every listed device."""
    head, _, rest = device.partition(":")
    if head in VIRTUAL_DEVICES:
        return all(device_available(d, available) for d in rest.split(",") if d) if rest else True
    return any(a == device or a.split(".")[0] == device for a in available)


def check_device(core: Any, device: str) -> None:
    avail = list(core.available_devices)
    if not device_available(device, avail):
        raise BackendUnavailableError(
            f"OpenVINO device {device!r} is not available here; available: {', '.join(avail) or '(none)'}",
            hint="install the device's driver (intel-opencl-icd for GPU, intel-npu-driver for NPU) or pick another target",
        )


def _physical(device: str) -> str:
    return device.partition(":")[0].split(".")[0]


def _capabilities(core: Any, device: str) -> list[str]:
    if _physical(device) in VIRTUAL_DEVICES:
        return []
    try:
        return list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError:
        return []


class OpenVINOBackend(Backend):
    """OpenVINO IR for CPU, GPU or NPU: fp32, fp16 (compressed weights), int8 (NNCF post-training)."""

    name = "openvino"
    precisions = (Precision.fp32, Precision.fp16, Precision.int8)
    requires = "openvino"
    default_device = "CPU"

    def _probe(self) -> tuple[bool, str]:
        _ov()
        return True, ""

    def version(self) -> Optional[str]:
        ok, _ = self.available()
        return _ov().get_version() if ok else None

    def devices(self) -> list[str]:
        ok, _ = self.available()
        return list(_ov().Core().available_devices) if ok else []

    def _supports_device(self, precision: Precision, device: str) -> tuple[bool, str]:
        core = _ov().Core()
        try:
            check_device(core, device)
        except BackendUnavailableError as exc:
            return False, exc.message
        if precision == Precision.int8:
            try:
                _nncf()
            except BackendUnavailableError as exc:
                return False, exc.message
        caps = _capabilities(core, device)
        if precision == Precision.fp16 and caps and "FP16" not in caps:  # e.g. a CPU without AVX512-FP16 / AMX-FP16
            return False, (f"OpenVINO device {device!r} cannot compute in FP16 on this machine; its capabilities: "
                           f"{', '.join(caps)}")
        return True, ""

    # ------------------------------------------------------------------ compile
    def compile(self, onnx_path: Path, out_dir: Path, *, target: TargetConfig, precision: Precision,
                calibration: np.ndarray | None = None) -> CompiledArtifact:
        self._check_precision(precision)
        ov = _ov()
        if precision == Precision.int8:
            _nncf()  # fail before any work when NNCF is missing
        out = prepare_out_dir(out_dir)
        input_name, dims = cal.onnx_input(Path(onnx_path))
        x = cal.check_calibration(calibration, input_dims=dims, target=target, precision=precision)
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as exc:
            raise CompileError(f"openvino.convert_model failed on {onnx_path}: {exc}") from exc
        meta: dict[str, Any] = {"input": input_name, "input_dims": dims}
        if precision == Precision.int8:
            model, qmeta = self._quantize(model, x, dims, target)
            meta.update(qmeta, calibration=cal.calibration_summary(x))
        meta["shape"] = self._reshape(model, dims, target)
        xml = out / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=precision == Precision.fp16)
        meta["weights"] = "fp16 (compress_to_fp16)" if precision == Precision.fp16 else "fp32"
        meta["compute_precision"] = compute_precision(precision, target.device, target.options) or "device default"
        return self._artifact(target=target, precision=precision, path=xml, files=[xml, xml.with_suffix(".bin")],
                              meta=meta)

    def _reshape(self, model: Any, dims: list[Optional[int]], target: TargetConfig) -> list[int]:
        """A static batch unless the target asks for a dynamic one (NPU needs static shapes)."""
        if target.dynamic_batch or dims[0]:
            return [d or -1 for d in dims]
        shape = [d for d in (target.batch_size, *dims[1:]) if d is not None]
        if len(shape) != len(dims):
            raise CompileError(f"input dims {dims} have symbolic sizes other than the batch; export with a fixed H x W")
        model.reshape({model.input(0).get_any_name(): shape})
        return shape

    def _quantize(self, model: Any, x: np.ndarray, dims: list[Optional[int]],
                  target: TargetConfig) -> tuple[Any, dict[str, Any]]:
        nncf = _nncf()
        opts = target.options
        items = list(cal.batches(x, cal.static_batch(dims) or 1))  # each (b, C, H, W)
        presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
        preset = str(opts.get("preset", "performance"))
        if preset not in presets:
            raise UnknownNameError(f"unknown NNCF preset {preset!r}; valid: {', '.join(presets)}")
        devices = {"CPU": nncf.TargetDevice.CPU, "GPU": nncf.TargetDevice.GPU, "NPU": nncf.TargetDevice.NPU}
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        from ..envinfo import isa_features, isa_summary

        isa = isa_features()
        chosen = int8_settings(isa, opts)
        ignored = [str(n) for n in opts.get("ignored_scope") or []]
        kw = dict(preset=presets[preset], target_device=devices.get(_physical(target.device), nncf.TargetDevice.ANY),
                  subset_size=len(items), fast_bias_correction=bool(opts.get("fast_bias_correction", True)),
                  advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(chosen["overflow_fix"])))
        if ignored:
            kw["ignored_scope"] = nncf.IgnoredScope(names=ignored)
        meta = {"quantizer": "nncf.quantize", "nncf_version": nncf.__version__, "preset": preset,
                "target_device": _physical(target.device), "subset_size": len(items), "ignored_scope": ignored,
                "int8_settings": {**chosen, "isa": isa_summary(isa)}}
        try:
            if opts.get("accuracy_control"):
                return self._quantize_ac(model, items, target, kw), {**meta, "quantizer": "nncf.quantize_with_accuracy_control",
                                                                    "max_drop_pt": target.accuracy_drop_budget_pt}
            return nncf.quantize(model, nncf.Dataset(items), **kw), meta
        except Exception as exc:
            raise CompileError(f"NNCF quantization failed: {exc}") from exc

    def _quantize_ac(self, model: Any, items: list[np.ndarray], target: TargetConfig, kw: dict) -> Any:
        """Accuracy-controlled INT8: the metric is top-1 agreement with the FP32 model (needs no labels)."""
        ov, nncf = _ov(), _nncf()
        fp32 = ov.Core().compile_model(model, "CPU")
        ref = [np.asarray(fp32(item)[0]).argmax(1) for item in items]  # per item (b,)
        val_items = list(zip(items, ref))

        def agreement(compiled: Any, data) -> tuple[float, None]:
            hits = [float((np.asarray(compiled(xb)[0]).argmax(1) == yb).mean()) for xb, yb in data]
            return float(np.mean(hits)), None

        kw = dict(kw)
        kw["advanced_quantization_parameters"] = kw.pop("advanced_parameters")  # its name in this API
        return nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(val_items, lambda it: it[0]), nncf.Dataset(val_items), agreement,
            max_drop=target.accuracy_drop_budget_pt / 100.0, **kw)

    # ------------------------------------------------------------------ INT8 recovery ladder hooks
    def int8_rungs(self, target: TargetConfig) -> list[tuple[str, dict[str, Any]]]:
        """Rung 1 of the recovery ladder: (name, option overrides) to try after the defaults fail."""
        opts = target.options
        rungs: list[tuple[str, dict[str, Any]]] = []
        if opts.get("overflow_fix") != "enable":
            rungs.append(("overflow_fix on every layer", {"overflow_fix": "enable"}))
        if str(opts.get("preset", "performance")) != "mixed":
            rungs.append(("mixed preset (asymmetric activations)", {"preset": "mixed"}))
        return rungs

    def exclude_options(self, layers: list[str]) -> dict[str, Any]:
        return {"ignored_scope": list(layers)}

    def quantizable_layers(self, onnx_path: Path) -> list[str]:
        """OpenVINO op names (as NNCF's ignored scope names them) of the ops the sensitivity pass measures."""
        model = _ov().convert_model(str(onnx_path))
        return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in QUANTIZABLE_OPS]

    # ------------------------------------------------------------------ load
    def load(self, artifact: CompiledArtifact, *, target: TargetConfig) -> Runner:
        ov = _ov()
        core = ov.Core()
        check_device(core, target.device)
        config = self._config(core, target, Precision(artifact.precision))
        compiled = core.compile_model(str(artifact.path), target.device, config)
        request = compiled.create_infer_request()
        batch_dim = compiled.input(0).get_partial_shape()[0]
        fixed = batch_dim.get_length() if batch_dim.is_static else None

        def infer(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        def run(x: np.ndarray) -> np.ndarray:
            return run_in_batches(infer, x, fixed)

        run.compiled_model = compiled  # type: ignore[attr-defined]
        run.config = config  # type: ignore[attr-defined]
        return run

    def _config(self, core: Any, target: TargetConfig, precision: Precision) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        physical = _physical(target.device)
        if physical in VIRTUAL_DEVICES:
            return config
        supported = set(core.get_property(target.device, "SUPPORTED_PROPERTIES"))
        if target.threads and "INFERENCE_NUM_THREADS" in supported:
            config["INFERENCE_NUM_THREADS"] = target.threads
        want = compute_precision(precision, target.device, target.options)
        if want and "INFERENCE_PRECISION_HINT" in supported:
            if want == "f16" and "FP16" not in _capabilities(core, target.device):
                raise BackendUnavailableError(
                    f"OpenVINO device {target.device!r} cannot compute in FP16; its capabilities: "
                    f"{', '.join(_capabilities(core, target.device))}",
                    hint="use the fp32 or int8 artifact on this device, or set options.inference_precision: f32",
                )
            config["INFERENCE_PRECISION_HINT"] = want
        return config
