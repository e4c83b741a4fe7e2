"""Write the synthetic inspection set (textured surfaces with scratch / spot / crack defects).

    python scripts/make_inspection_data.py --count 64 --out calibration/inspection-64

Writes images/ and masks/ (8-bit grayscale PNGs; mask values are class ids, 0 = background),
annotations.json (COCO: boxes and RLE segmentation per defect) and manifest.json (generator
parameters, counts, sha256 of every file and of the whole set). Same seed, same files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.tasks.writer import write_inspection_set


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("calibration/inspection-64"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96, help="image side in pixels (square)")
    ap.add_argument("--max-defects", type=int, default=3)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    m = write_inspection_set(args.out, seed=args.seed, count=args.count, size=args.size,
                             max_defects=args.max_defects, overwrite=args.overwrite)
    print(f"wrote {m['count']} images to {args.out}: defects {m['defects']}")


if __name__ == "__main__":
    main()
