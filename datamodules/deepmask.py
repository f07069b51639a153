"""DeepMask data: training windows cut from scenes (DigitCanvas, or COCO photographs with their
instance masks: `source: coco`), whole scenes for evaluation.

Pinheiro et al. 2015 (§3.1, §3.3) train on windows labelled by where the object sits in them.
Measured in window pixels, with P the window side and D the canonical object size (the object's
box's larger side: the paper's 128 px in a 224 px window; here `canonical_size` in `patch_size`):

- positive (+1): one digit centred within `pos_offset` px on each axis (the paper's +-16 px of
  224) and with its larger side within 2**+-pos_scale of D (paper 2**+-1/4); it lies wholly in
  the window (checked). Its target is that digit's instance mask in the window;
- negative (-1): every digit of the scene is off-centre by >= `neg_offset` px on some axis
  (paper 32 px of 224) or off-scale by a factor >= 2**neg_scale (paper 2**1). Windows between
  the two rules are ambiguous and never drawn. Negatives come in three kinds, drawn equally:
  off-centre (a digit at the right scale, shifted), off-scale (centred, too big or too small),
  background (a random window anywhere, any scale), each re-drawn until the rule holds.

A train sample is `(window (C, P, P) float in [0, 1], mask (m, m) float in [0, 1], label ±1.)`:
the mask is the digit's mask averaged over each of the m x m output cells (the loss's target at
the mask branch's resolution, as the paper's 56 x 56); zeros for negatives (never trained on).
Each is a pure function of (split, index, seed); windows come from `train_scenes` fixed scenes
(made once, 4 ms each) and are re-drawn for every index, so an epoch can be as long as wanted.

COCO segm files (end of this file): `coco_segm_gt` writes the scenes' instance masks as a COCO
json (RLE), `segm_rows` proposals as COCO results rows, `load_coco_segm_results` reads and checks
a results file (a bad row: ValueError naming the file and the annotation's index) and
`coco_segm_ar` scores it with pycocotools' COCOeval (segm, class-agnostic: AR at 10/100/1000).

Val / test: whole scenes, detection style: `(list[image (C, H, W)], list[dict(masks (N, H, W)
bool, boxes (N, 4) xyxy, labels (N,), image_id)])`. Scenes may hold no digit (none here by
default: DigitCanvas draws 1..k).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align

from datamodules.common import SPLIT_STAGE, SplitLoaders, make_loader, stage_splits
from datamodules.digits import SPLITS, DigitCanvas
from lit_modules.nets.deepmask import mask_boxes

Window = tuple[float, float, float]  # (cx, cy, side) in scene pixels
NEGATIVE_KINDS = ("offcentre", "offscale", "background")
_TRIES = 30


def digit_geometry(boxes: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy boxes -> float32 centres (N, 2) and larger sides (N,): what the rule measures."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return (b[:, :2] + b[:, 2:]) / np.float32(2), (b[:, 2:] - b[:, :2]).max(1)


def _labels(
    window: Window, centres: np.ndarray, sizes: np.ndarray, rule: dict[str, float]
) -> np.ndarray:
    """`window_labels` on precomputed `digit_geometry` (float32 NumPy: a few µs a window, the
    sampler's hot path; torch's per-call overhead on 1-3 digits cost ~100 µs)."""
    cx, cy, side = window
    zoom = np.float32(rule["patch_size"] / side)  # window px per scene px
    off = np.abs((centres - np.array([cx, cy], np.float32)) * zoom).max(1)  # worst axis, window px
    dev = np.abs(np.log2(sizes * zoom / np.float32(rule["canonical_size"])))  # octaves
    pos = (off <= rule["pos_offset"]) & (dev <= rule["pos_scale"])
    neg = (off >= rule["neg_offset"]) | (dev >= rule["neg_scale"])
    return pos.astype(np.int64) - (neg & ~pos).astype(np.int64)


def window_labels(
    window: Window,
    boxes: torch.Tensor,
    *,
    patch_size: int,
    canonical_size: float,
    pos_offset: float,
    neg_offset: float,
    pos_scale: float,
    neg_scale: float,
) -> torch.Tensor:
    """(N,) per digit: +1 positive for `window`, -1 negative, 0 ambiguous (the module docstring)."""
    rule = {"patch_size": patch_size, "canonical_size": canonical_size, "pos_offset": pos_offset,
            "neg_offset": neg_offset, "pos_scale": pos_scale, "neg_scale": neg_scale}  # fmt: skip
    return torch.from_numpy(_labels(window, *digit_geometry(boxes), rule))


class CocoScenes(Dataset):
    """COCO-format images with their instance masks, as DeepMask's scenes: item i is a dict of
    image (C, H, W) float in [0, 1], boxes (N, 4) xyxy, masks (N, H, W) bool, labels (N,) (the
    category ids) and image_id. Read from `root/<split>/` and `root/annotations/
    instances_<split>.json` (COCO 2017's layout); crowd regions are left out (they are not one
    object). An object without a `segmentation` is an error naming the file and annotation.

    `role` (train / val / test) seeds the window draws, whatever the split's name.
    """

    def __init__(self, root: str | Path, split: str, *, role: str, channels: int = 3) -> None:
        from pycocotools.coco import COCO

        from datamodules.formats.coco import read_coco  # checks the json, names bad records

        ann = Path(root) / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise FileNotFoundError(
                f"DeepMask source coco: {ann} not found (expected root/<split>/ images and "
                f"root/annotations/instances_<split>.json)"
            )
        records, _ = read_coco(ann, Path(root) / split)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann))
        for a in self.coco.anns.values():
            if not a.get("iscrowd", 0) and not a.get("segmentation"):
                raise ValueError(
                    f"{ann}: annotation id {a['id']} (image id {a['image_id']}) has no "
                    "segmentation: DeepMask trains on instance masks"
                )
        self.records, self.split, self.channels, self.ann_file = records, role, channels, ann

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from datamodules.formats.image import open_image

        rec = self.records[i]
        pixels = open_image(rec.file, channels=self.channels, record=f"image id {rec.image_id}")
        image = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True))
        image = (image[None] if image.ndim == 2 else image.permute(2, 0, 1)).float() / 255
        anns = [a for a in self.coco.imgToAnns.get(rec.image_id, []) if not a.get("iscrowd", 0)]
        h, w = image.shape[-2:]
        masks = torch.zeros(len(anns), h, w, dtype=torch.bool)
        for k, a in enumerate(anns):
            masks[k] = torch.from_numpy(self.coco.annToMask(a)[:h, :w].astype(bool))
        keep = masks.flatten(1).any(1)  # a segment outside the image has no pixels to learn
        masks = masks[keep]
        boxes = mask_boxes(masks)  # (N, 4) xyxy: the rule measures the object's own extent
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep]
        return {"image": image, "boxes": boxes, "masks": masks, "labels": labels,
                "image_id": rec.image_id}  # fmt: skip


class DeepMaskWindows(Dataset):
    """Training windows (see the module docstring) cut from fixed scenes (DigitCanvas or COCO)."""

    def __init__(
        self,
        scenes: DigitCanvas | CocoScenes,
        *,
        length: int,
        patch_size: int = 32,
        mask_size: int = 16,
        canonical_size: float = 16.0,
        pos_offset: float = 2.0,
        neg_offset: float = 4.0,
        pos_scale: float = 0.25,
        neg_scale: float = 1.0,
        pos_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not (0 <= pos_offset < neg_offset and 0 <= pos_scale < neg_scale):
            raise ValueError(
                "need 0 <= pos_offset < neg_offset and 0 <= pos_scale < neg_scale, got "
                f"{pos_offset}, {neg_offset}, {pos_scale}, {neg_scale}"
            )
        if canonical_size * 2**pos_scale + 2 * pos_offset > patch_size:
            raise ValueError(
                f"a positive digit ({canonical_size} px * 2**{pos_scale}, +-{pos_offset} px) must "
                f"lie wholly inside the {patch_size} px window"
            )
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.scenes, self.length, self.seed = scenes, length, seed
        # DigitCanvas scenes are made on first use and kept (4 ms each); photographs are read
        # per window, as a DataLoader's workers read any image data set
        self._memo: dict[int, dict[str, torch.Tensor]] | None = (
            {} if isinstance(scenes, DigitCanvas) else None
        )
        self.patch_size, self.mask_size, self.pos_fraction = patch_size, mask_size, pos_fraction
        self.rule = {
            "patch_size": patch_size, "canonical_size": canonical_size, "pos_offset": pos_offset,
            "neg_offset": neg_offset, "pos_scale": pos_scale, "neg_scale": neg_scale,
        }  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.scenes.split), index, 13])

    def scene(self, i: int) -> dict[str, Any]:
        """Scene `i` with its digits' `geometry` (float32 centres, larger sides) beside."""
        if self._memo is not None and i in self._memo:
            return self._memo[i]
        scene = dict(self.scenes[i])
        scene["geometry"] = digit_geometry(scene["boxes"])
        if self._memo is not None:
            self._memo[i] = scene
        return scene

    def _near(self, rng: np.random.Generator, centre: np.ndarray, size: float, off: float,
              dev: float) -> Window:  # fmt: skip
        """A window around a digit (centre, larger side): its centre moved by `off`-bounded px,
        scale 2**dev."""
        r = self.rule
        side = r["patch_size"] * float(size) / (r["canonical_size"] * 2**dev)
        dx, dy = rng.uniform(-off, off, size=2) * side / r["patch_size"]  # window px -> scene px
        return float(centre[0]) + dx, float(centre[1]) + dy, side

    def _negative_window(self, rng: np.random.Generator, scene: dict[str, Any]) -> Window:
        r, (centres, sizes) = self.rule, scene["geometry"]
        h, w = scene["image"].shape[-2:]
        kind = NEGATIVE_KINDS[int(rng.integers(3))] if len(sizes) else "background"
        if kind == "background":
            side = r["patch_size"] * 2 ** rng.uniform(-1.0, 2.0)  # 0.5x .. 4x the window, scene px
            return float(rng.uniform(0, w)), float(rng.uniform(0, h)), side
        k = int(rng.integers(len(sizes)))
        if kind == "offscale":
            dev = rng.choice([-1.0, 1.0]) * rng.uniform(r["neg_scale"], r["neg_scale"] + 1.0)
            return self._near(rng, centres[k], sizes[k], r["pos_offset"], dev)
        dev = rng.uniform(-r["pos_scale"], r["pos_scale"])
        cx, cy, side = self._near(rng, centres[k], sizes[k], 0.0, dev)
        shift = rng.uniform(r["neg_offset"], r["patch_size"] / 2) * rng.choice([-1.0, 1.0])
        other = rng.uniform(-r["patch_size"] / 2, r["patch_size"] / 2)
        dx, dy = (shift, other) if rng.random() < 0.5 else (other, shift)
        zoom = side / r["patch_size"]
        return cx + dx * zoom, cy + dy * zoom, side

    @staticmethod
    def _roi(window: Window) -> list[float]:
        cx, cy, side = window
        return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]

    def _cut(self, scene: dict[str, Any], window: Window, k: int | None) -> tuple:
        return self._cut_many([(scene, window, k)])[0]

    def _cut_many(self, draws: list[tuple[dict[str, Any], Window, int | None]]) -> list[tuple]:
        """(window (C, P, P), target (m, m), label) per draw. One roi_align call cuts every
        window of scenes of one size (each roi on its own scene: the same values as one call
        per window), another every positive's mask target."""
        p, m = self.patch_size, self.mask_size
        sizes = {tuple(scene["image"].shape) for scene, _, _ in draws}
        if len(sizes) > 1:  # photographs of different sizes: one window at a time
            return [x for d in draws for x in self._cut_many([d])]
        n = torch.arange(len(draws), dtype=torch.float32)[:, None]
        boxes = torch.tensor([self._roi(w) for _, w, _ in draws], dtype=torch.float32)
        rois = torch.cat([n, boxes], 1)  # (B, 5): scene index, xyxy
        images = torch.stack([scene["image"] for scene, _, _ in draws])  # (B, C, H, W)
        # bilinear samples, 2x2 per output pixel; zero (black canvas) outside the scene
        patches = roi_align(images, rois, p, sampling_ratio=2, aligned=True)  # (B, C, P, P)
        targets = torch.zeros(len(draws), m, m)
        pos = [i for i, (_, _, k) in enumerate(draws) if k is not None]
        if pos:
            masks = torch.stack([draws[i][0]["masks"][draws[i][2]] for i in pos])[:, None].float()
            rois_pos = torch.cat([torch.arange(len(pos), dtype=torch.float32)[:, None],
                                  rois[pos, 1:]], 1)  # fmt: skip
            cells = roi_align(masks, rois_pos, m, sampling_ratio=4, aligned=True)  # cell averages
            targets[pos] = cells[:, 0].clamp(0, 1)
        labels = [torch.tensor(-1.0 if k is None else 1.0) for _, _, k in draws]
        return list(zip(patches, targets, labels, strict=True))

    def sample(self, index: int) -> tuple[dict[str, Any], Window, int | None]:
        """The scene, window and positive digit (None: negative) of sample `index`."""
        rng = self._rng(index)
        scene = self.scene(int(rng.integers(len(self.scenes))))
        (centres, sizes), r = scene["geometry"], self.rule
        positive = len(sizes) > 0 and rng.random() < self.pos_fraction
        for _ in range(_TRIES):
            if positive:
                k = int(rng.integers(len(sizes)))
                dev = rng.uniform(-r["pos_scale"], r["pos_scale"])
                window = self._near(rng, centres[k], sizes[k], r["pos_offset"], dev)
                if _labels(window, centres, sizes, r)[k] == 1:
                    return scene, window, k
            else:
                window = self._negative_window(rng, scene)
                if bool((_labels(window, centres, sizes, r) == -1).all()):
                    return scene, window, None
        # a crowded scene where no draw passed: a window far outside the canvas is empty (black)
        return scene, (-10.0 * self.patch_size, -10.0 * self.patch_size, self.patch_size), None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]  # (C, P, P), (m, m), ()

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        """A batch at once (the DataLoader calls this with a batch's indices): the same samples
        as one `__getitem__` each, cut by two roi_align calls instead of two per window."""
        for index in indices:
            if not 0 <= index < self.length:
                raise IndexError(f"index {index} out of range for {self.length} windows")
        return self._cut_many([self.sample(i) for i in indices])


