"""Bad inputs, as careless and malicious users send them (issue #17): one case per row.

Every case runs the real CLI entry point (``edgeprune.cli.main``) in-process and asserts the exit
code, that the message names the problem, that no traceback reaches stderr, and that nothing was
created or changed outside the folders the case allows. Security cases assert that the marker file
the payload would create does not exist.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune import guard, trust
from edgeprune.cli import main
from edgeprune.config import REPO_ROOT

WEIGHTS = REPO_ROOT / "edgeprune" / "assets" / "fmnist_cnn.safetensors"
CALIB = REPO_ROOT / "calibration" / "fashion-mnist-500"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each case runs in its own empty folder, with no user trust list and nothing trusted before."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".xdg"))
    monkeypatch.delenv(trust.ENV_VAR, raising=False)
    trust.reset()
    yield
    trust.reset()
    guard.reset()


@pytest.fixture(autouse=True)
def _crash_guard_not_reached(request, monkeypatch):
    """Issue 22: no case here may end in the crash guard's "unexpected ... (a bug ...)" line; only the tests of
    the guard itself (marked ``crash_guard``) reach it."""
    reached: list[BaseException] = []
    real = guard.crash_line

    def recording(exc: BaseException) -> str:
        reached.append(exc)
        return real(exc)

    monkeypatch.setattr(guard, "crash_line", recording)
    yield
    if request.node.get_closest_marker("crash_guard") is None:
        assert not reached, f"the crash guard was reached by {[f'{type(e).__name__}: {e}' for e in reached]}"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``edgeprune ARGS``."""
    old = sys.argv
    sys.argv = ["edgeprune", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and ".xdg" not in p.parts}


def assert_clean_failure(code: int, err: str, *, exit_code: int, names: tuple[str, ...]) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err and 'File "' not in err, err
    for n in names:
        assert n.lower() in err.lower(), f"{n!r} not in: {err}"


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def image_folder(root: Path, classes: list[str], per_class: int = 2, size: int = 28) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def tiny_onnx(path: Path, *, batch: int | None = None, shape=(1, 28, 28)) -> Path:
    from edgeprune.zoo import fmnist_cnn

    torch.manual_seed(0)
    model = fmnist_cnn(widths=(8, 8, 8), in_channels=shape[0]).eval()
    axes = None if batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(batch or 1, *shape), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, dynamo=False)
    return path


def pruned_folder(folder: Path, arch: str, kwargs: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "pruned.json").write_text(json.dumps({
        "format": 1, "arch": arch, "model_kwargs": kwargs, "num_classes": 10, "in_channels": 1,
        "input_shape": [1, 28, 28], "plan": {}}))
    (folder / "model.safetensors").write_bytes(WEIGHTS.read_bytes())
    return folder


@pytest.fixture
def artifact(tmp_path, capsys) -> Path:
    """An ONNX Runtime fp32 artifact of a small model, compiled by the CLI."""
    pytest.importorskip("onnxruntime")
    onnx = tiny_onnx(tmp_path / "m.onnx")
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--out", tmp_path / "art")
    assert code == 0, err
    return tmp_path / "art" / "fp32"


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_pruned_folder_naming_os_system_runs_nothing(tmp_path, capsys, command):
    mark = tmp_path / "PWNED"
    folder = pruned_folder(tmp_path / "evil", "os:system", {"command": f"touch {mark}"})
    args = (["export", folder, "--out", tmp_path / "m.onnx"] if command == "export"
            else ["finetune", "--pruned", folder, "--out", tmp_path / "ft", "--epochs", "0"])
    code, _, err = cli(capsys, *args)
    assert_clean_failure(code, err, exit_code=2, names=("refusing to import", "os:system", "--trust-code"))
    assert not mark.exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("arch, why", [("os:system", "not a model class or factory function"),
                                       ("subprocess:Popen", "not a torch.nn.Module subclass")])
def test_trusted_module_must_still_name_a_model_factory(tmp_path, capsys, arch, why):
    mark = tmp_path / "PWNED"
    folder = pruned_folder(tmp_path / "evil", arch, {"command": f"touch {mark}", "args": ["touch", str(mark)]})
    code, _, err = cli(capsys, "--trust-code", arch.partition(":")[0], "export", folder, "--out", tmp_path / "m.onnx")
    assert_clean_failure(code, err, exit_code=2, names=(why,))
    assert not mark.exists()


class _Payload:
    """Unpickling this touches ``mark``: the code a hostile pickle would run."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def pickle_payload(tmp_path: Path) -> tuple[Path, Path]:
    """(cache folder holding payload.pth, the marker file its unpickling would create)."""
    mark, cache = tmp_path / "PWNED", tmp_path / "cache"
    cache.mkdir()
    torch.save({"x": _Payload(mark)}, cache / "payload.pth")
    return cache, mark


LOADER = "torchvision.models._api:load_state_dict_from_url"  # a function in an allowed module that unpickles


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_pruned_folder_naming_a_library_loader_runs_nothing(tmp_path, capsys, command):
    """Issue 22 row 1: an allowed module is not trusted as a whole; only its model builders are called."""
    cache, mark = pickle_payload(tmp_path)
    kwargs = {"url": "http://example.invalid/payload.pth", "model_dir": str(cache), "weights_only": False}
    folder = pruned_folder(tmp_path / "evil", LOADER, kwargs)
    args = (["export", folder, "--out", tmp_path / "m.onnx"] if command == "export"
            else ["finetune", "--pruned", folder, "--out", tmp_path / "ft", "--epochs", "0"])
    code, _, err = cli(capsys, *args)
    assert_clean_failure(code, err, exit_code=2, names=("refusing to import", LOADER, "not a model builder",
                                                        "list_models"))
    assert not mark.exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_pipeline_yaml_naming_a_library_loader_runs_nothing(tmp_path, capsys, dry_run):
    cache, mark = pickle_payload(tmp_path)
    cfg = write_yaml(tmp_path / "evil.yaml", {"model": {"arch": LOADER, "weights": None, "kwargs": {
        "url": "http://example.invalid/payload.pth", "model_dir": str(cache), "weights_only": False}}})
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", "--config", cfg, "-t", "cpu-onnxruntime", "--no-progress",
                       *(["--dry-run"] if dry_run else []))
    assert_clean_failure(code, err, exit_code=2, names=("not a model builder", LOADER))
    assert not mark.exists()
    assert snapshot(tmp_path) == before


def test_trusting_a_module_does_not_trust_what_it_imports(tmp_path, capsys):
    """--trust-code torchvision trusts factories defined there; load_state_dict_from_url is torch.hub's."""
    cache, mark = pickle_payload(tmp_path)
    folder = pruned_folder(tmp_path / "evil", LOADER, {"url": "http://example.invalid/payload.pth",
                                                       "model_dir": str(cache), "weights_only": False})
    code, _, err = cli(capsys, "--trust-code", "torchvision", "export", folder, "--out", tmp_path / "m.onnx")
    assert_clean_failure(code, err, exit_code=2, names=("torch.hub.load_state_dict_from_url",
                                                        "not trusted", f"--trust-code {LOADER}"))
    assert not mark.exists()


