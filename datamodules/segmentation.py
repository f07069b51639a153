"""Semantic segmentation data: DigitCanvas scenes, PASCAL VOC 2012 and SBD (the FCN paper's data).

A batch is `(images (B, C, H, W) float32, masks (B, H, W) int64)`; 255 is "ignore" (VOC's object
boundaries, and the padding that makes different image sizes one batch).

- `digits`: DigitCanvas semantic masks, classes 0 (background) and 1..10 (digit + 1). Fixed
  scenes per split, generated once per process.
- `voc`: torchvision `VOCSegmentation` (2012): train on `train`, test on `val`.
- `sbd`: the paper's setting: train on SBD `train` (8,498 images, torchvision `SBDataset`),
  test on *seg11valid*: the 736 VOC2011 val images not in SBD train, read from the VOC
  folder with the list `val_list` (fcn.berkeleyvision.org's data/pascal/seg11valid.txt).

Model selection (the best checkpoint by `val/miou`) must not see the test images: with
`val_holdout: F` (the VOC configs use it), a seeded share F of the training list is held out as
the val split (a fixed subset, disjoint from what trains and from the test split: SBD train and
seg11valid share no image). Without it (null), val *is* the test split, with a warning. The
digits scenes need neither: DigitCanvas val and test scenes are different scenes
(`(split, index, seed)` seeds each) built from disjoint MNIST-5k digits (val vs test digits).

Image and mask move together through `transforms.v2` (tv_tensors.Mask: nearest-neighbour
resizing, padding with 255). Masks are read as class indices: VOC's palette PNGs give their
indices, never their colours. Images of any mode become RGB (`datamodules.formats.image`). Every
mask is checked against its image when the pair is read: same size, values in 0..K-1 or 255;
otherwise an error names both files, the id and the problem.

Each stage reads only its split: `fit` train + val, `validate` val, `test` / `predict` the test
split (VOC: val, SBD: seg11valid), so testing needs no training data (validating with
`val_holdout` reads the training list, which holds the val images).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2

from datamodules.classification import holdout_split
from datamodules.common import SPLIT_STAGE, SplitLoaders, make_loader, stage_needs, stage_splits
from datamodules.digits import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, DigitCanvas
from datamodules.formats.image import open_image

IGNORE = 255
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
DIGIT_CLASSES = ("background", *(str(d) for d in range(10)))
DIGIT_PALETTE = [(0, 0, 0)] + [  # tab10, gold instead of its grey (grey strokes)
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (255, 215, 0), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
SEG11VALID_URL = (
    "https://github.com/shelhamer/fcn.berkeleyvision.org/blob/master/data/pascal/seg11valid.txt"
)


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (class c's colour from the bits of c); 255 is (224, 224, 192)."""
    colours = []
    for c in range(n):
        r = g = b = 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


# ----------------------------------------------------------------------------- digits


class DigitScenes(Dataset):
    """DigitCanvas scenes as (image (C, S, S) normalised, mask (S, S) int64) pairs.

    Each scene is made on first use and kept (float16 image, uint8 mask: ~3 bytes a pixel), so
    a short run makes only the scenes it reads and later epochs cost no generation.
    """

    def __init__(self, canvas: DigitCanvas) -> None:
        self.canvas = canvas
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.canvas)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._memo:
            s = self.canvas[i]
            self._memo[i] = (s["image"].half(), s["semantic"].to(torch.uint8))
        image, mask = self._memo[i]
        return (image.float() - DIGITS_MEAN) / DIGITS_STD, mask.long()  # (C, S, S), (S, S)


@functools.lru_cache(maxsize=8)
def digit_scenes(
    split: str,
    length: int,
    size: int,
    digit_size: tuple[int, int],
    num_digits: tuple[int, int],
    background: str,
    clutter: int,
    channels: int,
    seed: int,
) -> DigitScenes:
    """The scenes of one split; cached, so every run in one process (the demo) shares them."""
    canvas = DigitCanvas(
        split,  # type: ignore[arg-type]
        length=length,
        size=size,
        num_digits=num_digits,
        digit_size=digit_size,
        clutter=clutter,
        background=background,  # type: ignore[arg-type]
        channels=channels,
        seed=seed,
    )
    return DigitScenes(canvas)


