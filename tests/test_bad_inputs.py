"""The bad-input catalogue: every malformed file a data set can hold, and what cnnlab does with it.

Each case has one documented outcome (the README's "Bad input" table): a clear error
naming the file, the record and the problem, raised when the annotations are read (setup) or when
the image is read (`__getitem__`); or a conversion / counted skip with ONE warning giving the
count. Fixtures are tiny files in the real on-disk formats, written into tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.classification import ClassificationDataModule
from datamodules.detection import DetectionDataModule
from datamodules.formats.coco import read_coco
from datamodules.formats.image import open_image
from datamodules.formats.voc import read_voc
from datamodules.images import ImageDataModule
from datamodules.segmentation import SegmentationDataModule
from lit_modules.transfer import TransferClassifier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ["imagefolder", "coco", "voc_seg", "gan"]  # every DataModule that reads image files
SIDE = 8  # fixture images are SIDE x SIDE constants


# ----------------------------------------------------------------------------- image writers


def _png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit PNG, gray (H, W) or RGB (H, W, 3). PIL cannot write 16-bit RGB, so the four
    chunks are written here (the PNG spec: signature, IHDR, zlib-compressed rows, IEND)."""
    h, w = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _constant(mode: str, value: Any) -> Image.Image:
    return Image.new(mode, (SIDE, SIDE), value)


# mode -> (writer, the RGB values every DataModule must see). Grayscale, RGBA, CMYK and 16-bit
# files are converted, not refused: RGB is what a classifier / detector / FCN expects.
MODES: dict[str, tuple[Callable[[Path], None], tuple[int, int, int]]] = {
    "grayscale": (lambda p: _constant("L", 100).save(p, format="PNG"), (100, 100, 100)),
    # transparency is composited on black: 200 * 128 / 255 = 100.4 -> 100
    "rgba": (lambda p: _constant("RGBA", (200, 100, 50, 128)).save(p, format="PNG"), (100, 50, 25)),
    "cmyk": (lambda p: _constant("CMYK", (0, 128, 255, 0)).save(p, format="JPEG"), (255, 127, 0)),
    # 16-bit is scaled (v / 257), not clipped: 25700 -> 100, where a clip would give 255
    "gray16": (lambda p: _png16(p, np.full((SIDE, SIDE), 25700, np.uint16)), (100, 100, 100)),
    "rgb16": (
        lambda p: _png16(p, np.full((SIDE, SIDE, 3), (65535, 25700, 0), np.uint16)),
        (255, 100, 0),
    ),
}