@pytest.mark.parametrize("arch, names", [("edgeprune.zoo:_conv_bn", ("not a model builder", "fmnist_cnn")),
                                         ("torchvision.models:get_model", ("not a model builder", "list_models"))])
def test_only_builders_of_the_bundled_modules_are_called(tmp_path, capsys, arch, names):
    folder = pruned_folder(tmp_path / "p", arch, {})
    code, _, err = cli(capsys, "export", folder, "--out", tmp_path / "m.onnx")
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("arch, kwargs, names", [
    ("timm:resnet18", {"checkpoint_path": "PAYLOAD"}, ("checkpoint_path", "read weights", "model.weights")),
    ("resnet18", {"weights": "DEFAULT"}, ("weights", "download or read weights")),
    ("torchvision.models.segmentation:lraspp_mobilenet_v3_large", {"weights_backbone": "DEFAULT"},
     ("weights_backbone",)),
])
def test_model_kwargs_that_load_weights_are_refused(tmp_path, capsys, arch, kwargs, names):
    """Builder kwargs that would fetch or unpickle weights never reach the builder (timm's checkpoint_path
    reads a pickle; torchvision's weights download)."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    cache, mark = pickle_payload(tmp_path)
    kwargs = {k: str(cache / "payload.pth") if v == "PAYLOAD" else v for k, v in kwargs.items()}
    folder = pruned_folder(tmp_path / "p", arch, kwargs)
    code, _, err = cli(capsys, "export", folder, "--out", tmp_path / "m.onnx")
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert not mark.exists()


def test_model_kwargs_are_checked_against_the_builder_signature(tmp_path, capsys):
    (tmp_path / "strictnets.py").write_text("from edgeprune.zoo import FmnistCNN\n\n"
                                            "def net(num_classes=10, in_channels=1, width=8):\n"
                                            "    return FmnistCNN(num_classes, in_channels, widths=(width,) * 3)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        folder = pruned_folder(tmp_path / "p", "strictnets:net", {"url": "x", "model_dir": "y"})
        code, _, err = cli(capsys, "--trust-code", "strictnets", "export", folder, "--out", tmp_path / "m.onnx")
    finally:
        sys.path.remove(str(tmp_path))
    assert_clean_failure(code, err, exit_code=2, names=("takes no argument", "'model_dir'", "'url'",
                                                        "num_classes, in_channels, width"))


def test_pipeline_yaml_arch_os_system_runs_nothing(tmp_path, capsys):
    mark = tmp_path / "PWNED"
    cfg = write_yaml(tmp_path / "evil.yaml", {"model": {"arch": "os:system", "weights": None,
                                                         "kwargs": {"command": f"touch {mark}"}}})
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", "--config", cfg, "-t", "cpu-onnxruntime", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=("refusing to import", "os:system"))
    assert not mark.exists()
    assert snapshot(tmp_path) == before


def test_dry_run_refuses_an_untrusted_arch_in_a_yaml(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "evil.yaml", {"model": {"arch": "os:system", "weights": None}})
    code, _, err = cli(capsys, "run", "--config", cfg, "-t", "cpu-onnxruntime", "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=("refusing to import", "os:system", "--trust-code os"))


def test_trusted_factory_from_user_config_or_flag_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text("from edgeprune.zoo import FmnistCNN\n\n"
                                          "def net(num_classes=10, in_channels=1):\n"
                                          "    return FmnistCNN(num_classes, in_channels, widths=(8, 8, 8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = pruned_folder(tmp_path / "p", "mymodels:net", {})
    from edgeprune.models import save_safetensors
    from edgeprune.zoo import FmnistCNN

    save_safetensors(FmnistCNN(widths=(8, 8, 8)), folder / "model.safetensors")
    code, _, err = cli(capsys, "export", folder, "--out", tmp_path / "a.onnx", "--parity-images", "4")
    assert_clean_failure(code, err, exit_code=2, names=("not trusted", "--trust-code mymodels"))
    assert not (tmp_path / "a.onnx").exists()
    code, _, err = cli(capsys, "--trust-code", "mymodels", "export", folder, "--out", tmp_path / "a.onnx",
                       "--parity-images", "4")
    assert code == 0, err
    trust.reset()
    write_yaml(tmp_path / ".xdg" / "edgeprune" / "config.yaml", {"trust_code": ["mymodels"]})
    code, _, err = cli(capsys, "export", folder, "--out", tmp_path / "b.onnx", "--parity-images", "4")
    assert code == 0, err
    assert (tmp_path / "a.onnx").is_file() and (tmp_path / "b.onnx").is_file()


def test_run_name_is_one_path_component(tmp_path, capsys):
    (tmp_path / "work").mkdir()
    os.chdir(tmp_path / "work")
    code, _, err = cli(capsys, "run", "--name", "../../x", "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=("'../../x'", "single folder name"))
    assert not any(tmp_path.rglob("x*"))


def test_decompression_bomb_image_is_a_bad_image(tmp_path, capsys, monkeypatch):
    from PIL import Image

    calib = image_folder(tmp_path / "calib", ["a", "b"], per_class=1, size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2x the limit: a "bomb"
    cfg = write_yaml(tmp_path / "c.yaml", {"data": {"calibration": str(calib), "min_calibration": 1}})
    code, _, err = cli(capsys, "score", "--config", cfg, "--criterion", "sae", "--out", tmp_path / "s",
                       "--num-images", "8")
    assert_clean_failure(code, err, exit_code=2, names=("corrupt or unreadable image", "decompression bomb"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x the limit: PIL only warns
    code, _, err = cli(capsys, "score", "--config", cfg, "--criterion", "sae", "--out", tmp_path / "s",
                       "--num-images", "8")
    assert_clean_failure(code, err, exit_code=2, names=("corrupt or unreadable image", "decompression bomb"))


# ----------------------------------------------------------------------------- data vs model


def _image_cfg(tmp_path: Path, classes: list[str], *, empty: str | None = None) -> Path:
    for split in ("train", "val"):
        image_folder(tmp_path / "data" / split, classes)
        if empty:
            (tmp_path / "data" / split / empty).mkdir()
    return write_yaml(tmp_path / "c.yaml", {"data": {"kind": "image-folder", "root": str(tmp_path / "data"),
                                                      "calibration": str(CALIB)}})


def test_more_class_folders_than_the_head_is_refused_before_work(tmp_path, capsys):
    cfg = _image_cfg(tmp_path, [f"c{i:02d}" for i in range(12)])
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", "--config", cfg, "-t", "cpu-onnxruntime", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=("12 classes", "c00, c01", "10 outputs", "num_classes=10"))
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("empty", ["aaa-empty", "zzz-empty"])
def test_empty_class_folder_is_refused_wherever_it_sorts(tmp_path, capsys, empty):
    cfg = _image_cfg(tmp_path, [f"c{i}" for i in range(9)], empty=empty)
    code, _, err = cli(capsys, "run", "--config", cfg, "-t", "cpu-onnxruntime", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=("without images", empty))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, names", [
    ("model.weights=missing.safetensors", ("model.weights", "missing.safetensors")),
    ("data.root=/nonexistent/fmnist", ("/nonexistent/fmnist", "not found")),
    ("data.calibration=/nonexistent/calib", ("data.calibration", "/nonexistent/calib")),
])
def test_dry_run_checks_that_files_exist(capsys, override, names):
    code, out, err = cli(capsys, "run", "--dry-run", "-t", "cpu-onnxruntime", "--set", override)
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert "stages:" not in out


# ----------------------------------------------------------------------------- late failures


@pytest.mark.parametrize("override, names", [
    ("score.criterion=nope", ("unknown criterion 'nope'", "sae-mi")),
    ("finetune.optimizer=nope", ("finetune.optimizer", "sgd")),
    ("export.exporter=nope", ("export.exporter", "torchscript")),
    ("finetune.augment=nope", ("finetune.augment", "crop-flip")),
])
def test_unknown_names_are_found_before_the_first_stage(tmp_path, capsys, override, names):
    code, _, err = cli(capsys, "run", "-t", "cpu-onnxruntime", "--set", override, "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert not (tmp_path / "runs").exists()


def test_target_runtime_or_device_missing_is_found_before_the_first_stage(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    tgt = write_yaml(tmp_path / "npu.yaml", {"backend": "onnxruntime", "device": "QNN", "precisions": ["fp32"]})
    code, _, err = cli(capsys, "run", "-t", tgt, "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=("npu", "QNN", "cannot be compiled on this machine"))
    assert not (tmp_path / "runs").exists()


def test_unreachable_remote_host_is_found_before_the_first_stage(tmp_path, capsys):
    tgt = write_yaml(tmp_path / "box.yaml", {"backend": "onnxruntime", "host": {
        "host": "nobody@127.0.0.1", "ssh_options": ["-p", "1"], "connect_timeout_s": 3}})
    code, _, err = cli(capsys, "run", "-t", tgt, "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=("127.0.0.1",))
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_leaves_no_partial(tmp_path, capsys):
    code, _, err = cli(capsys, "run", "-t", "cpu-onnxruntime", "--set", "device=cuda", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=("'cuda'", "CUDA is not available"))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("where", ["proc", "file"])
def test_unwritable_run_output_is_found_up_front(tmp_path, capsys, where):
    out_dir = "/proc/edgeprune-out" if where == "proc" else str(tmp_path / "afile" / "runs")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", "-t", "cpu-onnxruntime", "--set", f"output_dir={out_dir}", "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=("output folder",))
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_folder_without_write_permission_is_found_up_front(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, _, err = cli(capsys, "run", "-t", "cpu-onnxruntime", "--set", f"output_dir={ro}", "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=("not writable",))


def test_unwritable_bench_json_is_found_before_timing(artifact, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = cli(capsys, "bench", artifact, "--json", tmp_path / "afile" / "r.json", "--min-runs", "1")
    assert_clean_failure(code, err, exit_code=2, names=("--json", "afile"))
    assert "p50" not in out


def test_failing_compile_leaves_no_precision_folder(tmp_path, capsys):
    onnx = tiny_onnx(tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.zeros((2, 1, 28, 28), np.float32))  # too few images for INT8
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "int8",
                       "--calibration", tmp_path / "calib.npy", "--out", tmp_path / "out")
    assert_clean_failure(code, err, exit_code=2, names=("calibration",))
    assert not (tmp_path / "out").exists()


def test_compile_into_a_non_empty_folder_refuses_unless_force(artifact, tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    before = snapshot(artifact)
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--out", artifact.parent)
    assert_clean_failure(code, err, exit_code=2, names=(str(artifact), "not empty", "--force"))
    assert snapshot(artifact) == before
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--out", artifact.parent,
                       "--force")
    assert code == 0, err


def test_artifact_json_paths_are_relative_to_the_artifact(artifact, tmp_path, capsys):
    from edgeprune.backends.base import CompiledArtifact

    meta = json.loads((artifact / "artifact.json").read_text())
    assert meta["path"] == "model.onnx" and meta["files"] == ["model.onnx"]
    moved = tmp_path / "elsewhere" / "fp32"
    moved.parent.mkdir()
    artifact.rename(moved)
    os.chdir(tmp_path / "elsewhere")
    code, out, err = cli(capsys, "bench", moved, "--min-runs", "2", "--min-time-s", "0", "--warmup-runs", "0",
                         "--warmup-s", "0", "--max-time-s", "1", "--no-progress")
    assert code == 0, err
    assert "p50" in out
    meta["path"] = str(moved / "model.onnx")  # an old file with absolute paths still loads
    meta["files"] = [meta["path"]]
    (moved / "artifact.json").write_text(json.dumps(meta))
    assert CompiledArtifact.load(moved).path == moved / "model.onnx"


# ----------------------------------------------------------------------------- damaged or mismatched artifacts


@pytest.mark.parametrize("damage, names", [("empty", ("is empty (0 bytes)",)),
                                           ("truncated", ("not a valid ONNX model",))])
def test_damaged_onnx_to_compile(tmp_path, capsys, damage, names):
    onnx = tiny_onnx(tmp_path / "m.onnx")
    data = onnx.read_bytes()
    onnx.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--out", tmp_path / "out")
    assert_clean_failure(code, err, exit_code=2, names=(str(onnx), *names))
    assert not (tmp_path / "out").exists()


def test_onnx_input_shape_must_match_the_preprocessing(tmp_path, capsys):
    onnx = tiny_onnx(tmp_path / "m.onnx", shape=(3, 32, 32))
    cfg = write_yaml(tmp_path / "c.yaml", {})  # default preprocessing: 1x28x28
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--config", cfg,
                       "--out", tmp_path / "out")
    assert_clean_failure(code, err, exit_code=2, names=("Nx3x32x32", "1x28x28", "data.preprocessing"))
    assert not (tmp_path / "out").exists()


def test_static_batch_onnx_must_match_the_target_batch(tmp_path, capsys):
    onnx = tiny_onnx(tmp_path / "m.onnx", batch=4)
    code, _, err = cli(capsys, "compile", onnx, "-t", "cpu-onnxruntime", "-p", "fp32", "--out", tmp_path / "out")
    assert_clean_failure(code, err, exit_code=2, names=("static batch of 4", "batch 1"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, names", [
    ("random-onnx", ("model.onnx", "not a valid ONNX model")),
    ("bad-json", ("artifact.json", "not valid JSON")),
    ("missing-keys", ("artifact.json", "lacks the key(s) backend")),
])
def test_bench_on_a_damaged_artifact_folder(artifact, capsys, damage, names):
    if damage == "random-onnx":
        (artifact / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "bad-json":
        (artifact / "artifact.json").write_text('{"target": "cpu-onnxruntime", ')
    else:
        meta = json.loads((artifact / "artifact.json").read_text())
        del meta["backend"]
        (artifact / "artifact.json").write_text(json.dumps(meta))
    code, _, err = cli(capsys, "bench", artifact, "--min-runs", "1", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=names)


def test_bundle_of_a_corrupt_report(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "report.json").write_bytes(b'{"run": {"name": \xff')
    code, _, err = cli(capsys, "bundle", run)
    assert_clean_failure(code, err, exit_code=2, names=("report.json", "not valid JSON"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def _partial(tmp_path: Path, state: dict | str) -> Path:
    partial = tmp_path / "runs" / "r.partial"
    partial.mkdir(parents=True)
    (partial / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    return partial


RESUME_ARGS = ("--name", "r", "-t", "cpu-onnxruntime", "--resume", "--no-progress",
               "--set", "data.max_train_images=64", "--set", "data.max_eval_images=64")


def test_resume_with_a_broken_state_file(tmp_path, capsys):
    partial = _partial(tmp_path, '{"done": ["load", ')
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", *RESUME_ARGS)
    assert_clean_failure(code, err, exit_code=2, names=("state.json", "not valid JSON"))
    assert snapshot(tmp_path) == before and partial.is_dir()


def test_resume_with_a_changed_config_names_the_changed_keys(tmp_path, capsys):
    from edgeprune.commands.run import build_config
    from edgeprune.config import resolve_targets
    from edgeprune.preflight import config_fingerprint

    cfg = build_config(None, ["data.max_train_images=64", "data.max_eval_images=64"], name="r")
    started = config_fingerprint(cfg, resolve_targets(["cpu-onnxruntime"]))
    _partial(tmp_path, {"done": ["load"], "report": {}, "config": started})
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "run", *RESUME_ARGS, "--set", "prune.target_macs_reduction=3")
    assert_clean_failure(code, err, exit_code=2, names=("--resume", "prune.target_macs_reduction"))
    assert snapshot(tmp_path) == before


def test_resume_of_a_run_folder_naming_os_system_runs_nothing(tmp_path, capsys):
    from edgeprune.commands.run import build_config
    from edgeprune.config import resolve_targets
    from edgeprune.preflight import config_fingerprint

    mark = tmp_path / "PWNED"
    cfg = build_config(None, ["data.max_train_images=64", "data.max_eval_images=64"], name="r")
    started = config_fingerprint(cfg, resolve_targets(["cpu-onnxruntime"]))
    partial = _partial(tmp_path, {"done": ["load", "score", "prune"], "config": started,
                                  "report": {"run": {}, "accuracy": {"baseline": 0.9}}})
    (partial / "scores.json").write_text(json.dumps({"criterion": "sae-mi", "seconds": 0, "labels_source": "labels",
                                                     "scores": {}}))
    pruned_folder(partial / "pruned", "os:system", {"command": f"touch {mark}"})
    code, _, err = cli(capsys, "run", *RESUME_ARGS)
    assert_clean_failure(code, err, exit_code=2, names=("refusing to import", "os:system"))
    assert not mark.exists()


def test_non_utf8_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    code, _, err = cli(capsys, "run", "--config", cfg, "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=(str(cfg), "not UTF-8"))


def test_inspect_with_an_input_too_small_for_the_model(capsys):
    code, _, err = cli(capsys, "inspect", "alexnet", "--input-shape", "1,8,8")
    assert_clean_failure(code, err, exit_code=2, names=("alexnet", "(1, 8, 8)", "--input-shape"))


@pytest.mark.parametrize("option, value, names", [
    ("--min-runs", "0", ("min_runs", "greater than or equal to 1")),
    ("--max-time-s", "-1", ("max_time_s", "greater than 0")),
    ("--threads", "-1", ("--threads", "greater than or equal to 1")),
])
def test_bench_options_out_of_range(artifact, capsys, option, value, names):
    code, out, err = cli(capsys, "bench", artifact, option, value)
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert "p50" not in out


def test_set_a_boolean_for_a_number_is_refused(capsys):
    code, _, err = cli(capsys, "run", "--dry-run", "--set", "finetune.epochs=yes")
    assert_clean_failure(code, err, exit_code=2, names=("finetune.epochs", "a number is needed", "True"))


def test_target_macs_must_be_finite(tmp_path, capsys):
    code, _, err = cli(capsys, "prune", "--target-macs", "inf", "--criterion", "l1", "--out", tmp_path / "p")
    assert_clean_failure(code, err, exit_code=2, names=("prune.target_macs_reduction", "finite"))
    assert "closest reachable" not in err and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- the top-level guard


def _last_traceback_path(err: str) -> Path:
    assert len(err.strip().splitlines()) == 1, err  # one line, not a wall of frames
    return Path(err.rsplit("full traceback in ", 1)[1].strip().removesuffix(")"))


@pytest.mark.crash_guard
def test_unexpected_exception_becomes_one_line_and_a_traceback_file(capsys, monkeypatch):
    import edgeprune.commands.run as run_cmd

    def boom(*_a, **_k):
        raise ValueError("something nobody checked")

    monkeypatch.setattr(run_cmd, "plan_text", boom)
    code, _, err = cli(capsys, "run", "--dry-run", "-t", "cpu-onnxruntime")
    assert_clean_failure(code, err, exit_code=1, names=("unexpected ValueError", "`edgeprune run`",
                                                        "something nobody checked"))
    path = _last_traceback_path(err)
    try:
        assert "Traceback" in path.read_text() and "boom" in path.read_text()
    finally:
        path.unlink()


@pytest.mark.crash_guard
def test_unexpected_exception_in_a_stage_saves_its_traceback_in_the_run_folder(tmp_path, capsys, monkeypatch):
    from edgeprune import pipeline
    from edgeprune.data import TensorData
    from edgeprune.zoo import fmnist_cnn

    x = torch.zeros(4, 1, 28, 28)
    data = TensorData(x, torch.zeros(4, dtype=torch.long), [str(i) for i in range(10)], "fake")
    monkeypatch.setattr(pipeline, "load_inputs", lambda cfg: pipeline.Inputs(fmnist_cnn().eval(), data, data, data,
                                                                            None))

    def boom(*_a, **_k):
        raise KeyError("no such layer")

    monkeypatch.setattr(pipeline, "stage_score", boom)
    code, _, err = cli(capsys, "run", "--name", "r", "-t", "cpu-onnxruntime", "--no-progress")
    assert_clean_failure(code, err, exit_code=1, names=("unexpected KeyError during score", "no such layer"))
    assert _last_traceback_path(err) == tmp_path / "runs" / "r.partial" / "traceback.txt"
    assert "boom" in _last_traceback_path(err).read_text()


def test_edgeprune_errors_keep_their_exit_codes(capsys, monkeypatch):
    import edgeprune.commands.run as run_cmd
    from edgeprune.errors import GateError

    def gate(*_a, **_k):
        raise GateError("1 artifact(s) failed their target's budget")

    monkeypatch.setattr(run_cmd, "plan_text", gate)
    code, _, err = cli(capsys, "run", "--dry-run", "-t", "cpu-onnxruntime")
    assert_clean_failure(code, err, exit_code=3, names=("failed their target's budget",))
    assert "unexpected" not in err


# ----------------------------------------------------------------------------- issue 22, rows 2-9


def _broken_weights(path: Path, key: str, value: float) -> Path:
    """The bundled weights with every value of ``key`` set to ``value`` (.safetensors or .pt by suffix)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(WEIGHTS))
    sd[key] = torch.full_like(sd[key], value)
    save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
    return path


