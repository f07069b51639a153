"""COCO instances json: read with pycocotools into per-image records, and write.

Every detection reader in cnnlab returns `ImageRecord`s: one image file, its size, and its
boxes as 0-based xyxy float32 pixels (x2, y2 exclusive, COCO's `[x, y, w, h]` -> `[x, y, x+w, y+h]`),
labels (the data set's own category ids; 0 is background), `iscrowd` (COCO crowd regions,
VOC `difficult` objects): ignored by the mAP, not trained on, and `area`: COCO's annotation
`area` (the segment's pixels, which COCOeval's small / medium / large buckets use), the box's area
when an annotation has none, and for VOC.

Bad input is an error naming the file and the record, raised when the file is read (at setup):
an empty or malformed json, no images, two images (or two annotations) with one id, an image entry
without id / file_name / width / height, an annotation for an image id that is not in `images`, a
category id missing from `categories`, a bbox that is not four numbers, a missing image file.
pycocotools itself would silently keep the last of two images with one id, or fail with a bare
KeyError. Degenerate boxes are the documented exception: a box partly outside the image is clipped to it;
one with width or height <= 0 after clipping (or entirely outside) is dropped. Both are counted
and reported in one warning per file, never silently: a dropped box cannot be detected, so it
must not count as a miss, and a clipped one is what any detector can at best predict.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ImageRecord:
    """One image and its objects, as every detection reader returns them."""

    image_id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (N, 4) xyxy
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,)
    # (N,) object areas in pixels: COCO's `area` (the segment's, what its size buckets use), else
    # the box's; None (records built by hand) means the box areas
    area: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.area is None:
            b = self.boxes
            self.area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)


@dataclass
class BoxCheck:
    """Counts of what `clean_box` did to one file's boxes (for the warning)."""

    clipped: int = 0
    dropped: list[str] = field(default_factory=list)

    def warn(self, source: Path) -> None:
        if self.clipped or self.dropped:
            shown = ", ".join(self.dropped[:5]) + (" ..." if len(self.dropped) > 5 else "")
            warnings.warn(
                f"{source}: clipped {self.clipped} box(es) to their image and dropped "
                f"{len(self.dropped)} degenerate box(es) (width or height <= 0 inside the image)"
                + (f": {shown}" if self.dropped else ""),
                stacklevel=3,
            )


