"""Object detection data: digit scenes made on the fly, COCO json, PASCAL VOC xml.

A batch keeps torchvision's detection contract: `(list[Tensor (3, H, W) float in [0, 1]],
list[dict(boxes=(N, 4) xyxy float32, labels=(N,) int64, iscrowd=(N,) bool, area=(N,) float32,
image_id=int)])`; `area` is COCO's annotation area (the object's, what COCO's size buckets use),
else the box's.
Images with no objects stay in (boxes of shape (0, 4)): they teach the detector what background
looks like. Normalisation and resizing are the model's (`GeneralizedRCNNTransform`).

Augmentation is `torchvision.transforms.v2` on `tv_tensors`, so boxes move with the pixels:
horizontal flip (off for digits: a mirrored digit is not a digit), photometric distortion, and
scale jitter (large-scale jitter: resize by a random factor, then crop / pad to a fixed square,
as torchvision's v2 recipe does; a plain resize would be undone by the model's own resize).
Boxes that augmentation pushes out of the image are removed by `SanitizeBoundingBoxes`; boxes
that are degenerate on disk are clipped / dropped by the readers with a counted warning
(`datamodules.formats.coco`). Pixels are read per item by `datamodules.formats.image` (any mode
-> RGB; an unreadable file is an error naming it and its image id).

Each stage reads only its splits: `fit` train_split + val_split, `validate` val_split, `test` and
`predict` test_split (else val_split). Evaluating a checkpoint needs no training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.common import (
    SPLIT_STAGE,
    EpochShuffleSampler,
    make_loader,
    stage_needs,
    stage_splits,
)
from datamodules.digits import DigitCanvas
from datamodules.formats.coco import ImageRecord, read_coco
from datamodules.formats.image import open_image
from datamodules.formats.voc import VOC_CLASSES, read_voc
from datamodules.samplers import GroupedBatchSampler

# The digit scenes of the `digits` source and of scripts/make_digit_canvases.py: small canvases,
# few digits, so a CPU trains a detector in minutes. Labels 1..10 = digit + 1.
DIGIT_SCENES: dict[str, Any] = {
    "size": 96,
    "num_digits": (1, 3),
    "digit_size": (20, 40),
    "background": "black",
    "clutter": 0,
    "seed": 0,
}
Target = dict[str, Any]


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists, not stacks: detection images differ in size and in number of objects."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _sanitize_labels(inputs: tuple[Any, Target]) -> tuple[torch.Tensor, ...]:
    target = inputs[1]
    return target["labels"], target["iscrowd"], target["area"]  # filtered with the boxes


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N,) float32 areas of (N, 4) xyxy boxes: the `area` of objects whose file gives none."""
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float()


