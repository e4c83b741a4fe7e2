"""Deployment bundle: folder + tar.gz with a sha256 manifest; verify catches tampering."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from edgeprune.bundle import MANIFEST, make_bundle, sha256_file, verify_bundle
from edgeprune.errors import DataError

EXAMPLE = Path(__file__).parent / "data" / "report_example.json"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "fmnist-cnn-2x"
    report = json.loads(EXAMPLE.read_text())
    report["run"]["config"]["data"] = {"preprocessing": {"channels": 1, "height": 28, "width": 28,
                                                          "mean": [0.286], "std": [0.353]},
                                       "class_names": ["t-shirt", "trouser", "pullover"]}
    for a in report["artifacts"][:2]:
        p = run / a["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"model-" + a["precision"].encode())
        (p.parent / "artifact.json").write_text("{}")
    (run / "model.onnx").write_bytes(b"onnx")
    (run / "config.yaml").write_text("name: fmnist-cnn-2x\n")
    (run / "report.json").write_text(json.dumps(report))
    (run / "report.md").write_text("# report\n")
    (run / "state.json").write_text("{}")  # not part of a bundle
    return run


def test_bundle_has_manifest_with_every_file(run_dir):
    folder, tar = make_bundle(run_dir)
    assert folder == run_dir.parent / "fmnist-cnn-2x-bundle" and tar.name == "fmnist-cnn-2x-bundle.tar.gz"
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == files
    assert "artifacts/cpu-onnxruntime/int8/model.onnx" in files and "state.json" not in files
    entry = manifest["files"]["model.onnx"]
    assert entry == {"sha256": sha256_file(folder / "model.onnx"), "size": 4}
    assert manifest["class_names"] == ["t-shirt", "trouser", "pullover"]
    assert manifest["input"]["preprocessing"]["mean"] == [0.286]
    assert manifest["config"]["prune"]["target_macs_reduction"] == 2.0
    assert manifest["tool_versions"]["edgeprune"] == "0.1.0"
    assert {a["target"] for a in manifest["artifacts"]} >= {"cpu-onnxruntime", "jetson-orin-tensorrt"}
    with tarfile.open(tar) as t:
        assert f"fmnist-cnn-2x-bundle/{MANIFEST}" in t.getnames()


def test_verify_accepts_folder_and_tar(run_dir):
    folder, tar = make_bundle(run_dir)
    assert verify_bundle(folder) == verify_bundle(tar)
    assert "model.onnx" in verify_bundle(tar)


def test_verify_names_every_tampered_missing_or_extra_file(run_dir):
    folder, _ = make_bundle(run_dir)
    (folder / "model.onnx").write_bytes(b"evil")
    (folder / "report.md").unlink()
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(DataError) as exc:
        verify_bundle(folder)
    msg = str(exc.value)
    assert "sha256 mismatch: model.onnx" in msg and "missing: report.md" in msg and "not in manifest: extra.bin" in msg


def test_bundle_refuses_unfinished_run_and_existing_output(run_dir, tmp_path):
    with pytest.raises(DataError, match="report.json is missing"):
        make_bundle(tmp_path / "nothing")
    make_bundle(run_dir)
    with pytest.raises(DataError, match="already exists"):
        make_bundle(run_dir)


def test_verify_cli(run_dir):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    _, tar = make_bundle(run_dir)
    res = CliRunner().invoke(app, ["verify", str(tar)])
    assert res.exit_code == 0 and "files match the manifest" in res.output
    res = CliRunner().invoke(app, ["verify", str(run_dir / "nope")])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