def _noise_jpeg(path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    return path.read_bytes()


def _corrupt_jpeg(path: Path) -> None:
    """A JPEG cut off mid-scan: its header parses, its pixels do not."""
    data = _noise_jpeg(path)
    path.write_bytes(data[: len(data) // 2])


def _not_a_jpeg(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not JPEG data" * 4)


def _truncated_png(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:-300])


# ----------------------------------------------------------------------------- one image, any reader


def _image_path(kind: str, root: Path) -> Path:
    """Where `kind`'s fixture keeps its one image (VOC names images .jpg whatever their bytes)."""
    return {
        "imagefolder": root / "val" / "a" / "0.png",
        "coco": root / "val" / "0.png",
        "voc_seg": root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg",
        "gan": root / "val" / "0.png",
    }[kind]


def _write_fixture(kind: str, root: Path, write: Callable[[Path], None]) -> Path:
    """A val split of `kind`'s real format holding one image, written by `write`."""
    path = _image_path(kind, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    if kind == "coco":
        image = {"id": 1, "file_name": path.name, "width": SIDE, "height": SIDE}
        data = {"images": [image], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    if kind == "voc_seg":
        voc = path.parents[1]
        _save_mask(voc / "SegmentationClass" / f"{path.stem}.png", np.zeros((SIDE, SIDE)))
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
        (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{path.stem}\n")
    return path


def _datamodule(kind: str, root: Path, **kw: Any) -> Any:
    if kind == "imagefolder":
        return ClassificationDataModule(
            "imagefolder", str(root), image_size=SIDE, num_workers=0, **kw
        )
    if kind == "coco":
        return DetectionDataModule(source="coco", root=str(root), val_split="val", **kw)
    if kind == "voc_seg":
        return SegmentationDataModule(source="voc", root=str(root), crop_size=None, **kw)
    return ImageDataModule(dataset="imagefolder", root=str(root), channels=3, **kw)


def _read_rgb(kind: str, root: Path) -> torch.Tensor:
    """The (3,) mean pixel values, in 0..255, of the one val image as `kind`'s DataModule gives it."""
    dm = _datamodule(kind, root)
    with warnings.catch_warnings():  # the GAN folder's "converting N image(s)": tested below
        warnings.simplefilter("ignore")
        dm.setup("validate")
    item = dm.val_dataloader().dataset[0]
    x = item if kind == "gan" else item[0]  # (3, H, W)
    if kind in ("imagefolder", "voc_seg"):  # ImageNet-normalised
        x = (
            x * torch.tensor(IMAGENET_STD)[:, None, None]
            + torch.tensor(IMAGENET_MEAN)[:, None, None]
        )
    elif kind == "gan":  # [-1, 1]
        x = (x + 1) / 2
    assert x.shape[0] == 3
    return x.mean(dim=(1, 2)) * 255


# ----------------------------------------------------------------------------- 1-2 unreadable images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "write", [_corrupt_jpeg, _not_a_jpeg, _truncated_png], ids=["cut_jpeg", "not_jpeg", "cut_png"]
)
def test_unreadable_image_is_an_error_naming_the_file(
    tmp_path: Path, kind: str, write: Callable[[Path], None]
) -> None:
    """Corrupt JPEG / truncated PNG. Folders (imagefolder, GAN) check headers at setup; the
    annotated formats (COCO, VOC) read pixels lazily, so the error comes from `__getitem__`."""
    path = _write_fixture(kind, tmp_path, write)
    with pytest.raises(OSError, match=re.escape(str(path)) + r".*not a readable image") as err:
        _read_rgb(kind, tmp_path)
    if kind == "coco":
        assert "image id 1" in str(err.value)
    if kind == "voc_seg":
        assert "2007_000001" in str(err.value)


def test_unreadable_images_are_skipped_and_counted_in_one_warning(tmp_path: Path) -> None:
    """imagefolder with `skip_bad_images: true`: dropped, listed, ONE warning with the count."""
    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (SIDE, SIDE)).save(tmp_path / "val" / cls / "ok.png")
    bad = [tmp_path / "val" / "a" / "cut.jpg", tmp_path / "val" / "b" / "cut.png"]
    _corrupt_jpeg(bad[0])
    _truncated_png(bad[1])
    dm = _datamodule("imagefolder", tmp_path, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image") as record:
        dm.setup("validate")
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert sorted(dm.skipped_images) == sorted(map(str, bad))
    assert len(dm.val_dataloader().dataset) == 2


def test_a_bad_image_found_later_is_an_error_naming_it(tmp_path: Path) -> None:
    """The setup check is a header parse; a file broken after it still fails by name."""
    path = _write_fixture("imagefolder", tmp_path, MODES["grayscale"][0])
    dm = _datamodule("imagefolder", tmp_path)
    dm.setup("validate")
    _truncated_png(path)
    with pytest.raises(OSError, match=re.escape(str(path)) + r": not a readable image"):
        dm.val_dataloader().dataset[0]


# ----------------------------------------------------------------------------- 3-6 image modes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_are_converted_to_rgb(tmp_path: Path, kind: str, mode: str) -> None:
    """RGBA, CMYK, 16-bit and grayscale images come out as 8-bit RGB with the right values."""
    write, expected = MODES[mode]
    _write_fixture(kind, tmp_path, write)
    values = _read_rgb(kind, tmp_path)
    tol = 3.0 if mode == "cmyk" else 1.0  # JPEG is lossy
    torch.testing.assert_close(
        values, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0
    )


def test_gan_folder_counts_converted_images_in_one_warning(tmp_path: Path) -> None:
    """The GAN folder converts other modes with ONE warning giving the count, or refuses them
    with `mixed_modes: error`."""
    (tmp_path / "val").mkdir()
    for i, mode in enumerate(MODES):
        MODES[mode][0](tmp_path / "val" / f"{i}.png")
    _constant("RGB", (1, 2, 3)).save(tmp_path / "val" / "rgb.png")
    # 16-bit RGB opens as 8-bit RGB in PIL (already scaled): the other four are converted
    with pytest.warns(UserWarning, match=r"converting 4 image\(s\) to RGB") as record:
        _datamodule("gan", tmp_path).setup("validate")
    assert len([w for w in record if "converting" in str(w.message)]) == 1
    strict = _datamodule("gan", tmp_path, mixed_modes="error")
    with pytest.raises(ValueError, match=r"mixed modes.*I;16.*mixed_modes: convert"):
        strict.setup("validate")


def test_open_image_channels_1_scales_16_bit(tmp_path: Path) -> None:
    MODES["gray16"][0](tmp_path / "g.png")
    gray = open_image(tmp_path / "g.png", channels=1)
    assert gray.mode == "L" and gray.getextrema() == (100, 100)


# ----------------------------------------------------------------------------- annotation writers


def _coco(root: Path, *, images: list[dict] | None = None, **ann: Any) -> Path:
    """root/imgs/a.png (50x40) and root/ann.json with one annotation (id 7), changed by `ann`."""
    (root / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (50, 40)).save(root / "imgs" / "a.png")
    annotation = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0}
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "annotations": [{**annotation, **ann}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


VOC_XML = """<annotation><filename>{stem}.jpg</filename>{size}
<object><name>1</name><difficult>0</difficult>{box}</object></annotation>"""
SIZE = "<size><width>64</width><height>64</height><depth>3</depth></size>"
BOX = "<bndbox><xmin>3</xmin><ymin>3</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
CLASSES = [str(d) for d in range(10)]


def _voc(root: Path, xmls: dict[str, str], listing: str | None = None) -> Path:
    """VOC2007 with `xmls` ({stem: xml}) and ImageSets/Main/val.txt listing them (or `listing`)."""
    base = root / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for stem, xml in xmls.items():
        (base / "Annotations" / f"{stem}.xml").write_text(xml)
        Image.new("RGB", (64, 64)).save(base / "JPEGImages" / f"{stem}.jpg")
    text = listing if listing is not None else "".join(f"{s}\n" for s in xmls)
    (base / "ImageSets" / "Main" / "val.txt").write_text(text)
    return base


def _box(x1: int, y1: int, x2: int, y2: int) -> str:
    return f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"


# ----------------------------------------------------------------------------- 7 empty files


def test_empty_coco_file(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match=r"empty\.json: empty file \(0 bytes\)"):
        read_coco(tmp_path / "empty.json", tmp_path)
    no_images = _coco(tmp_path)
    no_images.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match=r"ann\.json: no images"):
        read_coco(no_images, tmp_path)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: malformed json"):
        read_coco(tmp_path / "broken.json", tmp_path)


def test_empty_voc_files(tmp_path: Path) -> None:
    base = _voc(tmp_path, {"000001": ""})
    with pytest.raises(ValueError, match=r"000001\.xml: empty file \(0 bytes\)"):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"val\.txt: empty image set"):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)


def test_empty_segmentation_list(tmp_path: Path) -> None:
    _write_fixture("voc_seg", tmp_path, MODES["grayscale"][0])
    listing = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text("")
    with pytest.raises(ValueError, match=r"val\.txt names no image"):
        _datamodule("voc_seg", tmp_path).setup("validate")


# ----------------------------------------------------------------------------- 8-9 degenerate boxes


@pytest.mark.parametrize(
    ("bbox", "kept"),
    [
        ([5, 5, 0, 10], None),  # zero width
        ([5, 5, 10, -1], None),  # negative height
        ([60, 5, 10, 10], None),  # entirely outside the 50x40 image
        ([45, 35, 10, 10], [45, 35, 50, 40]),  # partly outside: clipped
    ],
    ids=["zero_width", "negative_height", "outside", "partly_outside"],
)
def test_coco_degenerate_box_is_dropped_or_clipped_and_counted(
    tmp_path: Path, bbox: list[float], kept: list[float] | None
) -> None:
    with pytest.warns(UserWarning, match=r"ann\.json: clipped \d box.*dropped \d degenerate") as w:
        records, _ = read_coco(_coco(tmp_path, bbox=bbox), tmp_path / "imgs")
    assert len(w) == 1
    if kept is None:
        assert "annotation id 7" in str(w[0].message)
        assert records[0].boxes.shape == (0, 4)  # the image stays, without the box
    else:
        np.testing.assert_allclose(records[0].boxes, [kept])


def test_voc_boxes_outside_the_image_give_one_counted_warning(tmp_path: Path) -> None:
    xmls = {
        "000001": VOC_XML.format(stem="000001", size=SIZE, box=_box(50, 50, 80, 70)),  # clipped
        "000002": VOC_XML.format(stem="000002", size=SIZE, box=_box(70, 3, 90, 20)),  # outside
        "000003": VOC_XML.format(stem="000003", size=SIZE, box=_box(10, 3, 10, 20)),  # 1 px wide
        "000004": VOC_XML.format(stem="000004", size=SIZE, box=_box(-5, 3, 20, 20)),  # clipped
    }
    _voc(tmp_path, xmls)
    with pytest.warns(UserWarning) as record:
        records = read_voc(tmp_path, "2007", "val", classes=CLASSES)
    assert len(record) == 1  # one warning for the whole image set, with the counts
    message = str(record[0].message)
    assert "val.txt: clipped 2 box(es)" in message and "dropped 1 degenerate" in message
    assert "000002.xml object 0" in message
    np.testing.assert_allclose(records[0].boxes, [[49, 49, 64, 64]])
    assert records[1].boxes.shape == (0, 4) and records[2].boxes.shape == (1, 4)


# ----------------------------------------------------------------------------- 10 unknown category


def test_unknown_category_is_an_error_naming_the_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ann\.json: annotation id 7 has category id 5, not in"):
        read_coco(_coco(tmp_path, category_id=5), tmp_path / "imgs")
    cat = VOC_XML.format(stem="000001", size=SIZE, box=BOX).replace("<name>1", "<name>cat")
    _voc(tmp_path, {"000001": cat})
    with pytest.raises(ValueError, match=r"000001\.xml: object 0 \(cat\): class 'cat' is not one"):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)


# ----------------------------------------------------------------------------- 11 duplicate ids


def test_duplicate_coco_ids_are_errors(tmp_path: Path) -> None:
    twice = [
        {"id": 1, "file_name": "a.png", "width": 50, "height": 40},
        {"id": 1, "file_name": "b.png", "width": 50, "height": 40},
    ]
    with pytest.raises(
        ValueError, match=r"ann\.json: image id 1 appears twice in images \(a\.png and b\.png\)"
    ):
        read_coco(_coco(tmp_path, images=twice), tmp_path / "imgs")
    path = _coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] *= 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ann\.json: annotation id 7 appears twice"):
        read_coco(path, tmp_path / "imgs")


