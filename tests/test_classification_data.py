"""ClassificationDataModule on tiny fixtures written in each data set's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from datamodules.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataModule,
    holdout_split,
)

SIZE = 32  # image_size in every test: small and fast


def _dm(dataset: str, root: Path, **kw) -> ClassificationDataModule:
    kw = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, **kw}
    return ClassificationDataModule(dataset=dataset, root=str(root), **kw)


def _check_batch(batch: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> None:
    x, y = batch
    assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1:] == (3, SIZE, SIZE)
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert int(y.min()) >= 0 and int(y.max()) < num_classes
    assert torch.isfinite(x).all()


def _check_all_loaders(dm: ClassificationDataModule) -> None:
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            _check_batch(batch, dm.num_classes)


def _save_image(path: Path, value: int = 128, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = np.full((size, size, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(pixels).save(path)  # (H, W) -> "L", (H, W, 3) -> "RGB"


def _pixel_value(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, 3) mean 0..255 value per channel."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (x.mean(dim=(2, 3)) * std + mean) * 255


# ----------------------------------------------------------------------------- CIFAR


def _cifar_batch(labels: list[int], key: str) -> dict:
    """A CIFAR pickle: each image is constant 10 * label + 5, so a test can read its label."""
    data = np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 10 + 5, 3072, axis=1)
    return {"data": data, key: labels}  # data: (N, 3072) uint8, channel-major 3x32x32


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def write_cifar10(root: Path) -> None:
    base = root / "cifar-10-batches-py"
    for i in range(1, 6):
        _dump(base / f"data_batch_{i}", _cifar_batch([i, (i + 3) % 10, (2 * i) % 10, 9], "labels"))
    _dump(base / "test_batch", _cifar_batch([0, 1, 2, 3, 4, 5], "labels"))
    _dump(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})


def write_cifar100(root: Path) -> None:
    base = root / "cifar-100-python"
    train = _cifar_batch([0, 17, 42, 99, 5, 6, 7, 8, 9, 10], "fine_labels")
    test = _cifar_batch([1, 50, 98], "fine_labels")
    for name, batch in (("train", train), ("test", test)):
        _dump(base / name, {**batch, "coarse_labels": [0] * len(batch["fine_labels"])})
    _dump(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)]})


def test_cifar10_batches_and_labels_match_images(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = _dm("cifar10", tmp_path, augment=False, val_fraction=0.25)
    assert dm.num_classes == 10  # known before any data access
    dm.setup("fit")
    dm.setup("test")
    assert dm.class_names == [f"class{i}" for i in range(10)]
    assert len(dm._splits["train"]) + len(dm._splits["val"]) == 20
    assert len(dm._splits["val"]) == 5 and len(dm._splits["test"]) == 6
    _check_all_loaders(dm)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for x, y in loader:  # the constant pixel value encodes the label: pairs stay together
            expected = (y.float() * 10 + 5)[:, None].expand(-1, 3)
            assert torch.allclose(_pixel_value(x), expected, atol=1.0)


def test_cifar100(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    dm = _dm("cifar100", tmp_path, val_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 100 and len(dm.class_names) == 100
    assert (len(dm._splits["train"]), len(dm._splits["val"]), len(dm._splits["test"])) == (8, 2, 3)
    _check_all_loaders(dm)
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert labels.tolist() == [1, 50, 98]


def test_holdout_is_seeded_disjoint_and_complete() -> None:
    train, val = holdout_split(100, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert holdout_split(100, 0.1, seed=3) == (train, val)
    assert holdout_split(100, 0.1, seed=4)[1] != val


# ----------------------------------------------------------------------------- Oxford Pets


def write_pets(root: Path) -> None:
    """All 37 breeds, one image each in trainval and in test (torchvision names classes from them)."""
    base = root / "oxford-iiit-pet"
    for split, k in (("trainval", 1), ("test", 2)):
        lines = []
        for label in range(1, 38):
            image_id = f"breed_{label:02d}_{k}"
            _save_image(base / "images" / f"{image_id}.jpg", value=label * 5, size=12)
            lines.append(f"{image_id} {label} {1 + label % 2} {label}")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_pets(tmp_path: Path) -> None:
    write_pets(tmp_path)
    dm = _dm("pets", tmp_path, val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 37 and len(dm.class_names) == 37
    assert dm.class_names[0] == "Breed 01"
    assert (len(dm._splits["train"]), len(dm._splits["val"]), len(dm._splits["test"])) == (
        28,
        9,
        37,
    )
    _check_all_loaders(dm)


# ----------------------------------------------------------------------------- Flowers-102


def write_flowers(root: Path) -> None:
    base = root / "flowers-102"
    labels = [1, 2, 102, 5, 1, 2, 7]  # 1-based, one per image_0000k.jpg
    for k in range(1, len(labels) + 1):
        _save_image(base / "jpg" / f"image_{k:05d}.jpg", value=20 * k, size=10)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    ids = {"trnid": [1, 2, 3], "valid": [4, 5], "tstid": [6, 7]}
    savemat(base / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in ids.items()})


def test_flowers102_uses_its_own_splits(tmp_path: Path) -> None:
    write_flowers(tmp_path)
    dm = _dm("flowers102", tmp_path, max_eval_samples=1)
    dm.setup()
    assert dm.num_classes == 102 and len(dm.class_names) == 102
    assert (len(dm._splits["train"]), len(dm._splits["val"]), len(dm._splits["test"])) == (3, 1, 1)
    _check_all_loaders(dm)
    train_labels = sorted(torch.cat([y for _, y in dm.train_dataloader()]).tolist())
    assert train_labels == [0, 1, 101]


# ----------------------------------------------------------------------------- ImageFolder


def write_imagefolder(root: Path, with_test: bool = True) -> None:
    splits = {"train": 3, "val": 2} | ({"test": 2} if with_test else {})
    for split, n in splits.items():
        for cls in ("cat", "dog", "eel"):
            for k in range(n):
                _save_image(root / split / cls / f"{k}.png", value=40 * k)
    _save_image(root / "train" / "eel" / "gray.jpg", mode="L")  # must come out as 3 channels


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    dm = _dm("imagefolder", tmp_path)
    assert dm.num_classes == 3  # lists train/ without setup
    dm.setup()
    assert dm.class_names == ["cat", "dog", "eel"]
    assert (len(dm._splits["train"]), len(dm._splits["val"]), len(dm._splits["test"])) == (10, 6, 6)
    _check_all_loaders(dm)
    assert len(dm.predict_dataloader().dataset) == 6


def test_imagefolder_without_test_evaluates_val(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, with_test=False)
    dm = _dm("imagefolder", tmp_path)
    with pytest.warns(UserWarning, match="test"):
        dm.setup("test")
    assert len(dm._splits["test"]) == 6


# Unreadable images (error naming the file, or skip_bad_images: counted skip) and image
# modes: tests/test_bad_inputs.py


def test_imagefolder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image extension")
    with pytest.raises(FileNotFoundError, match="cat"):
        _dm("imagefolder", tmp_path).setup("fit")


def test_imagefolder_splits_must_share_classes(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    _save_image(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(ValueError, match="classes"):
        _dm("imagefolder", tmp_path).setup("fit")


# ----------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "pets", "flowers102"])
def test_missing_root_says_download(tmp_path: Path, dataset: str) -> None:
    root = tmp_path / "nowhere"
    dm = _dm(dataset, root)
    with pytest.raises(FileNotFoundError, match="download: true") as err:
        dm.setup("fit")
    assert str(root) in str(err.value)


def test_missing_imagefolder_says_layout(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="root/val") as err:
        _dm("imagefolder", tmp_path).setup("fit")
    assert str(tmp_path / "val") in str(err.value)


# ----------------------------------------------------------------------------- evaluate only


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_imagefolder_tests_with_only_test(tmp_path: Path, stage: str) -> None:
    for cls in ("cat", "dog", "eel"):
        _save_image(tmp_path / "test" / cls / "0.png", value=40)
    dm = _dm("imagefolder", tmp_path)
    assert dm.num_classes == 3  # the classes come from test/ when there is no train/
    dm.setup(stage)
    loader = dm.test_dataloader() if stage == "test" else dm.predict_dataloader()
    _check_batch(next(iter(loader)), 3)
    assert len(loader.dataset) == 3 and dm.class_names == ["cat", "dog", "eel"]
    with pytest.raises(FileNotFoundError, match=r"stage 'fit' reads the train split, but .*train"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"stage 'validate' reads the val split, but .*val"):
        dm.setup("validate")


def test_imagefolder_validates_with_only_val(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        _save_image(tmp_path / "val" / cls / "0.png")
    dm = _dm("imagefolder", tmp_path)
    dm.setup("validate")
    _check_batch(next(iter(dm.val_dataloader())), 2)


def test_cifar10_tests_with_only_the_test_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    for i in range(1, 6):
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    dm = _dm("cifar10", tmp_path)
    dm.setup("test")
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(FileNotFoundError, match=r"stage 'fit' reads the train split.*data_batch_1"):
        dm.setup("fit")