@pytest.mark.parametrize("file, key, value", [("nan.safetensors", "features.0.weight", float("nan")),
                                              ("inf.pt", "features.1.running_var", float("inf"))])
def test_non_finite_weights_are_refused_at_load(tmp_path, capsys, file, key, value):
    """Row 2: NaN / inf weights (a conv weight, a BN running_var) are refused where weights are read."""
    weights = _broken_weights(tmp_path / file, key, value)
    code, _, err = cli(capsys, "prune", "--weights", weights, "--out", tmp_path / "p", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=(str(weights), "NaN or inf", key))
    assert not (tmp_path / "p").exists()


def test_non_finite_weights_in_a_pruned_folder_are_refused(tmp_path, capsys):
    folder = pruned_folder(tmp_path / "p", "edgeprune.zoo:fmnist_cnn", {})
    _broken_weights(folder / "model.safetensors", "classifier.weight", float("nan"))
    code, _, err = cli(capsys, "export", folder, "--out", tmp_path / "m.onnx")
    assert_clean_failure(code, err, exit_code=2, names=("model.safetensors", "NaN or inf", "classifier.weight"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_chance_level_baseline_is_refused_unless_allowed(tmp_path, capsys, monkeypatch):
    """Row 2: an unpruned model at chance level (here random init) is no reference; --allow-chance-baseline
    lets it through (the run then stops at a stand-in score stage)."""
    from edgeprune import pipeline
    from edgeprune.errors import PruneError

    args = ("run", "--name", "r", "-t", "cpu-onnxruntime", "--no-progress", "--set", "model.weights=null",
            "--set", "data.max_train_images=64", "--set", "data.max_eval_images=2000")
    code, _, err = cli(capsys, *args)
    assert_clean_failure(code, err, exit_code=2, names=("random init", "chance level", "2000 eval images",
                                                        "--allow-chance-baseline"))
    assert not any((tmp_path / "runs").iterdir())

    def stop(*_a, **_k):
        raise PruneError("stand-in score stage: the baseline was accepted")

    monkeypatch.setattr(pipeline, "stage_score", stop)
    code, _, err = cli(capsys, *args, "--allow-chance-baseline")
    assert_clean_failure(code, err, exit_code=2, names=("the baseline was accepted",))


def test_check_baseline_refuses_chance_unless_allowed():
    from edgeprune.config import ModelConfig
    from edgeprune.context import check_baseline
    from edgeprune.data import TensorData
    from edgeprune.errors import ModelLoadError

    data = TensorData(torch.zeros(1000, 1, 28, 28), torch.arange(10).repeat(100), list("abcdefghij"), "test")
    with pytest.raises(ModelLoadError, match=r"scores 11\.00 % top-1 on the 1000 eval images, chance level"):
        check_baseline(0.11, data, ModelConfig())
    assert check_baseline(0.11, data, ModelConfig(allow_chance_baseline=True)) == 0.11
    assert check_baseline(0.20, data, ModelConfig()) == 0.20  # 0.1 + 3 sd of 1000 images = 0.128: told apart


def test_chance_level_bound():
    from edgeprune.context import chance_level

    chance, bound = chance_level(torch.arange(10).repeat(1000), 10)  # balanced, 10,000 images
    assert chance == pytest.approx(0.1) and bound == pytest.approx(0.1 + 3 * (0.1 * 0.9 / 10_000) ** 0.5)
    chance, _ = chance_level(torch.tensor([0] * 70 + [1] * 30), 10)  # always answering class 0 scores 70 %
    assert chance == pytest.approx(0.7)
    assert chance_level(torch.zeros(4, dtype=torch.long), 10)[1] >= 1.0  # one class: cannot tell, not judged


def _anchor_bomb(path: Path) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind, names", [("bomb", ("expands to more than 100,000 values",)),
                                         ("deep", ("nested more than 64 levels deep",)),
                                         ("recursive", ("refers to itself",))])
