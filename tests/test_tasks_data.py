"""Synthetic inspection set and the mask / COCO loaders (edgeprune.tasks)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.config import Preprocessing
from edgeprune.data import hash_files
from edgeprune.errors import DataError
from edgeprune.tasks.coco import rle_decode, rle_encode
from edgeprune.tasks.datasets import load_coco, load_mask_folder
from edgeprune.tasks.synthetic import DEFECT_CLASSES, SURFACES, boxes_from_mask, make_sample
from edgeprune.tasks.writer import write_inspection_set

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocessing(channels=1, height=32, width=32, mean=[0.5], std=[0.25])


@pytest.fixture
def small_set(tmp_path) -> Path:
    out = tmp_path / "set"
    write_inspection_set(out, seed=3, count=6, size=32, max_defects=3)
    return out


# ----------------------------------------------------------------------------- generator


def test_samples_are_deterministic_and_seed_dependent():
    a, b, c = make_sample(0, 5), make_sample(0, 5), make_sample(1, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("index", range(6))
def test_sample_masks_boxes_and_surfaces_agree(index):
    s = make_sample(7, index, size=64)
    assert s.surface == SURFACES[index % 3]
    assert s.image.shape == s.mask.shape == (64, 64) and s.image.dtype == np.uint8
    assert set(np.unique(s.mask)) <= set(range(len(DEFECT_CLASSES)))
    assert len(s.boxes) == len(s.labels) == len(s.components)
    covered = np.zeros_like(s.mask, dtype=bool)
    for box, label, comp in zip(s.boxes, s.labels, s.components):
        ys, xs = np.nonzero(comp)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
        assert (s.mask[comp] == label).all()
        covered |= comp
    assert np.array_equal(covered, s.mask > 0)  # every defect pixel is in exactly one component


def test_boxes_from_hand_made_mask():
    m = np.zeros((8, 10), np.uint8)
    m[1, 1:4] = 1  # scratch, 3 px
    m[5:7, 6:9] = 2  # spot, 6 px
    m[6, 1] = 1  # a second, separate class-1 component
    m[2, 4] = 3  # diagonal to the scratch but another class: its own component
    boxes, labels, areas, _ = boxes_from_mask(m)
    got = sorted(zip(map(tuple, boxes.tolist()), labels.tolist(), areas.tolist()))
    assert got == [((1, 1, 4, 2), 1, 3), ((1, 6, 2, 7), 1, 1), ((4, 2, 5, 3), 3, 1), ((6, 5, 9, 7), 2, 6)]


def test_rle_round_trip_matches_pycocotools():
    rng = np.random.default_rng(0)
    m = rng.random((7, 5)) > 0.6
    rle = rle_encode(m)
    assert np.array_equal(rle_decode(rle, "t"), m)
    mask_utils = pytest.importorskip("pycocotools.mask")
    ref = mask_utils.frPyObjects(rle, *rle["size"])
    assert np.array_equal(mask_utils.decode(ref).astype(bool), m)


def test_writer_files_manifest_and_refusal(small_set):
    man = json.loads((small_set / "manifest.json").read_text())
    files = sorted(small_set.rglob("*.png"))
    assert len(files) == 12 and man["count"] == 6
    assert man["sha256"] == hash_files(files)
    coco = json.loads((small_set / "annotations.json").read_text())
    assert len(coco["annotations"]) == sum(man["defects"].values())
    with pytest.raises(DataError, match="already exists"):
        write_inspection_set(small_set, seed=3, count=6, size=32)
    assert not list(small_set.parent.glob(".set.tmp-*"))  # no temporary folder left behind


def test_bundled_sample_matches_its_manifest():
    root = REPO / "calibration" / "inspection-64"
    man = json.loads((root / "manifest.json").read_text())
    files = sorted(root.rglob("*.png"))
    assert len(files) == 2 * man["count"] == 128
    assert hash_files(files) == man["sha256"]
    first = make_sample(man["generator"]["seed"], 0, size=man["generator"]["size"],
                        max_defects=man["generator"]["max_defects"])
    assert np.array_equal(np.asarray(Image.open(root / "masks" / "00000.png")), first.mask)


# ----------------------------------------------------------------------------- loaders: valid data


def test_mask_folder_and_coco_load_the_same_labels(small_set):
    seg = load_mask_folder(small_set / "images", small_set / "masks", PRE, num_classes=4)
    det = load_coco(small_set / "annotations.json", None, PRE)
    assert seg.images.shape == det.images.shape == (6, 1, 32, 32)
    assert seg.masks.dtype == torch.long and torch.equal(seg.masks, det.masks)
    assert torch.allclose(seg.images, det.images)
    assert det.classes == list(DEFECT_CLASSES)
    s = make_sample(3, 0, size=32)
    assert torch.equal(det.boxes[0], torch.tensor(s.boxes, dtype=torch.float32).view(-1, 4))
    assert det.labels[0].tolist() == s.labels.tolist()


def test_resizing_scales_boxes_and_masks_nearest(small_set):
    pre = Preprocessing(channels=3, height=64, width=64, mean=[0.5], std=[0.25])
    det = load_coco(small_set / "annotations.json", None, pre)
    s = make_sample(3, 0, size=32)
    assert det.images.shape == (6, 3, 64, 64)
    assert torch.equal(det.boxes[0], 2.0 * torch.tensor(s.boxes, dtype=torch.float32).view(-1, 4))
    assert torch.equal(det.masks[0], torch.from_numpy(s.mask).long().repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_synthetic_size_draws_larger_defects_at_the_input_size(tmp_path):
    from edgeprune.config import PipelineConfig
    from edgeprune.tasks.loading import load_task_data

    cfg = PipelineConfig.model_validate({
        "name": "t", "task": "detection", "model": {"arch": "ssdlite320_mobilenet_v3_large", "num_classes": 4},
        "data": {"preprocessing": {"channels": 3, "height": 64, "width": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "tasks": {"synthetic_count": 8, "synthetic_size": 32, "synthetic_seed": 3}})
    det = load_task_data(cfg, data_dir=tmp_path / "data")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["generator"]["size"] == 32 and det.images.shape == (8, 3, 64, 64)
    s = make_sample(3, 1, size=32)  # generated at 32 px, boxes twice as large at the 64 px input
    assert torch.equal(det.boxes[1], 2.0 * torch.tensor(s.boxes, dtype=torch.float32).view(-1, 4))
    default = load_task_data(cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update={"synthetic_size": None})}),
                             data_dir=tmp_path / "data")  # regenerated at the input size: the manifest differs
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["generator"]["size"] == 64
    assert torch.equal(default.boxes[1], torch.tensor(make_sample(3, 1, size=64).boxes, dtype=torch.float32).view(-1, 4))


# ----------------------------------------------------------------------------- loaders: bad data


def _save_mask(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def test_mask_of_wrong_size_names_the_file(small_set):
    _save_mask(small_set / "masks" / "00002.png", np.zeros((31, 32)))
    with pytest.raises(DataError, match=r"00002\.png: mask is 32x31 \(WxH\) but its image is 32x32"):
        load_mask_folder(small_set / "images", small_set / "masks", PRE, num_classes=4)


def test_mask_with_unknown_class_id_and_ignore_index(small_set):
    m = np.zeros((32, 32)); m[0, 0] = 7; m[1, 1] = 255
    _save_mask(small_set / "masks" / "00001.png", m)
    with pytest.raises(DataError, match=r"00001\.png: unknown class id\(s\) \[7, 255\]; valid: 0\.\.3"):
        load_mask_folder(small_set / "images", small_set / "masks", PRE, num_classes=4)
    m[0, 0] = 0
    _save_mask(small_set / "masks" / "00001.png", m)
    seg = load_mask_folder(small_set / "images", small_set / "masks", PRE, num_classes=4, ignore_index=255)
    assert int(seg.masks[1, 1, 1]) == 255


def test_missing_mask_corrupt_image_all_reported_together(small_set):
    (small_set / "masks" / "00004.png").unlink()
    (small_set / "images" / "00005.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        load_mask_folder(small_set / "images", small_set / "masks", PRE, num_classes=4)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "no mask" in msg and "00004" in msg
    assert "00005.png: corrupt or unreadable image" in msg


def _edit_coco(root: Path, fn) -> Path:
    p = root / "annotations.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("bbox,pattern", [
    ([30.0, 2.0, 5.0, 4.0], r"box \(30, 2, 35, 6\) \(x1, y1, x2, y2\) is outside the image; valid: 0 <= x1 < x2 <= 32"),
    ([-2.0, 2.0, 5.0, 4.0], r"is outside the image"),
    ([3.0, 2.0, 0.0, 4.0], r"has width 0 and height 4; both must be > 0"),
    ([3.0, 2.0, 4.0, -1.0], r"has width 4 and height -1; both must be > 0"),
])
def test_bad_box_is_refused_with_file_and_valid_range(small_set, bbox, pattern):
    p = _edit_coco(small_set, lambda d: d["annotations"][0].update(bbox=bbox))
    with pytest.raises(DataError, match=pattern) as err:
        load_coco(p, None, PRE, with_masks=False)
    assert "annotations[0]" in str(err.value) and ".png" in str(err.value)


def test_coco_missing_image_unknown_category_and_size_mismatch(small_set):
    def edit(d):
        d["images"][1]["file_name"] = "nope.png"
        d["images"][2]["width"] = 40
        d["annotations"][0]["category_id"] = 9
    p = _edit_coco(small_set, edit)
    with pytest.raises(DataError) as err:
        load_coco(p, None, PRE)
    msg = str(err.value)
    assert "nope.png does not exist" in msg
    assert "the JSON says 40x32 (WxH); the file is 32x32" in msg
    assert "category_id 9 is not in 'categories'; valid: [1, 2, 3]" in msg


def test_coco_corrupt_image_and_bad_json(small_set, tmp_path):
    (small_set / "images" / "00000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"00000\.png: corrupt or unreadable image"):
        load_coco(small_set / "annotations.json", None, PRE)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="need lists annotations, categories"):
        load_coco(bad, small_set / "images", PRE)


def test_coco_polygon_segmentation(tmp_path):
    root = tmp_path / "poly"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 128, np.uint8), mode="L").save(root / "images" / "a.png")
    d = {"images": [{"id": 1, "file_name": "a.png", "height": 16, "width": 16}],
         "categories": [{"id": 5, "name": "dent"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 3, 4, 5],
                          "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]]}]}
    (root / "annotations.json").write_text(json.dumps(d))
    pre = Preprocessing(channels=1, height=16, width=16, mean=[0.5], std=[0.25])
    det = load_coco(root / "annotations.json", None, pre)
    assert det.classes == ["background", "dent"] and det.labels[0].tolist() == [1]
    assert det.masks[0, 4, 3] == 1 and det.masks[0, 0, 0] == 0 and det.masks[0, 4, 10] == 0
    shutil.rmtree(root)