def test_duplicate_voc_ids_are_errors(tmp_path: Path) -> None:
    xml = VOC_XML.format(stem="000005", size=SIZE, box=BOX)
    _voc(tmp_path, {"000005": xml}, listing="000005\n000005\n")
    with pytest.raises(
        ValueError, match=r"val\.txt: lines 1 \(000005\) and 2 \(000005\) are the same image id 5"
    ):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)
    _voc(tmp_path, {"000005": xml, "5": xml})  # two files, one number
    with pytest.raises(ValueError, match=r"lines 1 \(000005\) and 2 \(5\) are the same image id 5"):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)


def test_evaluation_splits_sharing_image_ids_are_an_error(tmp_path: Path) -> None:
    """Two COCO files in one test set, both with image id 1: the mAP would mix their boxes."""
    _write_fixture("coco", tmp_path, MODES["grayscale"][0])
    (tmp_path / "val2").mkdir()
    MODES["grayscale"][0](tmp_path / "val2" / "0.png")
    ann = tmp_path / "annotations"
    (ann / "instances_val2.json").write_text((ann / "instances_val.json").read_text())
    dm = DetectionDataModule(source="coco", root=str(tmp_path), test_split=["val", "val2"])
    with pytest.raises(
        ValueError, match=r"image id 1 of .*val2/0\.png is also the id of .*val/0\.png"
    ):
        dm.setup("test")


