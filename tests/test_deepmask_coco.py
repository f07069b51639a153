"""DeepMask on COCO-format data: windows and scenes from photographs with instance masks (a tiny
fixture in COCO 2017's layout), crowd regions left out, a missing segmentation named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from PIL import Image, ImageDraw

from datamodules.deepmask import DeepMaskDataModule
from lit_modules.deepmask import DeepMaskModule

SIDE = 96


def _square(x: int, y: int, s: int) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def write_coco(
    root: Path, split: str, objects: list[list[tuple[int, int, int]]], crowd: bool = False
) -> Path:
    """One 96 px RGB image per entry of `objects`, each object a filled square (x, y, side) with
    its polygon; `crowd` adds a crowd region to the first image."""
    (root / split).mkdir(parents=True)
    images, anns, rng = [], [], np.random.default_rng(0)
    for i, squares in enumerate(objects, start=1):
        img = Image.fromarray(rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for x, y, s in squares:
            draw.polygon(_square(x, y, s), fill=(230, 200, 40))
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 1, "iscrowd": 0,
                         "bbox": [x, y, s, s], "area": float(s * s),
                         "segmentation": [_square(x, y, s)]})  # fmt: skip
        if crowd and i == 1:
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 1, "iscrowd": 1,
                         "bbox": [70, 70, 20, 20], "area": 400.0,
                         "segmentation": [_square(70, 70, 20)]})  # fmt: skip
        img.save(root / split / f"{i:06d}.png")
        images.append({"id": 10 + i, "file_name": f"{i:06d}.png", "width": SIDE, "height": SIDE})
    (root / "annotations").mkdir(exist_ok=True)
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "square"}]}))  # fmt: skip
    return ann


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    write_coco(
        tmp_path, "train", [[(10, 12, 24), (50, 40, 30)], [(30, 30, 28)], [(8, 50, 20)]], crowd=True
    )
    write_coco(tmp_path, "val", [[(20, 20, 26)], [(40, 10, 22), (10, 60, 24)]])
    return tmp_path


def data(root: Path, **kw: object) -> DeepMaskDataModule:
    args = {"source": "coco", "root": str(root), "train_split": "train", "val_split": "val",
            "channels": 3, "mask_size": 16, "train_length": 32, "val_length": 2, "test_length": 2,
            "batch_size": 16, "eval_batch_size": 2}  # fmt: skip
    return DeepMaskDataModule(**{**args, **kw})


def test_coco_windows_follow_the_rule_on_photographs(coco_root: Path) -> None:
    dm = data(coco_root, pos_fraction=0.5)
    dm.setup("fit")
    x, mask, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and mask.shape == (16, 16, 16)
    pos, neg = y == 1, y == -1
    assert pos.any() and neg.any() and bool((pos | neg).all())
    assert bool((mask[neg] == 0).all())
    # a positive square fills a centred ~16 px of the 32 px window: ~1/4 of the mask's cells
    fill = mask[pos].mean((1, 2))
    assert bool(((fill > 0.1) & (fill < 0.5)).all()), fill
    # the window is cut from the photograph: the square's yellow shows where its mask does
    centre = x[pos][:, 0, 14:18, 14:18].mean()
    assert centre > 0.7


def test_coco_scenes_hold_instance_masks_not_crowds(coco_root: Path) -> None:
    dm = data(coco_root)
    image, target = dm.scenes("val")[1]
    assert image.shape == (3, SIDE, SIDE) and target["image_id"] == 12
    assert target["masks"].shape == (2, SIDE, SIDE) and target["masks"].dtype == torch.bool
    torch.testing.assert_close(
        target["boxes"][0], torch.tensor([40.0, 10.0, 63.0, 33.0]), atol=1.0, rtol=0
    )
    dm.setup("fit")
    first = dm._sets["train"].scenes[0]  # the crowd region of image 1 is not an object
    assert len(first["masks"]) == 2 and len(first["boxes"]) == 2


def test_coco_fit_and_test_through_the_module(coco_root: Path, tmp_path: Path) -> None:
    seed_everything(0)
    # the digits trunk reads one channel: the photographs read as gray (channels: 1)
    model = DeepMaskModule(mask_size=16, rank=32, score_hidden=32, compare_selective_search=False,
                           top_k=50, num_sample_images=0)  # fmt: skip
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data(coco_root, channels=1))
    trainer.test(model, datamodule=data(coco_root, channels=1), verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/ar_100"]) <= 1.0


def test_coco_object_without_segmentation_is_named(tmp_path: Path) -> None:
    ann = write_coco(tmp_path, "train", [[(10, 10, 20)]])
    write_coco(tmp_path, "val", [[(10, 10, 20)]])
    bad = json.loads(ann.read_text())
    del bad["annotations"][0]["segmentation"]
    ann.write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"instances_train.json: annotation id 1 .* no segmentation"
    ):
        data(tmp_path).setup("fit")
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        data(tmp_path, train_split="nope").setup("fit")