def clean_box(
    xyxy: list[float], width: int, height: int, record: str, check: BoxCheck
) -> list[float] | None:
    """`xyxy` clipped to the image, or None (counted in `check`) if nothing of it is left."""
    x1, y1, x2, y2 = xyxy
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
    c += [min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
        check.dropped.append(record)
        return None
    if c != [x1, y1, x2, y2]:
        check.clipped += 1
    return c


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{path}: empty file ({len(text)} bytes), not a COCO instances json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed json: {err}") from err
    if not isinstance(data, dict) or not all(
        k in data for k in ("images", "annotations", "categories")
    ):
        raise ValueError(
            f"{path}: not a COCO instances file (needs images, annotations, categories)"
        )
    if not data["images"]:
        raise ValueError(f"{path}: no images (its `images` list is empty)")
    return data


def _check_images(data: dict[str, Any], path: Path) -> set[int]:
    """The image ids of `data`, each image entry complete and its id unique."""
    names: dict[int, str] = {}
    for k, im in enumerate(data["images"]):
        missing = [key for key in ("id", "file_name", "width", "height") if key not in im]
        if missing:
            raise ValueError(f"{path}: images[{k}] has no {', '.join(missing)}")
        image_id = int(im["id"])
        if image_id in names:
            raise ValueError(
                f"{path}: image id {image_id} appears twice in images ({names[image_id]} and "
                f"{im['file_name']}): one id must name one image"
            )
        names[image_id] = str(im["file_name"])
    return set(names)


def _check_annotations(data: dict[str, Any], path: Path, categories: dict[int, str]) -> None:
    """Every annotation has a unique id, a known image and category, and an [x, y, w, h] bbox."""
    image_ids, ann_ids = _check_images(data, path), set()
    for k, ann in enumerate(data["annotations"]):
        if "id" not in ann:
            raise ValueError(f"{path}: annotations[{k}] has no id")
        where = f"{path}: annotation id {ann['id']}"
        if ann["id"] in ann_ids:
            raise ValueError(f"{where} appears twice: annotation ids must be unique")
        ann_ids.add(ann["id"])
        if int(ann.get("image_id", -1)) not in image_ids:
            raise ValueError(f"{where} points to image id {ann.get('image_id')}, not in images")
        if int(ann.get("category_id", -1)) not in categories:
            raise ValueError(
                f"{where} has category id {ann.get('category_id')}, not in categories "
                f"{sorted(categories)}"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise ValueError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
        if "area" in ann and not (_number(ann["area"]) and ann["area"] >= 0):
            raise ValueError(f"{where}: area must be a number >= 0, got {ann['area']!r}")


def _box_area(xyxy: list[float]) -> float:
    return (xyxy[2] - xyxy[0]) * (xyxy[3] - xyxy[1])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def read_coco(
    ann_file: str | Path, images_dir: str | Path, *, check_files: bool = True
) -> tuple[list[ImageRecord], dict[int, str]]:
    """Records of every image in `ann_file` (images without objects included) and {id: name}.

    Loaded through pycocotools' `COCO` (the index the evaluation uses too). `check_files`: every
    image file must exist under `images_dir` (one stat per image).
    """
    from pycocotools.coco import COCO  # imported here: only the COCO reader needs it

    ann_file, images_dir = Path(ann_file), Path(images_dir)
    data = _load_json(ann_file)
    categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    _check_annotations(data, ann_file, categories)  # pycocotools would fail without naming them
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    check = BoxCheck()
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        file = images_dir / info["file_name"]
        if check_files and not file.is_file():
            raise FileNotFoundError(
                f"{ann_file}: image id {image_id} refers to missing file {file}"
            )
        w, h = int(info["width"]), int(info["height"])
        boxes, labels, crowd, area = [], [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            box = clean_box([x, y, x + bw, y + bh], w, h, f"annotation id {ann['id']}", check)
            if box is None:
                continue
            boxes.append(box)
            labels.append(int(ann["category_id"]))
            crowd.append(bool(ann.get("iscrowd", 0)))
            # the object's own area (COCO: its segment's) when given: COCOeval's size buckets
            area.append(float(ann["area"]) if "area" in ann else _box_area(box))
        records.append(
            ImageRecord(
                image_id=int(image_id),
                file=file,
                width=w,
                height=h,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(labels, np.int64),
                iscrowd=np.asarray(crowd, bool),
                area=np.asarray(area, np.float32),
            )
        )
    check.warn(ann_file)
    return records, categories


def coco_dict(records: list[ImageRecord], categories: dict[int, str]) -> dict[str, Any]:
    """The COCO instances dict of `records` (file names relative to the images dir)."""
    images, annotations = [], []
    for r in records:
        images.append(
            {"id": r.image_id, "file_name": r.file.name, "width": r.width, "height": r.height}
        )
        for box, label, crowd, area in zip(
            r.boxes.tolist(), r.labels.tolist(), r.iscrowd.tolist(), r.area.tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r.image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],  # xywh
                    "area": area,  # the record's (box area unless read from COCO's `area`)
                    "iscrowd": int(crowd),
                }
            )
    cats = [{"id": i, "name": n, "supercategory": "object"} for i, n in sorted(categories.items())]
    return {"images": images, "annotations": annotations, "categories": cats}


def write_coco(path: str | Path, records: list[ImageRecord], categories: dict[int, str]) -> Path:
    """Write `records` as a COCO instances json at `path` (the images are the caller's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_dict(records, categories)))
    return path