def _plain(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """tv_tensors back to plain tensors: what the model and the metrics expect."""
    out = {**target, "boxes": target["boxes"].as_subclass(torch.Tensor)}
    return image.as_subclass(torch.Tensor), out


class _Detection(Dataset):
    """Shared __getitem__: (image, target) as tv_tensors -> transform -> plain tensors."""

    transform: v2.Transform

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(image (3, H, W) uint8, {boxes, labels, iscrowd, area}, image id)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, objects, image_id = self._sample(index)
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(objects["boxes"], format="XYXY", canvas_size=(h, w))
        # `area` stays in the pixels of the file: evaluation resizes nothing here (the model maps
        # its detections back to them), and no training loss reads it.
        target = {**objects, "boxes": boxes, "image_id": image_id}
        return _plain(*self.transform(tv_tensors.Image(image), target))


class RecordDataset(_Detection):
    """Images and boxes from reader records (COCO json / VOC xml); pixels read per item."""

    def __init__(self, records: list[ImageRecord], transform: v2.Transform) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        return [r.width / r.height for r in self.records]

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        r = self.records[index]
        pil = open_image(r.file, record=f"image id {r.image_id}")  # RGB, or an OSError naming it
        image = v2.functional.pil_to_tensor(pil)  # (3, H, W) uint8
        if tuple(image.shape[-2:]) != (r.height, r.width):
            raise ValueError(
                f"{r.file} (image id {r.image_id}) is {image.shape[-1]}x{image.shape[-2]} but its "
                f"annotation says {r.width}x{r.height}: the boxes would not match the pixels"
            )
        objects = {
            "boxes": torch.from_numpy(r.boxes).float(),
            "labels": torch.from_numpy(r.labels).long(),
            "iscrowd": torch.from_numpy(r.iscrowd).bool(),
            "area": torch.from_numpy(r.area).float(),  # COCO's `area`, else the box's
        }
        return image, objects, r.image_id


class DigitScenes(_Detection):
    """DigitCanvas scenes (3 channels, for torchvision detection backbones); image id = index + 1."""

    def __init__(self, canvas: DigitCanvas, transform: v2.Transform) -> None:
        self.canvas, self.transform = canvas, transform

    def __len__(self) -> int:
        return len(self.canvas)

    def aspect_ratios(self) -> list[float]:
        return [1.0] * len(self.canvas)

    def _sample(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        s = self.canvas[index]
        objects = {
            "boxes": s["boxes"],
            "labels": s["labels"],
            "iscrowd": torch.zeros(len(s["labels"]), dtype=torch.bool),
            "area": box_area(s["boxes"]),
        }
        return s["image"], objects, index + 1


def _as_list(split: str | Sequence[str] | None) -> list[str]:
    return [] if split is None else [split] if isinstance(split, str) else list(split)


def holdout_indices(n: int, holdout: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) positions of n images: a fixed, seeded val subset, the same on every rank and
    in every run (`holdout` images if an int, that share of n if a float in (0, 1))."""
    count = holdout if isinstance(holdout, int) else round(n * holdout)
    if not 1 <= count < n:
        raise ValueError(
            f"val_holdout {holdout} holds out {count} of the {n} training images: it must leave "
            "at least one image for val and one for training"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def _check_holdout(source: str, holdout: int | float | None, val_split: object) -> None:
    if holdout is None:
        return
    if source == "digits":
        raise ValueError("val_holdout is for coco / voc: digit scenes have their own val split")
    if val_split is not None:
        raise ValueError(
            f"set val_split ({val_split}) or val_holdout ({holdout}), not both: both are the val set"
        )
    fraction = isinstance(holdout, float) and 0.0 < holdout < 1.0
    if isinstance(holdout, bool) or not (fraction or isinstance(holdout, int) and holdout >= 1):
        raise ValueError(
            f"val_holdout must be a number of images >= 1 or a share in (0, 1), got {holdout!r}"
        )


def check_unique_ids(parts: list[RecordDataset]) -> None:
    """Evaluation splits read from several files must not share an image id: the mAP (and
    predictions.json) match detections to ground truth by image id, so two images under one id
    would be scored against each other's boxes."""
    seen: dict[int, Path] = {}
    for part in parts:
        for r in part.records:
            if r.image_id in seen:
                raise ValueError(
                    f"image id {r.image_id} of {r.file} is also the id of {seen[r.image_id]}: "
                    "the splits of one evaluation set must not share image ids"
                )
            seen[r.image_id] = r.file


class DetectionDataModule(LightningDataModule):
    """Detection data from `source`: `digits` (made on the fly), `coco` or `voc`.

    - digits: `canvas_size`, `num_digits`, `digit_size`, `background`, `clutter` as DigitCanvas;
      `train_length` scenes per epoch, `eval_length` fixed val / test scenes; 10 classes (+ bg).
    - coco: `root/<split>/` images and `root/annotations/instances_<split>.json` (COCO 2017's
      layout); labels are the category ids (COCO: 1..90, num_classes 91).
    - voc: `root/VOC<year>` (or `root/VOCdevkit/VOC<year>`), splits as `"<year>/<image set>"`,
      e.g. train_split ["2007/trainval", "2012/trainval"], test_split "2007/test"; `classes`
      (default VOC's 20) give labels 1..K. `difficult` objects are iscrowd: ignored by the mAP.
    A list of splits is concatenated. `test_split` null: test on `val_split`. Each stage needs only
    the splits it reads (`fit`: train_split, val_split; `validate`: val_split; `test`, `predict`:
    test_split or val_split), checked in `setup(stage)`.

    `val_holdout` (coco / voc, instead of `val_split`): a seeded, fixed subset of the train
    split(s), N images (an int) or a share (a float in (0, 1)), is the val set and leaves the
    training set: the checkpoint is chosen there, and the test split is reported once.
    """

    def __init__(
        self,
        source: Literal["digits", "coco", "voc"] = "digits",
        root: str | None = None,
        train_split: str | list[str] | None = None,
        val_split: str | list[str] | None = None,
        test_split: str | list[str] | None = None,
        classes: list[str] | None = None,
        canvas_size: int = DIGIT_SCENES["size"],
        num_digits: tuple[int, int] = DIGIT_SCENES["num_digits"],
        digit_size: tuple[int, int] = DIGIT_SCENES["digit_size"],
        background: Literal["black", "noise", "gradient"] = "black",
        clutter: int = 0,
        train_length: int = 16000,
        eval_length: int = 500,
        hflip_prob: float = 0.0,
        photometric: bool = False,
        scale_jitter: tuple[float, float] | None = None,
        crop_size: int | None = None,
        group_aspect_ratio: bool = False,
        val_holdout: int | float | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("digits", "coco", "voc"):
            raise ValueError(f"unknown source {source!r}; valid: digits, coco, voc")
        if scale_jitter is not None and (crop_size is None and source != "digits"):
            raise ValueError("scale_jitter needs crop_size (the fixed square it crops / pads to)")
        if scale_jitter is not None and not 0 < scale_jitter[0] <= scale_jitter[1]:
            raise ValueError(
                f"scale_jitter must be (min, max) with 0 < min <= max, got {scale_jitter}"
            )
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        _check_holdout(source, val_holdout, val_split)
        self.save_hyperparameters()
        self.classes = list(classes) if classes is not None else None
        if source == "digits":
            self.category_names = {d + 1: str(d) for d in range(10)}
        elif source == "voc":
            names = self.classes or list(VOC_CLASSES)
            self.category_names = {i + 1: n for i, n in enumerate(names)}
        else:
            self.category_names = {}  # read from the json in setup
        self.num_classes: int | None = max(self.category_names) + 1 if self.category_names else None
        self._sets: dict[str, Dataset] = {}
        self._held: dict[str, list[ImageRecord]] = {}  # train / val records of a val_holdout

    # ------------------------------------------------------------------ transforms

    def _transform(self, train: bool) -> v2.Compose:
        hp = self.hparams
        steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
        if train:
            if hp.photometric:
                steps.append(v2.RandomPhotometricDistort(p=0.5))
            if hp.hflip_prob > 0:
                steps.append(v2.RandomHorizontalFlip(hp.hflip_prob))
            if hp.scale_jitter is not None:
                side = hp.crop_size or hp.canvas_size
                steps += [
                    v2.ScaleJitter(
                        (side, side), scale_range=tuple(hp.scale_jitter), antialias=True
                    ),
                    v2.RandomCrop(side, pad_if_needed=True, fill=0),
                ]
            # boxes cropped away (or to < 1 px) go, with their labels, iscrowd flags and areas
            steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_sanitize_labels))
        return v2.Compose(steps)

    # ------------------------------------------------------------------ data sets

    def _digits(self, split: str, length: int, train: bool) -> DigitScenes:
        hp = self.hparams
        canvas = DigitCanvas(
            split,  # type: ignore[arg-type]
            length=length,
            size=hp.canvas_size,
            num_digits=tuple(hp.num_digits),
            digit_size=tuple(hp.digit_size),
            clutter=hp.clutter,
            background=hp.background,
            channels=3,
            seed=hp.seed,
        )
        return DigitScenes(canvas, self._transform(train))

    def _records(self, split: str) -> list[ImageRecord]:
        hp = self.hparams
        root = hp.root
        if hp.source == "coco":
            ann = Path(root) / "annotations" / f"instances_{split}.json"
            records, cats = read_coco(ann, Path(root) / split)
            if self.category_names and cats != self.category_names:
                raise ValueError(
                    f"{ann}: categories differ from the other splits' {self.category_names}"
                )
            self.category_names = cats
            self.num_classes = max(cats) + 1
            return records
        year, _, image_set = split.partition("/")
        if not image_set:
            raise ValueError(
                f"VOC split must be '<year>/<image set>', e.g. 2007/trainval; got {split!r}"
            )
        return read_voc(root, year, image_set, classes=self.classes or VOC_CLASSES)

    def _splits_of(self, name: str, stage: str | None) -> list[str]:
        """The on-disk splits of `name` (train / val / test), or a clear error naming the option."""
        hp = self.hparams
        owner = f"DetectionDataModule(source={hp.source!r})"
        option = {"train": "train_split", "val": "val_split", "test": "test_split"}[name]
        if name == "val" and hp.val_holdout is not None:
            option = "train_split (val_holdout carves the val images out of it)"
            name, splits = "train", _as_list(hp.train_split)
        else:
            splits = _as_list(getattr(hp, option))
        if name == "test" and not splits:
            splits, option = _as_list(hp.val_split), "test_split (or val_split)"
        if not splits:
            raise ValueError(
                stage_needs(owner, stage, name, f"`{option}` is not set")
                + " (fit reads train_split and val_split; validate val_split; test and predict "
                "test_split, else val_split)"
            )
        if hp.root is None:
            raise ValueError(stage_needs(owner, stage, name, "`root` is not set"))
        return splits

    def _build(self, name: str, stage: str | None) -> Dataset:
        hp = self.hparams
        train = name == "train"
        if hp.source == "digits":
            return self._digits(name, hp.train_length if train else hp.eval_length, train)
        splits = self._splits_of(name, stage)
        if name != "test" and hp.val_holdout is not None:
            return RecordDataset(self._holdout(splits)[name], self._transform(train))
        parts = [RecordDataset(self._records(s), self._transform(train)) for s in splits]
        if not train and len(parts) > 1:
            check_unique_ids(parts)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _holdout(self, splits: list[str]) -> dict[str, list[ImageRecord]]:
        """The train split(s) read once, dealt into train and the seeded val hold-out."""
        if not self._held:
            parts = [RecordDataset(self._records(s), self._transform(False)) for s in splits]
            check_unique_ids(parts)  # val images are scored by id
            records = [r for p in parts for r in p.records]
            train, val = holdout_indices(len(records), self.hparams.val_holdout, self.hparams.seed)
            self._held = {"train": [records[i] for i in train], "val": [records[i] for i in val]}
        return self._held

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` reads (all three when stage is None); cached across calls."""
        todo = [name for name in stage_splits(stage) if name not in self._sets]
        if self.hparams.source != "digits":
            for name in todo:  # every missing option first, before a large json is read
                self._splits_of(name, stage)
        for name in todo:
            self._sets[name] = self._build(name, stage)

    # ------------------------------------------------------------------ loaders

    def _aspect_groups(self, ds: Dataset) -> list[int]:
        parts = ds.datasets if isinstance(ds, ConcatDataset) else [ds]
        return [int(r >= 1.0) for p in parts for r in p.aspect_ratios()]

    def _set(self, name: str) -> Dataset:
        if name not in self._sets:  # a loader asked for outside a Trainer, without setup()
            self.setup(SPLIT_STAGE[name])
        return self._sets[name]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = self._set("train")
        if not hp.group_aspect_ratio:
            return make_loader(
                ds,
                batch_size=hp.batch_size,
                num_workers=hp.num_workers,
                train=True,
                collate_fn=collate,
            )
        # Under DDP Lightning injects a DistributedSampler in place of `epochs`; the grouped
        # sampler reads only its rank and epoch and deals equal numbers of batches (samplers.py).
        epochs = EpochShuffleSampler(ds)
        sampler = GroupedBatchSampler(
            epochs, hp.batch_size, False, self._aspect_groups(ds), seed=epochs.seed
        )
        return DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(epochs.seed),  # workers' seeds: see make_loader
        )

    def _eval_loader(self, name: str) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self._set(name),
            batch_size=hp.eval_batch_size or hp.batch_size,
            num_workers=hp.num_workers,
            train=False,
            collate_fn=collate,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