# ----------------------------------------------------------------------------- 12 VOC xml tags


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (VOC_XML.format(stem="x", size="", box=BOX), r"x\.xml: no <size>"),
        (
            VOC_XML.format(stem="x", size=SIZE.replace("<width>64</width>", ""), box=BOX),
            r"x\.xml <size>: no <width>",
        ),
        (VOC_XML.format(stem="x", size=SIZE, box=""), r"x\.xml: object 0 \(1\): no <bndbox>"),
        (
            VOC_XML.format(stem="x", size=SIZE, box=BOX.replace("<xmin>3</xmin>", "")),
            r"x\.xml: object 0 \(1\): no <xmin>",
        ),
        (
            VOC_XML.format(stem="x", size=SIZE, box=BOX).replace("<name>1</name>", ""),
            r"x\.xml: object 0 \(no name\): no <name>",
        ),
        (
            VOC_XML.format(stem="x", size=SIZE, box=BOX.replace(">3<", ">three<", 1)),
            r"x\.xml: object 0 \(1\): <xmin> is 'three', not a number",
        ),
        ("<annotation><size>", r"x\.xml: malformed xml"),
    ],
    ids=["size", "width", "bndbox", "xmin", "name", "not_a_number", "malformed"],
)
def test_voc_xml_missing_tags_name_the_file_and_object(
    tmp_path: Path, xml: str, message: str
) -> None:
    _voc(tmp_path, {"x": xml})
    with pytest.raises(ValueError, match=message):
        read_voc(tmp_path, "2007", "val", classes=CLASSES)


