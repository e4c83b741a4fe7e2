"""Data loading (idx, image folders, calibration) and model loading (safetensors, .pt, pickle)."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.config import DataConfig, ModelConfig, Preprocessing
from edgeprune.data import ImageFolderDataset, load_calibration, load_fashion_mnist, load_image_folder
from edgeprune.errors import DataError, ModelLoadError, UnknownNameError, UntrustedPickleError
from edgeprune.models import build_model, load_model, save_safetensors
from edgeprune.zoo import fmnist_cnn


def _write_idx(path, arr: np.ndarray):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _image_folder(root, n_per_class=4, size=(20, 20), classes=("cat", "dog"), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = size[::-1] if mode == "L" else (*size[::-1], 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / c / f"{i}.png")
    return root


def test_idx_roundtrip_and_normalization(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    pre = Preprocessing()
    d = load_fashion_mnist(tmp_path, "eval", pre)
    assert d.images.shape == (3, 1, 28, 28) and d.labels.tolist() == [0, 1, 2]
    expect = (imgs[1, 0, 5] / 255.0 - pre.mean[0]) / pre.std[0]
    assert d.images[1, 0, 0, 5].item() == pytest.approx(expect, abs=1e-5)


def test_idx_truncated_and_missing(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, 10, 28, 28) + b"\x00" * 100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10))
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path, "eval", Preprocessing())
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "none", "eval", Preprocessing())


def test_image_folder_rgb_resize(tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="RGB")
    pre = Preprocessing(channels=3, height=16, width=24, mean=[0.5], std=[0.25])
    d = load_image_folder(root, pre)
    assert d.images.shape == (8, 3, 16, 24) and d.classes == ["cat", "dog"]
    assert sorted(d.labels.tolist()) == [0] * 4 + [1] * 4


def test_corrupt_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(root, Preprocessing())


def test_calibration_refuses_small_and_records_hash(tmp_path):
    root = _image_folder(tmp_path / "cal", n_per_class=5, size=(28, 28))
    cfg = DataConfig(calibration=root, min_calibration=20)
    with pytest.raises(DataError, match="at least 20"):
        load_calibration(cfg)
    cal = load_calibration(DataConfig(calibration=root, min_calibration=4))
    assert len(cal.data) == 10 and len(cal.sha256) == 64
    assert cal.summary()["shape"] == [1, 28, 28]


def test_bundled_calibration_manifest_matches():
    cal = load_calibration(DataConfig())
    assert len(cal.data) == cal.manifest["count"] == 500
    assert cal.sha256 == cal.manifest["sha256"]


def test_safetensors_and_weights_only_pt(tmp_path):
    m = fmnist_cnn(widths=(8, 8, 8))
    save_safetensors(m, tmp_path / "w.safetensors")
    torch.save(m.state_dict(), tmp_path / "w.pt")
    x = torch.randn(2, 1, 28, 28)
    for name in ("w.safetensors", "w.pt"):
        cfg = ModelConfig(arch="edgeprune.zoo:fmnist_cnn", weights=tmp_path / name, kwargs={"widths": [8, 8, 8]})
        assert torch.equal(load_model(cfg, 1)(x), m.eval()(x))


def test_pickled_model_needs_trust(tmp_path):
    m = fmnist_cnn(widths=(8, 8, 8)).eval()
    torch.save(m, tmp_path / "whole.pt")
    cfg = ModelConfig(weights=tmp_path / "whole.pt")
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(cfg, 1)
    loaded = load_model(ModelConfig(weights=tmp_path / "whole.pt", trust_pickle=True), 1)
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(loaded(x), m(x))


def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelConfig(weights=tmp_path / "none.safetensors"), 1)
    save_safetensors(fmnist_cnn(widths=(8, 8, 8)), tmp_path / "small.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(ModelConfig(weights=tmp_path / "small.safetensors"), 1)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(ModelConfig(weights=tmp_path / "junk.safetensors"), 1)


def test_torchvision_and_unknown_arch():
    m = build_model(ModelConfig(arch="resnet18", num_classes=7, weights=None), in_channels=1)
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    with pytest.raises(UnknownNameError, match="resnet18"):
        build_model(ModelConfig(arch="resnet19", weights=None), in_channels=3)
    with pytest.raises(UnknownNameError, match="fmnist_cnn"):
        build_model(ModelConfig(arch="edgeprune.zoo:nothing", weights=None), in_channels=1)
