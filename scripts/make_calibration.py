"""Write the bundled calibration set: a class-balanced sample of Fashion-MNIST *train* images.

    python scripts/make_calibration.py --count 500 --out calibration/fashion-mnist-500

Images are written as 8-bit grayscale PNGs in one folder per class, with manifest.json (source,
licence, counts per class, sha256 of every file and of the whole set). The evaluation split
(t10k) is never used for calibration.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgeprune.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, _find_idx, _read_idx, hash_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("calibration/fashion-mnist-500"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    imgs = _read_idx(_find_idx(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(DEBIAN_FASHION_MNIST, "train-labels-idx1-ubyte"))
    rng = np.random.default_rng(args.seed)
    per_class = args.count // len(FASHION_MNIST_CLASSES)
    files, counts = {}, {}
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        (args.out / name).mkdir(parents=True, exist_ok=True)
        for i in sorted(idx):
            p = args.out / name / f"train-{i:05d}.png"
            Image.fromarray(imgs[i], mode="L").save(p, optimize=True)
            files[f"{name}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
        counts[name] = per_class
    manifest = {
        "name": args.out.name,
        "source": "Fashion-MNIST train split (Debian package dataset-fashion-mnist, train-images-idx3-ubyte.gz)",
        "licence": "MIT (Zalando Research, Fashion-MNIST)",
        "selection": f"class-balanced uniform sample without replacement, numpy default_rng seed {args.seed}",
        "count": sum(counts.values()),
        "counts": counts,
        "image": {"format": "png", "mode": "L", "height": 28, "width": 28},
        "sha256": hash_files(sorted(args.out.glob("*/*.png"))),
        "files": files,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {manifest['count']} images to {args.out}")


if __name__ == "__main__":
    main()