# ----------------------------------------------------------------------------- 13-14 masks


def _save_mask(path: Path, mask: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").convert(mode).save(path)


def _mask_error(tmp_path: Path, mask: np.ndarray, mode: str = "P") -> str:
    """The error of reading the one VOC pair whose mask is `mask`."""
    _write_fixture("voc_seg", tmp_path, MODES["grayscale"][0])
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    _save_mask(path, mask, mode)
    dm = _datamodule("voc_seg", tmp_path)
    dm.setup("validate")
    with pytest.raises(ValueError) as err:
        dm.val_dataloader().dataset[0]
    assert str(path) in str(err.value)
    return str(err.value)


def test_mask_values_out_of_range_are_an_error(tmp_path: Path) -> None:
    """21 classes: 0..20 and 255 (ignore) are valid; 21 and 30 are not."""
    mask = np.zeros((SIDE, SIDE))
    mask[0, :4] = (30, 21, 255, 20)
    msg = _mask_error(tmp_path, mask)
    assert "id 2007_000001" in msg and "values [21, 30] outside the classes 0..20" in msg


def test_image_and_mask_of_different_sizes_are_an_error(tmp_path: Path) -> None:
    msg = _mask_error(tmp_path, np.zeros((SIDE + 1, SIDE)))
    assert (
        f"2007_000001.jpg is {SIDE}x{SIDE}" in msg
        and f"2007_000001.png is {SIDE}x{SIDE + 1}" in msg
    )


def test_colour_mask_is_an_error(tmp_path: Path) -> None:
    """An RGB mask holds colours, not class indices: guessing the palette would be silent."""
    assert "is a RGB image" in _mask_error(tmp_path, np.zeros((SIDE, SIDE)), mode="RGB")


# ----------------------------------------------------------------------------- 15 image vs annotation


def test_image_size_differs_from_its_annotation(tmp_path: Path) -> None:
    """COCO says 8x8, the file is 9x8: the boxes would not match the pixels."""
    path = _write_fixture("coco", tmp_path, lambda p: Image.new("RGB", (SIDE + 1, SIDE)).save(p))
    dm = _datamodule("coco", tmp_path)
    dm.setup("validate")
    with pytest.raises(ValueError, match=re.escape(f"{path} (image id 1) is {SIDE + 1}x{SIDE}")):
        dm.val_dataloader().dataset[0]


# ----------------------------------------------------------------------------- 16 missing records


def test_missing_records_and_files_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ann\.json: annotation id 7 points to image id 3"):
        read_coco(_coco(tmp_path, image_id=3), tmp_path / "imgs")
    with pytest.raises(
        ValueError, match=r"ann\.json: annotation id 7: bbox must be \[x, y, w, h\]"
    ):
        read_coco(_coco(tmp_path, bbox=[1, 2, "3", 4]), tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"ann\.json: images\[0\] has no width"):
        read_coco(_coco(tmp_path, images=[{"id": 1, "file_name": "a.png", "height": 4}]), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image id 1 refers to missing file .*a\.png"):
        read_coco(_coco(tmp_path), tmp_path / "elsewhere")


def test_missing_mask_and_missing_id_are_errors(tmp_path: Path) -> None:
    _write_fixture("voc_seg", tmp_path, MODES["grayscale"][0])
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClass" / "2007_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask file .*2007_000001\.png not found"):
        _datamodule("voc_seg", tmp_path).setup("validate")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2010_999999\n")
    with pytest.raises(
        FileNotFoundError, match=r"val\.txt names 1 id\(s\) with no image.*2010_999999"
    ):
        _datamodule("voc_seg", tmp_path).setup("validate")


# ----------------------------------------------------------------------------- 17-19 CLI and models
# Inputs the data readers never see: a mistyped config key, a model smaller than its data's
# labels, a weights file that would run code. Each is ONE line, naming the key / the file.

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = str(ROOT / "configs" / "transfer" / "digits_scratch.yaml")
TINY_DETECTOR = {"arch": "transfer", "min_size": 64, "max_size": 64, "num_sample_images": 0}


def _train_py(*args: str) -> subprocess.CompletedProcess:
    """`scripts/train.py ARGS` as a user runs it (no CNNLAB_DEBUG: the one-line errors)."""
    env = {k: v for k, v in os.environ.items() if k != "CNNLAB_DEBUG"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _error_line(stderr: str) -> str:
    """The one `error:` line of a failed command; no traceback, no multi-line report."""
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def test_unknown_config_key_names_the_nearest_valid_one() -> None:
    # 17: exit status 2 (argparse's for a usage error), and only this line: no usage dump
    proc = _train_py("fit", f"--config={SCRATCH}", "--model.lrr", "0.1")
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert line.startswith(
        "error: unknown key 'lrr' for model (lit_modules.transfer.TransferClassifier); "
        "did you mean 'lr'?"
    )
    assert "usage:" not in proc.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "model:\n  init_args:\n    lrr: 0.1\n",
            "unknown key 'lrr' for model (lit_modules.transfer.TransferClassifier); "
            "did you mean 'lr'?",
        ),
        (
            "data:\n  init_args:\n    batch_sise: 8\n",
            "unknown key 'batch_sise' for data (datamodules.digits.DigitsDataModule); "
            "did you mean 'batch_size'?",
        ),
        (
            "trainer:\n  max_epoch: 1\n",
            "unknown key 'max_epoch' for trainer; did you mean 'max_epochs'?",
        ),
        (
            "trainr:\n  max_epochs: 1\n",
            "unknown key 'trainr.max_epochs'; did you mean 'trainer.max_epochs'?",
        ),
    ],
    ids=["model", "data", "trainer", "top-level"],
)
def test_unknown_key_in_a_config_file_names_the_nearest_valid_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    expected: str,
) -> None:
    from scripts.train import main  # in this process: the error comes while parsing, cheaply

    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's

    path = tmp_path / "typo.yaml"
    path.write_text(config)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={SCRATCH}", f"--config={path}", "--print_config"])
    assert exit_.value.code == 2
    assert expected in _error_line(capsys.readouterr().err)


