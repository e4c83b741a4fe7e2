"""Data sets: Fashion-MNIST idx files, image folders (class per sub-folder), calibration sets.

Everything returns normalized float tensors shaped like the model input, (N, C, H, W), with the
preprocessing of :class:`edgeprune.config.Preprocessing` applied, so that PyTorch, ONNX Runtime
and every compiled artifact see exactly the same numbers.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataConfig, DatasetKind, Preprocessing, REPO_ROOT
from .errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class TensorData:
    """Images (N, C, H, W) float32, normalized; labels (N,) int64; class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "TensorData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorData(self.images[idx], self.labels[idx], self.classes, self.source)

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.images[i : i + batch_size], self.labels[i : i + batch_size]


# ----------------------------------------------------------------------------- preprocessing


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> normalized."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def pil_to_tensor(img, pre: Preprocessing) -> torch.Tensor:
    """A PIL image -> (C, H, W) float in [0, 1], converted and resized to the preprocessing."""
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(pre.channels)
    if mode is None:
        raise DataError(f"channels={pre.channels} is not supported for images; valid: 1, 3, 4")
    img = img.convert(mode)
    if img.size != (pre.width, pre.height):
        img = img.resize((pre.width, pre.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (C, H, W)


def check_load_memory(n: int, pre: Preprocessing, what: str) -> None:
    """Refuse (ResourceError) before loading ``n`` images of ``pre.shape`` that cannot fit in memory as
    float32 tensors: twice their size, since each set is built from a copy (resize, normalize, stack)."""
    from .safety import check_memory

    check_memory(2 * 4 * n * math.prod(pre.shape),
                 f"loading {what} ({n:,} images of {'x'.join(map(str, pre.shape))}, float32)",
                 setting="data.preprocessing.height / width, or the number of images (data.max_train_images, "
                         "data.max_eval_images, data.calibration_count)")


def _from_uint8(raw: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """(N, H, W) uint8 grayscale -> (N, C, H, W) normalized, resized if needed."""
    x = torch.from_numpy(raw.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)
    if (x.shape[2], x.shape[3]) != (pre.height, pre.width):
        x = torch.nn.functional.interpolate(x, size=(pre.height, pre.width), mode="bilinear", align_corners=False)
    if pre.channels != 1:
        x = x.expand(-1, pre.channels, -1, -1).contiguous()
    return normalize(x, pre)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from exc
    if len(data) < 8:
        raise DataError(f"{path} is not an idx file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}",
        hint="install it with `apt-get install dataset-fashion-mnist` or set data.root to the idx folder",
    )


def load_fashion_mnist(root: Optional[Path], split: str, pre: Preprocessing, limit: Optional[int] = None) -> TensorData:
    root = Path(root) if root else DEBIAN_FASHION_MNIST
    prefix = {"train": "train", "eval": "t10k", "test": "t10k"}[split]
    imgs = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {root}: images {imgs.shape} and labels {labels.shape} do not match")
    if limit:
        imgs, labels = imgs[:limit], labels[:limit]
    check_load_memory(len(imgs), pre, f"the Fashion-MNIST {split} split")
    x = _from_uint8(imgs, pre)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorData(x, y, list(FASHION_MNIST_CLASSES), f"fashion-mnist:{root}:{split}")


# ----------------------------------------------------------------------------- image folders


_WARNED_LINKS: set[str] = set()


def scan_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}", hint="expected root/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders", hint="expected root/<class>/<image files>")
    items: list[tuple[Path, int]] = []
    skipped: list[str] = []
    for ci, cname in enumerate(classes):
        for p in sorted((root / cname).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((p, ci))
            elif p.is_symlink() and (not p.exists() or p.is_dir()):  # a loop, a dangling or a folder link
                skipped.append(str(p.relative_to(root)))
    if skipped and str(root) not in _WARNED_LINKS:  # once per folder (the calibration set is scanned twice)
        _WARNED_LINKS.add(str(root))
        print(f"warning: {root}: skipped {len(skipped)} symbolic link(s) that loop, point nowhere or point to a "
              f"folder (not followed): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    if not items:
        raise DataError(f"{root} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    empty = sorted(set(classes) - {classes[ci] for _, ci in items})
    if empty:  # an empty folder still takes a label index and shifts every class after it
        raise DataError(f"{root}: class folder(s) without images: {', '.join(empty)}",
                        hint="remove the empty class folders or add images to them")
    return items, classes


def class_folders(root: Path) -> list[str]:
    """The class names of an image folder (its sorted sub-folders), without reading any image."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}", hint="expected root/<class>/<image files>")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _bad_image_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a corrupt, unreadable or decompression-bomb image."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning)


@contextlib.contextmanager
def _open_image(path: Path):
    """PIL's Image.open with its decompression-bomb warning raised as an error (a bad image)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def load_image(path: Path, pre: Preprocessing) -> torch.Tensor:
    try:
        with _open_image(path) as img:
            img.load()
            return pil_to_tensor(img, pre)
    except _bad_image_errors() as exc:
        raise DataError(
            f"corrupt or unreadable image {path}: {exc}",
            hint=f"remove or replace the file; readable formats: {', '.join(IMAGE_EXTENSIONS)}",
        ) from exc


class ImageFolderDataset(Dataset):
    """Lazy image-folder dataset; every file is checked to open when the set is built."""

    def __init__(self, root: Path, pre: Preprocessing, *, verify: bool = True):
        self.items, self.classes = scan_image_folder(root)
        self.pre = pre
        self.root = Path(root)
        if verify:
            self.verify()

    def verify(self) -> None:
        for path, _ in self.items:
            try:
                with _open_image(path) as img:
                    img.verify()
            except _bad_image_errors() as exc:
                raise DataError(f"corrupt or unreadable image {path}: {exc}",
                                hint="remove or replace the file") from exc

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        x = load_image(path, self.pre).unsqueeze(0)  # (1, C, H, W)
        return normalize(x, self.pre)[0], label


def load_image_folder(root: Path, pre: Preprocessing, limit: Optional[int] = None, seed: int = 0) -> TensorData:
    ds = ImageFolderDataset(root, pre)
    idx = list(range(len(ds)))
    if limit and limit < len(idx):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(idx), generator=g)[:limit].sort().values.tolist()
    check_load_memory(len(idx), pre, f"image folder {root}")
    xs, ys = zip(*(ds[i] for i in idx))
    return TensorData(torch.stack(xs), torch.tensor(ys, dtype=torch.long), ds.classes, f"image-folder:{root}")


# ----------------------------------------------------------------------------- entry points


@overload
def _resolve(p: Path) -> Path: ...


@overload
def _resolve(p: Optional[Path]) -> Optional[Path]: ...



def _resolve(p: Optional[Path]) -> Optional[Path]:
    if p is None:
        return None
    p = Path(p)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def load_split(cfg: DataConfig, split: str) -> TensorData:
    """``split`` is ``train`` or ``eval``; limited by max_train_images / max_eval_images."""
    limit = cfg.max_train_images if split == "train" else cfg.max_eval_images
    pre = cfg.preprocessing
    if cfg.kind == DatasetKind.fashion_mnist:
        data = load_fashion_mnist(_resolve(cfg.root), split, pre, limit)
    else:
        data = load_image_folder(split_folder(cfg, split), pre, limit)
    if cfg.class_names:
        data.classes = list(cfg.class_names)
    return data


def split_folder(cfg: DataConfig, split: str) -> Path:
    """The image folder of ``split`` (train | eval) when data.kind is image-folder."""
    if cfg.root is None:
        raise DataError("data.root must point at an image folder when data.kind is image-folder")
    root = _resolve(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder", hint="expected root/<class>/<image files>")
    if split == "train":
        return root / "train" if (root / "train").is_dir() else root
    sub = _resolve(cfg.eval_root) if cfg.eval_root else next(
        (root / s for s in ("val", "test", "eval") if (root / s).is_dir()), None)
    if sub is None:
        raise DataError(f"no eval split under {root}: expected val/, test/ or eval/, or set data.eval_root")
    return sub


def train_val_split(data: TensorData, val_fraction: float, seed: int = 0) -> tuple[TensorData, TensorData]:
    n_val = int(round(len(data) * val_fraction))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])


@dataclass
class CalibrationSet:
    data: TensorData
    path: Path
    sha256: str
    manifest: dict

    def summary(self) -> dict:
        return {"path": str(self.path), "count": len(self.data), "sha256": self.sha256,
                "shape": list(self.data.images.shape[1:]), "source": self.manifest.get("source")}


def hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def load_calibration(cfg: DataConfig, count: Optional[int] = None) -> CalibrationSet:
    """The calibration image folder; refused when too small or not the model's input shape."""
    root = _resolve(cfg.calibration)
    pre = cfg.preprocessing
    ds = ImageFolderDataset(root, pre)
    want = count or cfg.calibration_count
    n = min(want, len(ds))
    if n < cfg.min_calibration:
        raise DataError(
            f"calibration set {root} has {len(ds)} images; at least {cfg.min_calibration} are needed",
            hint="add images or lower data.min_calibration",
        )
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    data = load_image_folder(root, pre, limit=n)
    if tuple(data.images.shape[1:]) != pre.shape:
        raise DataError(f"calibration images are {tuple(data.images.shape[1:])}, model input is {pre.shape}")
    used = [ds.items[i][0] for i in range(len(ds))] if n == len(ds) else None
    sha = hash_files(used) if used else hashlib.sha256(data.images.numpy().tobytes()).hexdigest()
    return CalibrationSet(data, root, sha, manifest)