# ----------------------------------------------------------------------------- files


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 class indices from a VOC PNG (palette or grayscale) or an SBD `cls/*.mat`."""
    if path.endswith(".mat"):
        from scipy.io import loadmat

        return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                return np.asarray(im)  # a P image gives its palette indices, not the RGB colours
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's errors name no file
        raise OSError(f"mask {path}: not a readable image ({type(err).__name__}: {err})") from err
    raise ValueError(
        f"mask {path} is a {mode} image: a segmentation mask must hold class indices "
        "(a palette 'P' or grayscale 'L' PNG, like VOC's SegmentationClass), not colours"
    )


class SegmentationFiles(Dataset):
    """(image file, mask file) pairs -> checked, jointly transformed (image, mask) tensors."""

    def __init__(
        self, images: list[str], masks: list[str], num_classes: int, transform: v2.Transform
    ) -> None:
        self.images, self.masks = images, masks
        self.num_classes, self.transform = num_classes, transform

    def __len__(self) -> int:
        return len(self.images)

    def _check(self, i: int, image: Image.Image, mask: np.ndarray) -> None:
        where = f"(id {Path(self.images[i]).stem})"
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"image {self.images[i]} is {image.width}x{image.height} but its mask "
                f"{self.masks[i]} is {mask.shape[1]}x{mask.shape[0]} (W x H) {where}"
            )
        values = np.unique(mask)
        bad = values[(values >= self.num_classes) & (values != IGNORE)]
        if bad.size:
            raise ValueError(
                f"mask {self.masks[i]} {where} has values {bad.tolist()} outside the classes "
                f"0..{self.num_classes - 1} and {IGNORE} (ignore); values found: {values.tolist()}"
            )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = open_image(self.images[i], record=f"id {Path(self.images[i]).stem}")  # RGB
        mask = read_mask(self.masks[i])
        self._check(i, image, mask)
        img = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        target = tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))
        img, target = self.transform(img, target)
        return img.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)  # (3,H,W), (H,W)


def check_files(images: list[str], masks: list[str], list_file: str) -> None:
    """Every id of `list_file` has its image and its mask, or a clear error naming them."""
    if not images:
        raise ValueError(f"list file {list_file} names no image")
    no_image = [p for p in images if not os.path.isfile(p)]
    if no_image:
        ids = [Path(p).stem for p in no_image]
        raise FileNotFoundError(
            f"list file {list_file} names {len(ids)} id(s) with no image, e.g. {ids[:5]} "
            f"(looked for {no_image[0]})"
        )
    no_mask = [p for p in masks if not os.path.isfile(p)]
    if no_mask:
        raise FileNotFoundError(
            f"mask file {no_mask[0]} not found ({len(no_mask)} missing; ids from {list_file})"
        )


def read_list(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise FileNotFoundError(f"list file {list_file} not found")
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def pad_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes in one batch: pad to the largest (image 0, mask 255 = ignored)."""
    h = max(x.shape[-2] for x, _ in batch)
    w = max(x.shape[-1] for x, _ in batch)
    pad = lambda t, v: F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=v)  # noqa: E731
    images = torch.stack([pad(x, 0.0) for x, _ in batch])  # (B, C, H, W)
    masks = torch.stack([pad(m, IGNORE) for _, m in batch])  # (B, H, W)
    return images, masks


# ----------------------------------------------------------------------------- DataModule