def test_num_classes_smaller_than_the_data_is_one_line_naming_both() -> None:
    # 18, with a DataModule that knows its classes: refused at setup, before any step
    proc = _train_py(
        "fit", f"--config={SCRATCH}", "--model.num_classes=3", "--trainer.fast_dev_run=true"
    )
    assert proc.returncode == 1
    assert "the data has 5 classes (largest label 4) but model.num_classes is 3" in (
        _error_line(proc.stderr)
    )


def _model_and_batch(kind: str) -> tuple[Any, DataLoader]:
    """A module with num_classes 5 and a loader whose labels go up to 7 (255: ignore)."""
    from lit_modules.detection import FasterRCNNModule
    from lit_modules.segmentation import FCNModule

    if kind == "transfer":
        data = [(torch.zeros(1, 28, 28), torch.tensor(k)) for k in (0, 7, 3)]
        module = TransferClassifier(backbone="digits_cnn", num_classes=5, mode="scratch")
        return module, DataLoader(data, batch_size=3)
    if kind == "segmentation":
        mask = torch.full((32, 32), 255, dtype=torch.int64)  # 255 everywhere but one pixel
        mask[0, 0] = 7
        data = [(torch.zeros(1, 32, 32), mask)]
        return FCNModule(arch="digits", variant="32s", num_classes=5), DataLoader(data)
    target = {
        "boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
        "labels": torch.tensor([7]),
        "iscrowd": torch.tensor([False]),
    }
    data = [(torch.zeros(3, 64, 64), target)]
    loader = DataLoader(data, collate_fn=lambda batch: tuple(zip(*batch, strict=True)))
    return FasterRCNNModule(**TINY_DETECTOR, num_classes=5), loader


