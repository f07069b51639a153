"""Write DigitCanvas scenes in the real COCO or VOC on-disk layout.

    python scripts/make_digit_canvases.py --format coco --out data/digits_coco --n 500 --split test
    python scripts/make_digit_canvases.py --format voc --out data/digits_voc --n 500 --split val

COCO: <out>/<split>/000001.png and <out>/annotations/instances_<split>.json.
VOC:  <out>/VOC<year>/JPEGImages/000001.jpg, Annotations/000001.xml, ImageSets/Main/<split>.txt.
Scene i of a split is DigitCanvas's scene i (image id i + 1) with the same scene settings as the
`digits` source of `DetectionDataModule`, so a model trained on the fly can be evaluated on these
files through the COCO / VOC readers, and vice versa. Category ids: 1..10 = digit + 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.detection import DIGIT_SCENES  # noqa: E402
from datamodules.digits import DigitCanvas  # noqa: E402
from datamodules.formats.coco import ImageRecord, write_coco  # noqa: E402
from datamodules.formats.voc import write_voc  # noqa: E402

DIGIT_CATEGORIES = {d + 1: str(d) for d in range(10)}  # category id -> name; 0 is background
DIGIT_CLASSES = [str(d) for d in range(10)]  # VOC class names: label = index + 1 = digit + 1


def write_scenes(
    images_dir: Path, split: str, n: int, ext: str = "png", **scene: Any
) -> list[ImageRecord]:
    """Save scenes 0..n-1 of `split` as `images_dir/NNNNNN.<ext>`; their records (ids from 1)."""
    settings = {**DIGIT_SCENES, **scene}
    canvas = DigitCanvas(split, length=n, channels=3, **settings)  # type: ignore[arg-type]
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        s = canvas[i]
        pixels = (s["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
        file = images_dir / f"{i + 1:06d}.{ext}"
        Image.fromarray(pixels).save(file, **({"quality": 95} if ext == "jpg" else {}))
        records.append(
            ImageRecord(
                image_id=i + 1,
                file=file,
                width=pixels.shape[1],
                height=pixels.shape[0],
                boxes=s["boxes"].numpy(),
                labels=s["labels"].numpy(),
                iscrowd=np.zeros(len(s["labels"]), bool),
            )
        )
    return records


def make(fmt: str, out: Path, n: int, split: str, year: str = "2007", **scene: Any) -> Path:
    """Write `n` scenes of `split` under `out`; returns the annotation json (COCO) or VOC dir."""
    if fmt == "coco":
        records = write_scenes(out / split, split, n, "png", **scene)
        return write_coco(
            out / "annotations" / f"instances_{split}.json", records, DIGIT_CATEGORIES
        )
    if fmt == "voc":
        records = write_scenes(out / f"VOC{year}" / "JPEGImages", split, n, "jpg", **scene)
        return write_voc(out, year, split, records, DIGIT_CLASSES)
    raise ValueError(f"unknown format {fmt!r}; valid: coco, voc")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--format", choices=("coco", "voc"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=500, help="number of scenes")
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument("--year", default="2007", help="VOC only: writes <out>/VOC<year>")
    p.add_argument("--size", type=int, default=DIGIT_SCENES["size"], help="canvas side in pixels")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    path = make(args.format, args.out, args.n, args.split, args.year, size=args.size)
    print(f"wrote {args.n} {args.split} scenes: {path}")


if __name__ == "__main__":
    main()