@pytest.mark.parametrize("command", ["run", "targets"])
def test_yaml_bombs_and_deep_nesting_are_refused(tmp_path, capsys, kind, names, command):
    """Row 3: a "billion laughs" anchor bomb, 10,000-deep nesting and a self-referring alias are refused at once."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "bomb":
        _anchor_bomb(path)
    else:
        path.write_text("x: " + "[" * 10_000 + "]" * 10_000 + "\n" if kind == "deep" else "x: &a [1, *a]\n")
    args = (["run", "--dry-run", "--config", path] if command == "run" else ["targets", "validate", path])
    code, _, err = cli(capsys, *args)
    assert_clean_failure(code, err, exit_code=2, names=(str(path), *names))


def test_yaml_bomb_in_a_set_value_is_refused(capsys):
    bomb = "[" + ", ".join(["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]"
                                                                  for i in range(1, 7)]) + "]"
    code, _, err = cli(capsys, "run", "--dry-run", "--set", f"data.class_names={bomb}")
    assert_clean_failure(code, err, exit_code=2, names=("--set", "expands to more than"))


def _hold_lock(path: Path):
    """A separate process holding the run lock at ``path``; returns (process, its pid)."""
    import subprocess

    code = (f"import sys, time; from edgeprune.safety import RunLock; RunLock({str(path)!r}, 'x').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_on_a_run_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    """Row 4: one process at a time in a run folder. A second one is refused naming the first's pid; the lock
    file of a process that died is taken over with a notice (here the run then stops at the broken state file)."""
    partial = _partial(tmp_path, '{"done": ["load", ')
    owner = _hold_lock(tmp_path / "runs" / "r.lock")
    try:
        before = snapshot(tmp_path)
        code, _, err = cli(capsys, "run", *RESUME_ARGS)
        assert_clean_failure(code, err, exit_code=1, names=("runs/r.partial", "in use by another edgeprune process",
                                                            f"pid {owner.pid}"))
        assert snapshot(tmp_path) == before
    finally:
        owner.kill()
        owner.wait()
    assert (tmp_path / "runs" / "r.lock").read_text().strip() == str(owner.pid)  # left behind by a dead process
    code, _, err = cli(capsys, "run", *RESUME_ARGS)
    assert_clean_failure(code, err, exit_code=2, names=("taking over the lock of run folder runs/r.partial left by pid "
                                                        f"{owner.pid}", "state.json", "not valid JSON"))
    assert not (tmp_path / "runs" / "r.lock").exists() and partial.is_dir()


def test_run_lock_is_exclusive_within_one_process_too(tmp_path):
    from edgeprune.errors import ResourceError
    from edgeprune.safety import RunLock

    first = RunLock(tmp_path / "r.lock", "run folder r.partial").acquire()
    with pytest.raises(ResourceError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "r.lock", "run folder r.partial").acquire()
    first.release()
    assert not (tmp_path / "r.lock").exists()
    RunLock(tmp_path / "r.lock", "run folder r.partial").acquire().release()


def _factory_module(tmp_path: Path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(f"import sys, time\n\ndef net(num_classes=10, in_channels=1):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:net"


@pytest.mark.parametrize("module, body, names", [
    ("exitnets", "sys.exit(0)", ("exitnets:net", "called sys.exit(0)")),
    ("raisenets", "raise ValueError('checkpoint server unreachable')",
     ("raisenets:net", "raised ValueError", "checkpoint server unreachable")),
    ("sleepnets", "time.sleep(10**6)", ("sleepnets:net", "did not finish within 1 s", "model.build_timeout_s")),
])
def test_a_factory_that_exits_raises_or_hangs(tmp_path, capsys, monkeypatch, module, body, names):
    """Rows 5 and 7: a trusted factory that calls sys.exit(0), raises, or never returns is a clean error naming
    it (construction is time-boxed by model.build_timeout_s), never exit 0 with nothing written."""
    arch = _factory_module(tmp_path, monkeypatch, module, body)
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"build_timeout_s": 1}})
    code, _, err = cli(capsys, "--trust-code", module, "prune", "--arch", arch, "--config", cfg, "--out",
                       tmp_path / "p", "--no-progress")
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert not (tmp_path / "p").exists()


def test_readme_states_the_model_build_budget():
    from edgeprune.config import BUILD_TIMEOUT_S

    readme = (REPO_ROOT / "README.md").read_text()
    assert f"(`model.build_timeout_s`, default {BUILD_TIMEOUT_S:g} s)" in " ".join(readme.split())


@pytest.mark.parametrize("damage, names", [
    ("unknown-op", ("cannot run the result", "NoSuchOp")),
    ("nan-weights", ("NaN or inf",)),
])
def test_compile_runs_what_it_wrote(tmp_path, capsys, damage, names):
    """Row 5: `compile` opens a session on each artifact and runs it once; an ONNX that passes the checker but
    that ONNX Runtime cannot load (an operator of an unknown domain) or that answers NaN is refused."""
    import onnx

    pytest.importorskip("onnxruntime")
    model = onnx.load(str(tiny_onnx(tmp_path / "m.onnx")))
    if damage == "unknown-op":
        node = next(n for n in model.graph.node if n.op_type == "Relu")
        node.domain, node.op_type = "com.example", "NoSuchOp"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    else:
        init = next(i for i in model.graph.initializer if i.name == "classifier.weight")
        arr = onnx.numpy_helper.to_array(init).copy()
        arr[:] = np.nan
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    code, _, err = cli(capsys, "compile", tmp_path / "bad.onnx", "-t", "cpu-onnxruntime", "-p", "fp32", "--out",
                       tmp_path / "out")
    assert_clean_failure(code, err, exit_code=2, names=("bad.onnx", *names))
    assert not (tmp_path / "out").exists()


def test_compile_for_a_device_that_is_not_here_says_it_was_not_run(tmp_path, capsys):
    """An artifact for another box's device (an Intel GPU) is built but cannot be run here: said, not hidden."""
    pytest.importorskip("openvino")
    from edgeprune.backends import get_backend
    from edgeprune.config import Precision

    if get_backend("openvino").supports(Precision.fp32, "GPU")[0]:
        pytest.skip("this machine has an OpenVINO GPU: the artifact is run here")
    code, _, err = cli(capsys, "compile", tiny_onnx(tmp_path / "m.onnx"), "-t", "intel-gpu-openvino", "-p", "fp32",
                       "--out", tmp_path / "out")
    assert code == 0, err
    assert "was not run here" in err and "'GPU' is not available here" in err
    assert (tmp_path / "out" / "fp32" / "model.xml").is_file()