@pytest.mark.parametrize("kind", ["transfer", "segmentation", "detection"])
def test_label_beyond_num_classes_is_a_clear_error_not_an_index_error(kind: str) -> None:
    # 18, with data that does not say how many classes it has (plain loaders, a user's own
    # DataModule): checked on each CPU batch, before the loss (IndexError / CUDA assert there)
    from lightning.pytorch import Trainer

    module, loader = _model_and_batch(kind)
    trainer = Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"the data has label 7 but model\.num_classes is 5"):
        trainer.fit(module, train_dataloaders=loader)


class _RunsCode:
    """Unpickling it calls os.system: what a malicious weights file does."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def _weights_with_code(tmp_path: Path) -> tuple[Path, Path]:
    """A weights file that looks like a checkpoint and carries code; the file the code creates."""
    marker, path = tmp_path / "the_code_ran", tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2), "x": _RunsCode(marker)}}, path)
    return path, marker


def _load_as(key: str, path: str) -> None:
    from lit_modules.detection import FasterRCNNModule
    from lit_modules.gan import DCGANModule

    if key == "weights":
        TransferClassifier(backbone="digits_cnn", num_classes=5, weights=path)
    elif key == "weights_backbone":
        FasterRCNNModule(**TINY_DETECTOR, num_classes=11, weights_backbone=path)
    else:
        DCGANModule(classifier_weights=path)


@pytest.mark.parametrize("key", ["weights", "weights_backbone", "classifier_weights"])
def test_weights_file_carrying_code_is_refused_and_never_run(tmp_path: Path, key: str) -> None:
    # 19: every weights loader goes through torch.load(weights_only=True)
    path, marker = _weights_with_code(tmp_path)
    with pytest.raises(ValueError) as err:
        _load_as(key, str(path))
    assert str(err.value).startswith(
        f"weights file {path} refused: it holds pickled code (posix.system), not only tensors"
    )
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists(), "loading the weights file ran its code"
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_weights_file_carrying_code_is_one_line_from_the_cli(tmp_path: Path) -> None:
    path, marker = _weights_with_code(tmp_path)
    proc = _train_py(
        "fit",
        f"--config={ROOT / 'configs' / 'transfer' / 'digits_finetune.yaml'}",
        f"--model.weights={path}",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 1
    assert f"weights file {path} refused: it holds pickled code" in _error_line(proc.stderr)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 20 a NaN loss


def _poison(*, step: int) -> str:
    """`--trainer.callbacks` value: the training batch of `step` is all NaN, so is its loss."""
    return json.dumps([{"class_path": "tests.killing.PoisonAt", "init_args": {"step": step}}])


def _poisoned_fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    """A tiny fit whose 6th training batch (step 5, in epoch 1) is all NaN: its loss is NaN."""
    poison = _poison(step=5)
    return _train_py(
        "fit",
        f"--config={SCRATCH}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks={poison}",
        *extra,
    )


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    proc = _poisoned_fit(tmp_path, "--name=stop")
    assert proc.returncode == 1
    last = tmp_path / "stop" / "version_0" / "checkpoints" / "last.ckpt"
    line = _error_line(proc.stderr)
    assert "non-finite loss at step 5 (epoch 1, rank 0): loss=nan" in line
    assert f"last good checkpoint: {last}" in line
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_nan_loss_in_every_module_and_the_skip_policy(judge: Path, tmp_path: Path) -> None:
    """Detection (its four loss terms), segmentation and the GAN (D's loss) stop the same way;
    with `nonfinite_loss: skip` the NaN step is counted and leaves no trace."""
    from tests.test_ddp import launch

    poison = _poison(step=2)
    common = ["--wandb=disabled", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={poison}"]  # fmt: skip
    runs = [
        ["fit", "--config=configs/detection/digits_faster_rcnn.yaml",
         "--model.weights_backbone=null", "--data.train_length=32", "--data.eval_length=4",
         "--trainer.max_steps=4", "--trainer.val_check_interval=null", *common],
        ["fit", "--config=configs/segmentation/digits_fcn8s.yaml", "--data.train_length=32",
         "--data.eval_length=4", "--trainer.max_epochs=1", *common],
        ["fit", "--config=configs/gan/digits_dcgan.yaml", "--model.g_width=8", "--model.d_width=8",
         f"--model.classifier_weights={judge}", "--data.max_eval_samples=32",
         "--trainer.limit_train_batches=4", "--trainer.max_epochs=1", *common],
    ]  # fmt: skip
    skip = ["fit", f"--config={SCRATCH}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2", "--name=skip", "--model.nonfinite_loss=skip",
            *common[:-1], f"--trainer.callbacks={_poison(step=5)}"]  # fmt: skip
    results = launch([*runs, skip], tmp_path / "results.json", check=False)
    detection, segmentation, gan, skipped = results
    stop = "NonFiniteLossError: non-finite loss at step 2 (epoch 0, rank 0): "
    terms = ("loss_classifier=nan", "loss_box_reg=nan", "loss_objectness=nan", "loss_rpn_box_reg")
    assert detection.startswith(stop) and all(t in detection for t in terms), detection
    assert segmentation.startswith(stop + "loss=nan;"), segmentation
    assert gan.startswith(stop + "d_loss=nan;"), gan  # manual optimisation: G and D steps count
    # nonfinite_loss: skip: the step is dropped and counted, training goes on
    assert skipped == "ok", skipped
    metrics = json.loads((tmp_path / "skip" / "version_0" / "metrics.json").read_text())
    assert metrics["train/skipped_steps"] == 1.0
    # finite: the NaN batch moved no weight and no BatchNorm statistic
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
