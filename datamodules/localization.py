"""Single-object localization data: windows of digit scenes, each with one digit's box or none.

OverFeat trains its regressor on windows that hold one object; cnnlab's windows come from
`DigitCanvas` scenes. A sample is `(image (1, S, S) float in [0, 1], {"boxes": (4,) xyxy float32
window pixels, "labels": () int64})`; label 0 is background (its box is zeros, never trained on),
1..10 a digit (digit + 1, the scenes' labels). Batches stack: `(B, 1, S, S)`, boxes `(B, 4)`,
labels `(B,)`.

- Val / test: single-digit scenes of `canvas_size` px (a digit at a random position and scale):
  the ILSVRC localization task, scored by `test/loc_acc` and `test/mean_iou`.
- Train: the same single-digit scenes (`scene_size` null), or, for a regressor that will be
  applied densely to multi-digit scenes (OverFeat detection), windows cut from `scene_size` px
  scenes of `scene_digits` digits: a positive window holds its digit (at least `min_visible` of
  its box inside) and no more than half of any other digit; a `background_fraction` of windows
  holds no more than `max_background_visible` of any digit's box and is labelled background, so
  that empty canvas and off-centre fragments get low object confidence when the net slides.
Each sample is a pure function of (split, index, seed), as DigitCanvas's are.
"""

from __future__ import annotations

import math
import struct
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.common import SPLIT_STAGE, SplitLoaders, make_loader, stage_splits
from datamodules.digits import SPLITS, DigitCanvas, SceneLayout

Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]
_TRIES = 20  # window draws before a sample falls back (see LocalizationWindows.__getitem__)


_FLOAT32 = struct.Struct("f")
_HALF = 0.5  # a positive window shows at most half of any other digit (exact in float32)


def _f32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def visible_fractions(boxes: list[list[int]], window: tuple[int, int, int, int]) -> list[float]:
    """Share of each xyxy box's area inside the xyxy `window`, for whole-pixel boxes and window,
    each rounded to float32: the window search calls this up to 20 times a sample, where plain
    Python is ~5x cheaper than NumPy on 1-3 boxes. Overlaps and areas are exact integers, so
    rounding the float64 quotient to float32 gives float32 division's result exactly (no double
    rounding: the quotient's denominator is at most the area, far below 2**29)."""
    x0, y0, x1, y1 = window
    out = []
    for bx0, by0, bx1, by1 in boxes:
        w = max(min(bx1, x1) - max(bx0, x0), 0)
        h = max(min(by1, y1) - max(by0, y0), 0)
        out.append(_f32(w * h / max((bx1 - bx0) * (by1 - by0), 1)))
    return out


def check_window_options(
    *,
    size: int,
    digit_size: tuple[int, int],
    scene_size: int | None,
    background_fraction: float,
    min_visible: float,
    max_background_visible: float,
) -> None:
    """Clear errors for options that cannot make windows (checked before any digit is read)."""
    if not 8 <= digit_size[0] <= digit_size[1] <= size:
        raise ValueError(
            f"digit_size must satisfy 8 <= min <= max <= the window size {size}, got {digit_size}"
        )
    if not 0.0 <= background_fraction < 1.0:
        raise ValueError(f"background_fraction must be in [0, 1), got {background_fraction}")
    if not 0.5 < min_visible <= 1.0:
        raise ValueError(f"min_visible must be in (0.5, 1], got {min_visible}")
    if not 0.0 <= max_background_visible < min_visible:
        raise ValueError(
            f"max_background_visible must be in [0, min_visible), got {max_background_visible}"
        )
    if scene_size is not None and scene_size < size:
        raise ValueError(f"scene_size ({scene_size}) must be >= the window size ({size})")
    if background_fraction > 0 and scene_size is None:
        raise ValueError(
            "background windows are cut from scenes: set scene_size (e.g. 96) with "
            "background_fraction > 0"
        )