class SceneSet(Dataset):
    """Whole scenes (DigitCanvas, or CocoScenes' photographs) as (image (C, H, W) in [0, 1],
    target dict); DigitCanvas scenes are made once and kept, photographs read per item."""

    def __init__(self, canvas: DigitCanvas | CocoScenes, length: int | None = None) -> None:
        self.canvas, self.length = canvas, min(len(canvas), length or len(canvas))
        self._memo: dict[int, tuple[torch.Tensor, dict[str, Any]]] | None = (
            {} if isinstance(canvas, DigitCanvas) else None
        )

    def __len__(self) -> int:
        return self.length

    def _make(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.canvas[i]
        target = {k: s[k] for k in ("masks", "boxes", "labels")}
        return s["image"], {**target, "image_id": int(s.get("image_id", i + 1))}  # COCO: from 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= i < self.length:
            raise IndexError(f"scene {i} out of range for {self.length} scenes")
        if self._memo is None:
            return self._make(i)
        if i not in self._memo:
            self._memo[i] = self._make(i)
        return self._memo[i]


def scene_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


class DeepMaskDataModule(SplitLoaders, LightningDataModule):
    """DeepMask training windows and whole evaluation scenes from DigitCanvas (see module doc)."""

    def __init__(
        self,
        source: Literal["digits", "coco"] = "digits",
        root: str | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        canvas_size: int = 96,
        digit_size: tuple[int, int] = (24, 48),
        num_digits: tuple[int, int] = (1, 3),
        background: Literal["black", "noise", "gradient"] = "black",
        clutter: int = 0,
        channels: int = 1,
        patch_size: int = 32,
        mask_size: int = 16,
        canonical_size: float = 16.0,
        pos_offset: float = 2.0,
        neg_offset: float = 4.0,
        pos_scale: float = 0.25,
        neg_scale: float = 1.0,
        pos_fraction: float = 0.5,
        train_scenes: int = 500,
        train_length: int = 8000,
        val_length: int = 50,
        test_length: int = 100,
        batch_size: int = 32,
        eval_batch_size: int = 10,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            source: `digits` (DigitCanvas scenes, made here) or `coco` (COCO-format photographs
                and instance masks: `root/<split>/`, `root/annotations/instances_<split>.json`).
            root, train_split, val_split, test_split: coco only (test_split null: the val
                split's images, COCO's test set having no annotations).
            canvas_size, digit_size, num_digits, background, clutter: the DigitCanvas scenes
                (digit_size is the pasted square; a digit's box is ~0.71 of it). channels: 1 or
                3, the scenes' (coco: the photographs read as gray or RGB).
            patch_size: the window side P (the net's input); mask_size: the mask target side m.
            canonical_size: D, a positive digit's larger box side in window px.
            pos_offset, neg_offset: window px of centring error: positives <= pos_offset on both
                axes, negatives >= neg_offset on some axis (or off-scale).
            pos_scale, neg_scale: octaves of scale error: positives <= pos_scale, negatives >=
                neg_scale (or off-centre).
            pos_fraction: share of positive windows.
            train_scenes: digits: the fixed train scenes windows are cut from (coco: every train
                image); train_length: windows per epoch (each index its own draw).
            val_length, test_length: whole scenes (digits: fixed by seed, different digits per
                split; coco: the split's first images by id).
        """
        super().__init__()
        if source not in ("digits", "coco"):
            raise ValueError(f"unknown source {source!r}; valid: digits, coco")
        if source == "coco" and root is None:
            raise ValueError("source coco needs root (the folder holding annotations/)")
        self.save_hyperparameters()
        DeepMaskWindows(self._canvas("train", 1), length=0, **self._window_args())  # checks
        self._sets: dict[str, Dataset] = {}
        self._coco: dict[str, CocoScenes] = {}

    def _window_args(self) -> dict[str, Any]:
        keys = ("patch_size", "mask_size", "canonical_size", "pos_offset", "neg_offset",
                "pos_scale", "neg_scale", "pos_fraction", "seed")  # fmt: skip
        return {k: self.hparams[k] for k in keys}

    def _canvas(self, split: str, length: int) -> DigitCanvas:
        hp = self.hparams
        return DigitCanvas(
            split,  # type: ignore[arg-type]
            length=length,
            size=hp.canvas_size,
            num_digits=tuple(hp.num_digits),
            digit_size=tuple(hp.digit_size),
            clutter=hp.clutter,
            background=hp.background,
            channels=hp.channels,
            seed=hp.seed,
        )

    def _scenes(self, split: str, length: int) -> DigitCanvas | CocoScenes:
        hp = self.hparams
        if hp.source == "digits":
            return self._canvas(split, length)
        name = {"train": hp.train_split, "val": hp.val_split}.get(split)
        name = name or hp.test_split or hp.val_split
        if name not in self._coco:  # val and test may read one annotation file
            self._coco[name] = CocoScenes(hp.root, name, role=split, channels=hp.channels)
        return self._coco[name]

    def _build(self, split: str) -> Dataset:
        hp = self.hparams
        if split == "train":
            scenes = self._scenes("train", hp.train_scenes)
            return DeepMaskWindows(scenes, length=hp.train_length, **self._window_args())
        length = hp.val_length if split == "val" else hp.test_length
        return SceneSet(self._scenes(split, length), length)

    def setup(self, stage: str | None = None) -> None:
        for split in stage_splits(stage):
            if split not in self._sets:
                self._sets[split] = self._build(split)

    def scenes(self, split: str) -> SceneSet:
        """The evaluation scenes of `split` (val / test), built if needed."""
        if split not in self._sets:
            self.setup(SPLIT_STAGE[split])
        return self._sets[split]  # type: ignore[return-value]

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        if split == "train":
            if "train" not in self._sets:
                self.setup("fit")
            return make_loader(
                self._sets["train"], batch_size=hp.batch_size, num_workers=hp.num_workers,
                train=True, drop_last=True,
            )  # fmt: skip
        return make_loader(
            self.scenes(split), batch_size=hp.eval_batch_size, num_workers=hp.num_workers,
            train=False, collate_fn=scene_collate,
        )  # fmt: skip


# ----------------------------------------------------------------------------- COCO segm


def encode_rle(mask: torch.Tensor) -> dict[str, Any]:
    """(H, W) bool -> COCO RLE dict with `counts` as str (json-ready)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segm_rows(masks: torch.Tensor, scores: torch.Tensor, image_id: int) -> list[dict[str, Any]]:
    """COCO segm results rows of one image's proposals (class-agnostic: category 1)."""
    return [
        {"image_id": int(image_id), "category_id": 1, "segmentation": encode_rle(m),
         "score": round(float(s), 6)}
        for m, s in zip(masks, scores, strict=True)
    ]  # fmt: skip


def coco_segm_gt(scenes: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """COCO instances json (RLE segmentations, category 1 "object") of evaluation scenes."""
    images, anns = [], []
    for image, target in scenes:
        h, w = image.shape[-2:]
        images.append({"id": int(target["image_id"]), "width": int(w), "height": int(h),
                       "file_name": f"{int(target['image_id']):06d}.png"})  # fmt: skip
        for m, b in zip(target["masks"], target["boxes"].tolist(), strict=True):
            anns.append({
                "id": len(anns) + 1, "image_id": int(target["image_id"]), "category_id": 1,
                "segmentation": encode_rle(m), "area": float(m.sum()), "iscrowd": 0,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            })  # fmt: skip
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}  # fmt: skip


def load_coco_segm_results(path: str | Path, gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Read a COCO segm results json and check every row against the ground truth `gt` (a COCO
    dict): fields, image id, RLE size = the image's, counts, score in [0, 1]. A bad row is a
    ValueError naming the file and the annotation's index."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable json file ({err})") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a COCO results file is a json list, got {type(rows).__name__}")
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for i, row in enumerate(rows):
        _check_row(row, sizes, f"{path}: annotation {i}")
    return rows


def _check_row(row: Any, sizes: dict[int, tuple[int, int]], where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not an object")
    missing = [k for k in ("image_id", "segmentation", "score") if k not in row]
    seg = row.get("segmentation")
    if not missing and not (isinstance(seg, dict) and {"size", "counts"} <= set(seg)):
        missing = ["segmentation.size/counts (an RLE)"]
    if missing:
        raise ValueError(f"{where} lacks field(s) {', '.join(missing)}")
    if row["image_id"] not in sizes:
        raise ValueError(f"{where}: image_id {row['image_id']} is not in the ground truth")
    h, w = sizes[row["image_id"]]
    if list(seg["size"]) != [h, w]:
        raise ValueError(f"{where}: mask size {seg['size']} is not its image's [{h}, {w}] (H, W)")
    counts = seg["counts"]
    if isinstance(counts, list) and (
        any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != h * w
    ):
        raise ValueError(f"{where}: RLE counts must be non-negative ints summing to {h * w}")
    if not isinstance(counts, list | str):
        raise ValueError(f"{where}: RLE counts must be a string or a list of ints")
    score = row["score"]
    if not isinstance(score, int | float) or not 0.0 <= float(score) <= 1.0:
        raise ValueError(f"{where}: score {score!r} is not a number in [0, 1]")


def coco_segm_ar(
    gt: dict[str, Any], results: list[dict[str, Any]], max_dets: Sequence[int] = (10, 100, 1000)
) -> dict[str, float]:
    """pycocotools COCOeval, iouType segm, class-agnostic (useCats 0): AR at 10/100/1000
    (one-to-one matching, IoU 0.5:0.95) and AP, as COCO scores mask proposals."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        dets = coco.loadRes([dict(r) for r in results]) if results else COCO()
        ev = COCOeval(coco, dets, iouType="segm")
        ev.params.useCats, ev.params.maxDets = 0, list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats  # [AP, AP50, AP75, APs, APm, APl, AR@d0, AR@d1, AR@d2, ...]
    return {"ap": float(s[0]), **{f"ar_{d}": float(s[6 + i]) for i, d in enumerate(max_dets)}}