def _little_memory(monkeypatch, gib: float = 8.0) -> None:
    from edgeprune import safety

    monkeypatch.setattr(safety, "available_memory", lambda: int(gib * 2**30))


def test_preprocessing_too_large_for_memory_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Row 6: 4096x4096 preprocessing (the largest accepted) is checked against the memory here before any
    image is loaded (8 GiB made the machine's memory for the test)."""
    _little_memory(monkeypatch)
    code, _, err = cli(capsys, "run", "-t", "cpu-onnxruntime", "--no-progress", "--set",
                       "data.preprocessing.height=4096", "--set", "data.preprocessing.width=4096", "--set",
                       "data.max_train_images=256")
    assert_clean_failure(code, err, exit_code=1, names=("256 images of 1x4096x4096", "needs 32.0 GiB",
                                                        "8.0 GiB is available", "data.preprocessing.height"))
    assert not (tmp_path / "runs").exists()


def test_a_huge_target_batch_is_refused_by_validate_compile_and_bench(artifact, tmp_path, capsys, monkeypatch):
    """Row 6: batch_size 10**9 needs terabytes for its input alone: refused by `targets validate`, `compile`
    and `bench` before anything is allocated."""
    _little_memory(monkeypatch)
    big = write_yaml(tmp_path / "big.yaml", {"backend": "onnxruntime", "batch_size": 10**9, "precisions": ["fp32"]})
    code, _, err = cli(capsys, "targets", "validate", big)
    assert_clean_failure(code, err, exit_code=2, names=("1,000,000,000 inputs of 1x8x8", "batch_size"))
    code, _, err = cli(capsys, "compile", tmp_path / "m.onnx", "-t", big, "-p", "fp32", "--out", tmp_path / "o")
    assert_clean_failure(code, err, exit_code=1, names=("1,000,000,000 inputs of 1x28x28", "needs 2.9 TiB",
                                                        "batch_size / max_batch_size of target 'big'"))
    assert not (tmp_path / "o").exists()
    code, out, err = cli(capsys, "bench", artifact, "-t", big, "--min-runs", "1", "--no-progress")
    assert_clean_failure(code, err, exit_code=1, names=("benchmarking on target 'big'", "needs 2.9 TiB"))
    assert "p50" not in out


def test_available_memory_is_known_here():
    from edgeprune.safety import available_memory

    free = available_memory()
    assert free is not None and 0 < free < 2**50


class _FullDisk:
    """A file object whose writes stop with ENOSPC after ``room`` bytes, like a write to a full disk."""

    def __init__(self, path, mode="r", *a, room: int = 1000, **k):
        self.f = open(path, mode, *a, **k)
        self.room = room

    def write(self, data) -> int:
        import errno

        n = self.f.write(bytes(data[: self.room]))
        self.room -= n
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_writing_a_checkpoint_leaves_the_old_one_and_no_temporary_file(tmp_path, monkeypatch):
    """Row 8, the writer: a checkpoint write that hits ENOSPC is "no space left on <folder>" (exit 1), no
    temporary file is left and the previous checkpoint is untouched."""
    from edgeprune import finetune
    from edgeprune.errors import ResourceError

    path = tmp_path / "ckpt" / "last.pt"
    finetune.save_checkpoint(path, {"step": 1})
    monkeypatch.setattr(finetune, "open", _FullDisk, raising=False)
    with pytest.raises(ResourceError, match=f"no space left on {tmp_path / 'ckpt'}") as exc:
        finetune.save_checkpoint(path, {"step": 2, "x": torch.zeros(10_000)})
    assert exc.value.exit_code == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert finetune.load_checkpoint(path) == {"step": 1}


def test_full_disk_writing_safetensors_is_named(tmp_path, monkeypatch):
    """safetensors writes through Rust: its error only says "No space left on device (os error 28)"."""
    import safetensors.torch

    from edgeprune.errors import ResourceError
    from edgeprune.models import save_safetensors
    from edgeprune.zoo import fmnist_cnn

    def full(*_a, **_k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ResourceError, match="no space left on"):
        save_safetensors(fmnist_cnn(), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_disk_mid_run_keeps_the_run_resumable(tmp_path, capsys, monkeypatch):
    """Row 8, a whole run: the disk fills while fine-tuning writes its checkpoint; the run stops with "no space
    left on <folder>" (exit 1), leaves no temporary or traceback file, and --resume finishes it."""
    from edgeprune import finetune

    monkeypatch.setattr(finetune, "open", _FullDisk, raising=False)
    args = ("run", "--name", "r", "-t", "cpu-onnxruntime", "--no-progress", "--no-fail-on-gate",
            "--set", "data.max_train_images=256", "--set", "data.max_eval_images=256",
            "--set", "bench.baseline=false", "--set", "bench.min_runs=2", "--set", "bench.min_time_s=0")
    code, _, err = cli(capsys, *args)
    partial = tmp_path / "runs" / "r.partial"
    assert_clean_failure(code, err, exit_code=1, names=("no space left on runs/r.partial/checkpoints", "--resume"))
    left = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    assert not [p for p in left if p.endswith(".tmp") or "traceback" in p], left
    assert json.loads((partial / "state.json").read_text())["done"] == ["load", "score", "prune"]
    monkeypatch.delattr(finetune, "open")  # the disk has room again
    code, out, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert (tmp_path / "runs" / "r" / "report.json").is_file() and not partial.exists()


@pytest.mark.parametrize("name, names", [("a\nb", ("'a\\nb'", "control characters")),
                                         ("a\tb", ("'a\\tb'", "control characters")),
                                         ("x" * 300, ("300 bytes long", "under 200 bytes"))])
def test_run_name_with_control_characters_or_too_long(tmp_path, capsys, name, names):
    """Row 9: a run name is one short, printable folder name."""
    code, _, err = cli(capsys, "run", "--name", name, "--dry-run")
    assert_clean_failure(code, err, exit_code=2, names=names)
    assert not (tmp_path / "runs").exists()


def test_resume_when_a_stage_marked_done_left_nothing(tmp_path, capsys):
    """Row 9: state.json is valid and the config matches, but what a stage marked done should have left is
    missing: refused at once (not a KeyError minutes later)."""
    from edgeprune.commands.run import build_config
    from edgeprune.config import resolve_targets
    from edgeprune.preflight import config_fingerprint

    cfg = build_config(None, ["data.max_train_images=64", "data.max_eval_images=64"], name="r")
    started = config_fingerprint(cfg, resolve_targets(["cpu-onnxruntime"]))
    for done, report, names in [(["load"], {"run": {"name": "r"}}, ("'load' done", "accuracy.baseline is missing")),
                                (["load", "score"], {"run": {}, "accuracy": {"baseline": 0.9}},
                                 ("'score' done", "scores.json is missing"))]:
        partial = _partial(tmp_path, {"done": done, "report": report, "config": started})
        before = snapshot(tmp_path)
        code, _, err = cli(capsys, "run", *RESUME_ARGS)
        assert_clean_failure(code, err, exit_code=2, names=("state.json", *names, "remove"))
        assert snapshot(tmp_path) == before
        import shutil

        shutil.rmtree(partial)


def test_bundle_of_a_report_of_the_wrong_shape(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"run": [1, 2], "artifacts": "x"}))
    code, _, err = cli(capsys, "bundle", run)
    assert_clean_failure(code, err, exit_code=2, names=("report.json", "shape", "run"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]


def test_verify_refuses_a_tar_slip_bundle(tmp_path, capsys):
    import io
    import tarfile

    bundle = tmp_path / "evil-bundle.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        member = tarfile.TarInfo("../../slipped.txt")
        member.size = 6
        tar.addfile(member, io.BytesIO(b"pwned\n"))
    code, _, err = cli(capsys, "verify", bundle)
    assert_clean_failure(code, err, exit_code=2, names=("refusing to unpack", str(bundle), "slipped.txt"))
    assert not list(Path("/tmp").glob("slipped.txt")) and not (tmp_path.parent / "slipped.txt").exists()


def test_onnx_with_external_data_beside_it_compiles(tmp_path, capsys):
    """Row 9: weights in a .data file next to the ONNX (as exporters write big models) are legitimate, whatever
    the working folder; a missing data file is named as such, not as a truncated ONNX."""
    import onnx

    pytest.importorskip("onnxruntime")
    (tmp_path / "models").mkdir()
    src = onnx.load(str(tiny_onnx(tmp_path / "m.onnx")))
    onnx.save_model(src, str(tmp_path / "models" / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")
    code, _, err = cli(capsys, "compile", tmp_path / "models" / "ext.onnx", "-t", "cpu-onnxruntime", "-p", "fp32",
                       "--out", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "fp32" / "model.onnx").is_file()
    (tmp_path / "models" / "ext.onnx.data").unlink()
    code, _, err = cli(capsys, "compile", tmp_path / "models" / "ext.onnx", "-t", "cpu-onnxruntime", "-p", "fp32",
                       "--out", tmp_path / "out2")
    assert_clean_failure(code, err, exit_code=2, names=("external data", "ext.onnx.data", "same folder"))
    assert "truncated" not in err


def test_symlink_loops_in_an_image_folder_are_skipped_with_a_warning(tmp_path, capsys):
    calib = image_folder(tmp_path / "calib", ["a", "b"], per_class=4)
    os.symlink("loop2.png", calib / "a" / "loop1.png")
    os.symlink("loop1.png", calib / "a" / "loop2.png")
    os.symlink("..", calib / "b" / "up")
    cfg = write_yaml(tmp_path / "c.yaml", {"data": {"calibration": str(calib), "min_calibration": 4}})
    code, _, err = cli(capsys, "score", "--config", cfg, "--criterion", "l1", "--out", tmp_path / "s",
                       "--num-images", "8")
    assert code == 0, err
    assert err.count("skipped 3 symbolic link(s)") == 1 and "a/loop1.png" in err and "b/up" in err


def test_truncated_finetune_checkpoint_restarts_with_a_notice(tmp_path, capsys):
    """Row 9: a fine-tuning checkpoint cut short (a crash, a full disk) is a one-line notice and a fresh start,
    not torch's "please file an issue" text."""
    from edgeprune import finetune

    path = tmp_path / "last.pt"
    finetune.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "step": 3})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert finetune.load_checkpoint(path) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "truncated or damaged" in err and "starts over" in err
    assert "issue" not in err.lower()