class LocalizationWindows(Dataset):
    """Windows of `size` px with at most one labelled digit (see the module docstring)."""

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        *,
        length: int = 1000,
        size: int = 40,
        digit_size: tuple[int, int] = (20, 36),
        scene_size: int | None = None,
        scene_digits: tuple[int, int] = (1, 3),
        background_fraction: float = 0.0,
        min_visible: float = 1.0,
        max_background_visible: float = 0.3,
        seed: int = 0,
    ) -> None:
        check_window_options(
            size=size, digit_size=digit_size, scene_size=scene_size,
            background_fraction=background_fraction, min_visible=min_visible,
            max_background_visible=max_background_visible,
        )  # fmt: skip
        self.split, self.length, self.size, self.seed = split, length, size, seed
        self.background_fraction, self.min_visible = background_fraction, min_visible
        self.max_background_visible = max_background_visible
        # the thresholds as float32, as a float32 share is compared with them (NumPy's rule)
        self._min_visible, self._max_background = _f32(min_visible), _f32(max_background_visible)
        # single-digit scenes of the window's size: the positives of the plain task, the fallback
        self.single = DigitCanvas(
            split, length=length, size=size, num_digits=(1, 1), digit_size=digit_size, seed=seed,
            masks=False, digit_table=True,  # ~60 us a window less than a Pillow call per digit
        )  # fmt: skip
        self.scenes = None
        if scene_size is not None:
            self.scenes = DigitCanvas(
                split, length=length, size=scene_size, num_digits=scene_digits,
                digit_size=digit_size, seed=seed, masks=False,  # boxes are all a window needs
                digit_table=True,
            )  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, 11])

    def _single(self, index: int) -> Sample:
        s = self.single[index]
        return s["image"], {"boxes": s["boxes"][0], "labels": s["labels"][0]}

    def _crop(self, scene: SceneLayout, x: int, y: int, k: int | None) -> Sample:
        window = scene.canvas[y : y + self.size, x : x + self.size]  # (S, S) view of the scene
        image = torch.from_numpy(np.ascontiguousarray(window)).unsqueeze(0)  # (1, S, S)
        if k is None:
            return image, {"boxes": torch.zeros(4), "labels": torch.tensor(0)}
        x0, y0, x1, y1 = scene.boxes[k]  # whole pixels: the shift is exact in float32
        box = torch.tensor([x0 - x, y0 - y, x1 - x, y1 - y], dtype=torch.float32)
        return image, {"boxes": box, "labels": torch.tensor(scene.labels[k])}

    def _window(self, rng: np.random.Generator, box: list[int] | None, side: int) -> list[int]:
        """Top-left (x, y) of a window inside the scene, holding `min_visible` of `box` if given."""
        hi = side - self.size
        if box is None:
            return rng.integers(0, hi + 1, size=2).tolist()
        out = []
        for lo_edge, hi_edge in ((box[0], box[2]), (box[1], box[3])):
            slack = (1 - self.min_visible**0.5) * (hi_edge - lo_edge)  # per axis: area share ** 0.5
            lo = max(0, math.ceil(hi_edge - self.size - slack))
            top = min(hi, math.floor(lo_edge + slack))
            out.append(
                int(rng.integers(lo, top + 1)) if lo <= top else int(rng.integers(0, hi + 1))
            )
        return out

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} windows")
        if self.scenes is None:
            return self._single(index)
        rng = self._rng(index)
        background = rng.random() < self.background_fraction
        scene = self.scenes.layout(index)
        boxes, side, size = scene.boxes, self.scenes.size, self.size
        for _ in range(_TRIES):
            k = None if background or not boxes else int(rng.integers(len(boxes)))
            x, y = self._window(rng, None if k is None else boxes[k], side)
            seen = visible_fractions(boxes, (x, y, x + size, y + size))
            if k is None and all(v <= self._max_background for v in seen):
                return self._crop(scene, x, y, None)
            if (
                k is not None
                and seen[k] >= self._min_visible
                and all(v <= _HALF for j, v in enumerate(seen) if j != k)
            ):
                return self._crop(scene, x, y, k)
        if background:  # a crowded scene: an empty canvas is background too
            return torch.zeros(1, self.size, self.size), {
                "boxes": torch.zeros(4),
                "labels": torch.tensor(0),
            }
        return self._single(index)


class LocalizationDataModule(SplitLoaders, LightningDataModule):
    """Single-digit localization windows (see LocalizationWindows); 10 digits + background."""

    def __init__(
        self,
        canvas_size: int = 40,
        digit_size: tuple[int, int] = (20, 36),
        scene_size: int | None = None,
        scene_digits: tuple[int, int] = (1, 3),
        background_fraction: float = 0.0,
        min_visible: float = 1.0,
        max_background_visible: float = 0.3,
        train_length: int = 20000,
        eval_length: int = 500,
        batch_size: int = 64,
        eval_batch_size: int | None = 250,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            canvas_size: the window (and val / test scene) side: the regressor's input size.
            digit_size: (min, max) side of a pasted digit, px (its tight box is smaller).
            scene_size: train windows are cut from scenes of this side (null: single-digit
                scenes of canvas_size); scene_digits: (min, max) digits per such scene.
            background_fraction: share of train windows labelled background (needs scene_size).
            min_visible: least share of a positive window's digit box inside it (1: whole).
            max_background_visible: a background window shows at most this share of any digit.
            eval_length: val / test single-digit scenes (fixed).
        """
        super().__init__()
        self.save_hyperparameters()
        check_window_options(  # every option checked now, not at the first batch
            size=canvas_size, digit_size=tuple(digit_size), scene_size=scene_size,
            background_fraction=background_fraction, min_visible=min_visible,
            max_background_visible=max_background_visible,
        )  # fmt: skip
        self.num_classes = 11
        self.category_names = {d + 1: str(d) for d in range(10)}
        self._sets: dict[str, Dataset] = {}

    def _build(self, split: str) -> LocalizationWindows:
        hp = self.hparams
        train = split == "train"
        return LocalizationWindows(
            split,  # type: ignore[arg-type]
            length=hp.train_length if train else hp.eval_length,
            size=hp.canvas_size,
            digit_size=tuple(hp.digit_size),
            scene_size=hp.scene_size if train else None,
            scene_digits=tuple(hp.scene_digits),
            background_fraction=hp.background_fraction if train else 0.0,
            min_visible=hp.min_visible,
            max_background_visible=hp.max_background_visible,
            seed=hp.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        for split in stage_splits(stage):
            if split not in self._sets:
                self._sets[split] = self._build(split)

    def _loader(self, split: str) -> DataLoader:
        if split not in self._sets:
            self.setup(SPLIT_STAGE[split])
        hp = self.hparams
        train = split == "train"
        return make_loader(
            self._sets[split],
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            num_workers=hp.num_workers,
            train=train,
        )