class SegmentationDataModule(SplitLoaders, LightningDataModule):
    """Semantic segmentation batches from DigitCanvas, PASCAL VOC 2012 or SBD + seg11valid."""

    def __init__(
        self,
        source: Literal["digits", "voc", "sbd"] = "digits",
        root: str = "data/voc",
        voc_root: str | None = None,
        val_list: str | None = None,
        val_holdout: float | None = None,
        download: bool = False,
        crop_size: int | None = 500,
        flip: bool = True,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_eval_samples: int | None = None,
        canvas_size: int = 96,
        digit_size: tuple[int, int] = (40, 64),
        num_digits: tuple[int, int] = (1, 3),
        background: Literal["black", "noise", "gradient"] = "black",
        clutter: int = 0,
        channels: int = 1,
        train_length: int = 4000,
        eval_length: int = 200,
        seed: int = 0,
    ) -> None:
        """
        Args:
            source: `digits` (embedded), `voc` (VOC 2012 train / val) or `sbd` (SBD train,
                seg11valid for val and test).
            root: voc: the folder holding VOCdevkit/; sbd: the SBD folder (img/, cls/, train.txt).
            voc_root: sbd: the folder holding VOCdevkit/ (for seg11valid).
            val_list: sbd: the seg11valid id list; default
                <voc_root>/VOCdevkit/VOC2012/ImageSets/Segmentation/seg11valid.txt.
            val_holdout: voc / sbd: the share of the training list held out (seeded by `seed`,
                the same on every rank and run) as the val split that chooses the checkpoint;
                null: val is the test split (selection on the test images: a warning).
            crop_size: training crop (padded with 255 where the image is smaller); 500 covers
                every VOC image, i.e. whole images as in the paper. null: no crop.
            flip: random horizontal mirroring of training images (never for digits).
            canvas_size, digit_size, num_digits, background, clutter, channels, train_length,
                eval_length: the DigitCanvas scenes (digits source only).
        """
        super().__init__()
        self.save_hyperparameters()
        if source not in ("digits", "voc", "sbd"):
            raise ValueError(f"unknown source {source!r}; valid: digits, voc, sbd")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be >= 1 or null, got {crop_size}")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be >= 1 or null, got {max_eval_samples}")
        if val_holdout is not None and not 0.0 < val_holdout < 1.0:
            raise ValueError(f"val_holdout must be in (0, 1) or null, got {val_holdout}")
        self.class_names = list(DIGIT_CLASSES if source == "digits" else VOC_CLASSES)
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE
        # VOC's colour map for VOC; ten distinct colours for the ten digits
        self.palette = DIGIT_PALETTE if source == "digits" else voc_palette(self.num_classes)
        self._sets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ paths

    @property
    def _voc_dir(self) -> Path:
        hp = self.hparams
        if hp.source == "sbd" and hp.voc_root is None:
            raise ValueError(
                "source sbd validates and tests on VOC's seg11valid: set `voc_root` (the folder "
                "holding VOCdevkit/)"
            )
        return Path(hp.root if hp.source == "voc" else hp.voc_root) / "VOCdevkit" / "VOC2012"

    def _seg11valid(self) -> Path:
        if self.hparams.val_list is not None:
            return Path(self.hparams.val_list)
        return self._voc_dir / "ImageSets" / "Segmentation" / "seg11valid.txt"

    def prepare_data(self) -> None:
        hp = self.hparams
        if not hp.download or hp.source == "digits":
            return
        # Only what is missing: torchvision re-extracts (SBD: re-moves) an archive on every call.
        if not self._voc_dir.is_dir():
            datasets.VOCSegmentation(self._voc_dir.parents[1], image_set="val", download=True)
        if hp.source == "sbd":
            if not (Path(hp.root) / "train.txt").is_file():
                datasets.SBDataset(hp.root, image_set="train", mode="segmentation", download=True)
            if not self._seg11valid().is_file():
                raise FileNotFoundError(
                    f"{self._seg11valid()} not found: torchvision cannot download the seg11valid "
                    f"list; get it from {SEG11VALID_URL}"
                )

    # ------------------------------------------------------------------ transforms

    def _transform(self, train: bool) -> v2.Compose:
        hp = self.hparams
        steps: list[v2.Transform] = []
        if train and hp.flip:
            steps.append(v2.RandomHorizontalFlip())
        if train and hp.crop_size is not None:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
            steps.append(v2.RandomCrop(hp.crop_size, pad_if_needed=True, fill=fill))
        steps += [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
        return v2.Compose(steps)

    # ------------------------------------------------------------------ data sets

    def _files(self, images: list[str], masks: list[str], list_file: Path, train: bool) -> Dataset:
        check_files(images, masks, str(list_file))
        return SegmentationFiles(images, masks, self.num_classes, self._transform(train))

    def _held_out(self, split: str) -> bool:
        """Is `split` a part of the training list (train less the hold-out, or the hold-out)?"""
        return split == "train" or (split == "val" and self.hparams.val_holdout is not None)

    def _training_list(self, split: str) -> Dataset:
        """SBD train / VOC2012 train, less (train) or only (val) the seeded `val_holdout`."""
        hp = self.hparams
        if hp.source == "sbd":  # torchvision's layout: img/, cls/, train.txt
            listed = Path(hp.root) / "train.txt"
            read_list(listed)  # a clear error if the folder or its list is missing
            ds = datasets.SBDataset(hp.root, image_set="train", mode="segmentation")
        else:
            listed = self._voc_dir / "ImageSets" / "Segmentation" / "train.txt"
            self._check_voc_dir()
            read_list(listed)
            ds = datasets.VOCSegmentation(
                str(self._voc_dir.parents[1]), year="2012", image_set="train"
            )
        images, masks = list(ds.images), list(ds.masks)
        if hp.val_holdout is not None:
            train_idx, val_idx = holdout_split(len(images), hp.val_holdout, hp.seed)
            keep = train_idx if split == "train" else val_idx
            images, masks = [images[i] for i in keep], [masks[i] for i in keep]
        return self._files(images, masks, listed, train=split == "train")

    def _check_voc_dir(self) -> None:
        voc, hp = self._voc_dir, self.hparams
        if not voc.is_dir():
            raise FileNotFoundError(
                f"PASCAL VOC folder {voc} not found: set `download: true`, or point "
                f"`{'root' if hp.source == 'voc' else 'voc_root'}` at the folder holding VOCdevkit/"
            )

    def _real(self, split: str) -> Dataset:
        hp = self.hparams
        if self._held_out(split):
            return self._training_list(split)
        voc = self._voc_dir
        lists = voc / "ImageSets" / "Segmentation"
        self._check_voc_dir()
        if hp.source == "voc":  # the test split (and val without val_holdout): VOC2012 val
            read_list(lists / "val.txt")
            ds = datasets.VOCSegmentation(str(voc.parents[1]), year="2012", image_set="val")
            return self._files(ds.images, ds.masks, lists / "val.txt", train=False)
        listed = self._seg11valid()  # sbd: test on seg11valid, as the paper does
        if not listed.is_file():
            raise FileNotFoundError(
                f"{listed}: the seg11valid list (736 ids) not found; get it from {SEG11VALID_URL} "
                "or set `val_list`"
            )
        ids = read_list(listed)
        if len(ids) != 736:
            rank_zero_warn(f"{listed} has {len(ids)} ids, not seg11valid's 736")
        images = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
        masks = [str(voc / "SegmentationClass" / f"{i}.png") for i in ids]
        return self._files(images, masks, listed, train=False)

    def _digits(self, split: str) -> Dataset:
        hp = self.hparams
        if hp.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {hp.channels}")
        length = hp.train_length if split == "train" else hp.eval_length
        return digit_scenes(
            split,
            length,
            hp.canvas_size,
            tuple(hp.digit_size),
            tuple(hp.num_digits),
            hp.background,
            hp.clutter,
            hp.channels,
            hp.seed,
        )

    def _real_for(self, split: str, stage: str | None) -> Dataset:
        """`_real(split)`, its missing-file errors saying which stage needed the split."""
        hp = self.hparams
        owner = f"SegmentationDataModule(source={hp.source!r})"
        if hp.source == "sbd" and not self._held_out(split) and hp.voc_root is None:
            missing = "`voc_root` is not set (sbd tests on VOC's seg11valid)"
            raise ValueError(stage_needs(owner, stage, split, missing))
        try:
            return self._real(split)
        except FileNotFoundError as err:
            raise FileNotFoundError(stage_needs(owner, stage, split, str(err))) from err

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` reads (all three when stage is None); cached across calls."""
        hp = self.hparams
        if hp.source != "digits" and hp.val_holdout is None and "val" in stage_splits(stage):
            rank_zero_warn(
                f"source {hp.source}: val is the test split, so the best checkpoint is chosen on "
                "the images that score it; set `val_holdout` (e.g. 0.05) to choose on a held-out "
                "part of the training list"
            )
        for split in stage_splits(stage):
            if split in self._sets:
                continue
            if self.hparams.source == "digits":
                data = self._digits(split)
            else:
                data = self._real_for(split, stage)
            limit = self.hparams.max_eval_samples
            if split != "train" and limit is not None and limit < len(data):
                data = torch.utils.data.Subset(data, range(limit))
            self._sets[split] = data

    # ------------------------------------------------------------------ loaders

    def _loader(self, split: str) -> DataLoader:
        hp, train = self.hparams, split == "train"
        if split not in self._sets:  # a loader asked for outside a Trainer, without setup()
            self.setup(SPLIT_STAGE[split])
        bs = hp.batch_size if train or hp.eval_batch_size is None else hp.eval_batch_size
        return make_loader(
            self._sets[split],
            batch_size=bs,
            num_workers=hp.num_workers,
            train=train,
            collate_fn=pad_collate,
            drop_last=train and len(self._sets[split]) > bs,
        )
