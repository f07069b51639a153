"""PASCAL VOC detection layout: read and write `Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main`.

    <root>/VOC2007/Annotations/000005.xml   JPEGImages/000005.jpg   ImageSets/Main/trainval.txt

VOC boxes are 1-based and pixel-inclusive (`xmin=1, xmax=W` covers the whole image); records
hold them 0-based with exclusive ends (`x1 = xmin - 1`, `x2 = xmax`), the convention of every
other cnnlab reader, and the writer inverts it. Objects marked `difficult` are kept with
`iscrowd=True`: VOC's protocol neither rewards nor penalises detecting them, and the COCO-style
mAP treats crowd boxes the same way. Labels are 1 + the class's index in `classes`; an object's
`area` is its box's (VOC gives no other).

Bad input is an error naming the file and the object, raised when the set is read (at setup): an
empty image-set list, an id listed twice (or two ids that are one number, 000005 and 5), a missing
or empty xml, malformed xml, no `<size>` / `<width>` / `<height>`, an object without `<name>`, with
an unknown class, without `<bndbox>` or one of its four coordinates, a missing image. Degenerate
boxes are clipped / dropped as in `datamodules.formats.coco`, counted in ONE warning per image set.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from datamodules.formats.coco import BoxCheck, ImageRecord, clean_box

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def voc_dir(root: str | Path, year: str) -> Path:
    """`<root>/VOC<year>` or `<root>/VOCdevkit/VOC<year>` (torchvision's layout), whichever exists."""
    root = Path(root)
    for cand in (root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (cand / "Annotations").is_dir():
            return cand
    raise FileNotFoundError(
        f"no VOC{year} under {root}: expected {root}/VOC{year}/Annotations or "
        f"{root}/VOCdevkit/VOC{year}/Annotations"
    )


def _int(node: ET.Element, tag: str, where: str) -> float:
    text = node.findtext(tag)
    if text is None:
        raise ValueError(f"{where}: no <{tag}>")
    try:
        return float(text)  # some VOC files write coordinates as "273.0"
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: <{tag}> is {text!r}, not a number") from err


def parse_voc_xml(
    path: Path, classes: tuple[str, ...] | list[str], check: BoxCheck
) -> tuple[str, int, int, list[list[float]], list[int], list[bool]]:
    """(file name, width, height, boxes xyxy 0-based, labels, difficult) of one annotation file."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a VOC annotation xml")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: malformed xml: {err}") from err
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size> element (image width and height)")
    w, h = int(_int(size, "width", f"{path} <size>")), int(_int(size, "height", f"{path} <size>"))
    if w <= 0 or h <= 0:
        raise ValueError(f"{path}: <size> is {w}x{h}")
    filename = root.findtext("filename") or f"{path.stem}.jpg"
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{path}: object {k} ({name or 'no name'})"
        if not name:
            raise ValueError(f"{where}: no <name> (its class)")
        if name not in classes:
            raise ValueError(f"{where}: class {name!r} is not one of {list(classes)}")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{where}: no <bndbox>")
        xyxy = [_int(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        record = f"{path.name} object {k}"
        box = clean_box([xyxy[0] - 1, xyxy[1] - 1, xyxy[2], xyxy[3]], w, h, record, check)
        if box is None:
            continue
        boxes.append(box)
        labels.append(classes.index(name) + 1)
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return filename, w, h, boxes, labels, difficult


def read_voc(
    root: str | Path,
    year: str,
    image_set: str,
    *,
    classes: tuple[str, ...] | list[str] = VOC_CLASSES,
    check_files: bool = True,
) -> list[ImageRecord]:
    """Records of the images listed in `ImageSets/Main/<image_set>.txt` of VOC<year>.

    Image ids are the file stems as integers, underscores removed, when they are numeric
    (VOC2007: 000005 -> 5; VOC2012: 2008_000008 -> 2008000008, so 07 and 12 never collide), else
    their position in the list.
    """
    base = voc_dir(root, year)
    listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
    stems = _read_listing(listing)
    ids = _image_ids(stems, listing)
    check = BoxCheck()  # one count, one warning, for the whole image set
    records = []
    for stem, image_id in zip(stems, ids, strict=True):
        xml = base / "Annotations" / f"{stem}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{listing}: image {stem} has no annotation file {xml}")
        filename, w, h, boxes, labels, difficult = parse_voc_xml(xml, classes, check)
        file = base / "JPEGImages" / filename
        if check_files and not file.is_file():
            raise FileNotFoundError(f"{xml}: image file {file} is missing")
        records.append(
            ImageRecord(
                image_id=image_id,
                file=file,
                width=w,
                height=h,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(labels, np.int64),
                iscrowd=np.asarray(difficult, bool),
            )
        )
    check.warn(listing)
    return records


def _read_listing(listing: Path) -> list[str]:
    """The ids of an ImageSets list: the first word of each line (VOC's per-class lists add a flag)."""
    if not listing.is_file():
        raise FileNotFoundError(f"VOC image set not found: {listing}")
    stems = [s.split()[0] for s in listing.read_text().splitlines() if s.strip()]
    if not stems:
        raise ValueError(f"{listing}: empty image set (no ids listed)")
    return stems


def _image_ids(stems: list[str], listing: Path) -> list[int]:
    """One unique integer id per stem (see `read_voc`), or an error naming the two lines."""
    numeric = all(s.replace("_", "").isdigit() for s in stems)
    ids = [int(s.replace("_", "")) if numeric else i + 1 for i, s in enumerate(stems)]
    first: dict[int, int] = {}
    for line, image_id in enumerate(ids):
        if image_id in first:
            j = first[image_id]
            raise ValueError(
                f"{listing}: lines {j + 1} ({stems[j]}) and {line + 1} ({stems[line]}) are the "
                f"same image id {image_id}: an image listed twice would be scored twice"
            )
        first[image_id] = line
    return ids


def voc_xml(record: ImageRecord, classes: tuple[str, ...] | list[str]) -> str:
    """The VOC annotation xml of one record (coordinates rounded to VOC's integer pixels)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = record.file.name
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "0"
    for box, label, hard in zip(
        record.boxes.tolist(), record.labels.tolist(), record.iscrowd.tolist(), strict=True
    ):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = classes[label - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(hard))
        bb = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = box
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(round(v))
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def write_voc(
    root: str | Path,
    year: str,
    image_set: str,
    records: list[ImageRecord],
    classes: tuple[str, ...] | list[str],
) -> Path:
    """Write the xml of `records` and `ImageSets/Main/<image_set>.txt` under `<root>/VOC<year>`.

    The images themselves are the caller's: each record's file should be `JPEGImages/<name>`.
    """
    base = Path(root) / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    sets = base / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    for r in records:
        (base / "Annotations" / f"{r.file.stem}.xml").write_text(voc_xml(r, classes))
    (sets / f"{image_set}.txt").write_text("".join(f"{r.file.stem}\n" for r in records))
    return base
