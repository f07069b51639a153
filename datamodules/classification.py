"""Real classification data sets for transfer: CIFAR-10/100, Oxford Pets, Flowers-102, ImageFolder.

Images go through ImageNet preprocessing (the statistics the pretrained backbones were trained
with). Nothing here downloads unless `download: true`, and then only in `prepare_data` (local rank
0), so DDP ranks never race on the same archive. Data sets without a val split (CIFAR, Pets) hold
out a seeded, fixed fraction of their train split: the same images on every rank and every run.

Each stage reads only its splits (`fit` train + val, `validate` val, `test` / `predict` test):
evaluating a checkpoint needs only the evaluated split on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from datamodules.common import SPLIT_STAGE, SplitLoaders, make_loader, stage_needs, stage_splits
from datamodules.formats.image import find_bad_images, open_image, to_mode

DatasetName = Literal["cifar10", "cifar100", "pets", "flowers102", "imagefolder"]
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "pets": 37, "flowers102": 102}
_HOLDOUT = ("cifar10", "cifar100", "pets")  # no val split on disk: held out of train
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
_IMAGEFOLDER_LAYOUT = (
    "root/train/<class>/*.jpg, root/val/<class>/*.jpg, optional root/test/<class>/*.jpg "
    "(each stage needs only the folders it reads)"
)


# ----------------------------------------------------------------------------- torchvision classes
# torchvision re-checks the md5 of CIFAR's batch files and Flowers' .mat files on every load, even
# with download=False. That costs a hash of the whole file per process and rejects any file not
# byte-identical to the original (a tiny fixture in the real format). The md5 of the *archive* is
# still verified when `download()` fetches it, which is where a checksum means something; on load
# we only require the files to exist.


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


def _split_files_exist(dataset: datasets.CIFAR10) -> bool:
    """Only the files of the split being loaded: torchvision requires the train and test files
    even to load test, so a checkpoint could not be evaluated on the test batch alone."""
    base = Path(dataset.root) / dataset.base_folder
    files = dataset.train_list if dataset.train else dataset.test_list
    return all((base / name).is_file() for name, _ in files)


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 that checks its split's files exist instead of their md5."""

    train_list = _no_md5(datasets.CIFAR10.train_list)
    test_list = _no_md5(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}
    _check_integrity = _split_files_exist


class CIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR-100 that checks its split's files exist instead of their md5."""

    train_list = _no_md5(datasets.CIFAR100.train_list)
    test_list = _no_md5(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}
    _check_integrity = _split_files_exist


class Flowers102(datasets.Flowers102):
    """torchvision's Flowers-102 that checks its files exist instead of their md5 on every load."""

    def _check_integrity(self) -> bool:
        mats = [self._base_folder / self._file_dict[k][0] for k in ("label", "setid")]
        return self._images_folder.is_dir() and all(p.is_file() for p in mats)


def _required_paths(dataset: str, root: Path, on_disk: str) -> list[Path]:
    """The files and folders that torchvision reads to load `on_disk` of `dataset` under `root`."""
    if dataset in ("cifar10", "cifar100"):
        cls = CIFAR10 if dataset == "cifar10" else CIFAR100
        files = cls.train_list if on_disk == "train" else cls.test_list
        base, names = root / cls.base_folder, [n for n, _ in files] + [cls.meta["filename"]]
    elif dataset == "pets":
        base, names = root / "oxford-iiit-pet", ["images", f"annotations/{on_disk}.txt"]
    elif dataset == "flowers102":  # one .mat file holds every split's ids
        base, names = root / "flowers-102", ["jpg", "imagelabels.mat", "setid.mat"]
    else:  # imagefolder
        base, names = root, [on_disk]
    return [base / n for n in names]


def _check_present(dataset: str, root: Path, split: str, on_disk: str, stage: str | None) -> None:
    """Raise a FileNotFoundError naming the stage, the first missing file and how to get it."""
    missing = [p for p in _required_paths(dataset, root, on_disk) if not p.exists()]
    if not missing:
        return
    if dataset == "imagefolder":
        hint = f"lay out `root` as {_IMAGEFOLDER_LAYOUT}"
    else:
        hint = f"pass `download: true` to fetch it into {root} (or point `root` where it is)"
    what = f"{missing[0]} not found ({len(missing)} missing); {hint}"
    raise FileNotFoundError(stage_needs(dataset, stage, split, what))


# ----------------------------------------------------------------------------- images


def imagenet_transform(image_size: int, *, train: bool, augment: bool = True) -> v2.Compose:
    """PIL image -> (3, S, S) float32, normalised with ImageNet statistics.

    Train: RandomResizedCrop + flip (the ResNet recipe). Eval: resize the short side to
    S * 256/224, then center crop S (the standard single-crop evaluation).
    """
    if train and augment:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [
            v2.Resize(round(image_size * 256 / 224), antialias=True),
            v2.CenterCrop(image_size),
        ]
    return v2.Compose(
        [
            v2.ToImage(),  # (3, H, W) uint8: resizing uint8 is faster than float
            *geometry,  # (3, S, S) uint8
            v2.ToDtype(torch.float32, scale=True),  # (3, S, S) float32 in [0, 1]
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Split(Dataset):
    """`indices` of a torchvision data set, with this split's transform, as (image, label)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: v2.Compose) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        if isinstance(image, Image.Image) and image.mode != "RGB":
            # Grayscale, palette, CMYK, RGBA and 16-bit files exist in real data sets.
            image = to_mode(image, 3)
        return self.transform(image), int(label)  # (3, S, S) float32, class index


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices of a fixed, seeded hold-out: identical on every rank and run."""
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold out a val split, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


# ----------------------------------------------------------------------------- datamodule


def _imagefolder_classes(root: Path) -> list[str]:
    """Class names of an imagefolder: the sorted folder names under root/train, or, to evaluate
    without train/, under the first of val/ and test/ that exists (it must then hold one folder
    per class of the model: torchvision's ImageFolder numbers the sorted folder names)."""
    folder = next((root / s for s in SPLITS if (root / s).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            f"imagefolder: none of {root}/train, val, test exists; lay out `root` as "
            f"{_IMAGEFOLDER_LAYOUT}"
        )
    try:
        return find_classes(folder)[0]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"imagefolder: {err} Expected {_IMAGEFOLDER_LAYOUT}") from err


class ClassificationDataModule(SplitLoaders, LightningDataModule):
    """torchvision's real classification data sets, preprocessed for ImageNet-pretrained backbones.

    Batches are `(images (B, 3, S, S) float32, labels (B,) int64)`. CIFAR and Pets have no val
    split: `val_fraction` of their train split is held out (seeded by `seed`). Flowers-102 uses
    its own train/val/test. `imagefolder` reads `root/{train,val,test}/<class>/*`; without test/,
    test uses val/ (with a warning). Imagefolder files are checked once at setup (a header parse,
    see `find_bad_images`): an unreadable one raises an error naming it, or with
    `skip_bad_images` is dropped, listed in `skipped_images` and counted in one warning per
    folder. Images of any mode (grayscale, RGBA, CMYK, 16-bit) are converted to 8-bit RGB
    (`datamodules.formats.image`). Each stage needs only the splits it reads.
    """

    def __init__(
        self,
        dataset: DatasetName = "cifar10",
        root: str = "data",
        download: bool = False,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        augment: bool = True,
        val_fraction: float = 0.1,
        skip_bad_images: bool = False,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset not in (*NUM_CLASSES, "imagefolder"):
            raise ValueError(f"unknown dataset {dataset!r}; one of {[*NUM_CLASSES, 'imagefolder']}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_eval_samples is not None and max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be >= 1 or null, got {max_eval_samples}")
        self.root = Path(root).expanduser()
        self.class_names: list[str] = []  # filled by setup()
        self.skipped_images: list[str] = []  # imagefolder files dropped by skip_bad_images
        self._bases: dict[str, Dataset] = {}  # on-disk split name -> torchvision data set
        self._splits: dict[str, _Split] = {}  # "train" | "val" | "test" -> transformed subset

    @property
    def num_classes(self) -> int:
        """Known without setup, so the CLI can link it to the model (imagefolder: lists train/)."""
        if self.hparams.dataset in NUM_CLASSES:
            return NUM_CLASSES[self.hparams.dataset]
        return len(self.class_names or _imagefolder_classes(self.root))

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only)."""
        if self.hparams.download and self.hparams.dataset != "imagefolder":
            for on_disk in {self._on_disk(split) for split in SPLITS}:
                self._load(on_disk, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` needs (all three when stage is None); cached across calls."""
        todo = {s: self._on_disk(s) for s in stage_splits(stage) if s not in self._splits}
        for split, on_disk in todo.items():  # every missing file first, before any is read
            _check_present(self.hparams.dataset, self.root, split, on_disk, stage)
        if todo and self.hparams.dataset == "imagefolder" and not self.class_names:
            self.class_names = _imagefolder_classes(self.root)  # every split must match these
        for split, on_disk in todo.items():
            self._splits[split] = self._build(split, on_disk)

    # --------------------------------------------------------------- building

    def _on_disk(self, split: str) -> str:
        """The on-disk split that holds `split` (CIFAR and Pets carve val out of train)."""
        hp = self.hparams
        if hp.dataset in _HOLDOUT and split != "test":
            return "trainval" if hp.dataset == "pets" else "train"
        root = self.root
        if hp.dataset == "imagefolder" and split == "test" and not (root / "test").is_dir():
            if not (root / "val").is_dir():
                return "test"  # neither: the error names test/
            rank_zero_warn(f"imagefolder: no {root / 'test'} folder, so `test` evaluates val/")
            return "val"
        return split

    def _load(self, on_disk: str, download: bool = False) -> Dataset:
        """The torchvision data set of one on-disk split (no transform: `_Split` applies it)."""
        hp, root = self.hparams, str(self.root)
        if hp.dataset == "cifar10":
            return CIFAR10(root, train=on_disk == "train", download=download)
        if hp.dataset == "cifar100":
            return CIFAR100(root, train=on_disk == "train", download=download)
        if hp.dataset == "pets":
            return datasets.OxfordIIITPet(
                root, split=on_disk, target_types="category", download=download
            )
        if hp.dataset == "flowers102":
            return Flowers102(root, split=on_disk, download=download)
        return self._load_imagefolder(self.root / on_disk)

    def _load_imagefolder(self, folder: Path) -> datasets.ImageFolder:
        """An ImageFolder whose files all open as images (or raise, naming the first bad one)."""
        try:  # our reader: any mode -> RGB (16-bit scaled), an error naming an unreadable file
            ds = datasets.ImageFolder(str(folder), loader=open_image)
        except FileNotFoundError as err:  # no class folders, or a class folder without images
            msg = f"imagefolder: {folder}: {err} Expected {_IMAGEFOLDER_LAYOUT}"
            raise FileNotFoundError(msg) from err
        bad = find_bad_images([path for path, _ in ds.samples])
        if bad and not self.hparams.skip_bad_images:
            path, reason = next(iter(bad.items()))
            raise OSError(
                f"imagefolder: {path} is not a readable image ({reason}); {len(bad)} bad file(s) "
                f"in {folder}. Remove them or set `skip_bad_images: true`."
            )
        if bad:
            first = ", ".join(list(bad)[:3])
            rank_zero_warn(
                f"imagefolder: skipped {len(bad)} unreadable image(s) in {folder}: {first}"
            )
            self.skipped_images.extend(bad)
            ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in bad]
            ds.targets = [label for _, label in ds.samples]
        if not ds.samples:
            raise FileNotFoundError(f"imagefolder: no readable images in {folder}")
        return ds

    def _base(self, on_disk: str) -> Dataset:
        """The (cached) data set of one on-disk split; all splits must share one class list."""
        if on_disk not in self._bases:
            base = self._load(on_disk)
            classes = list(base.classes)
            if not self.class_names:
                self.class_names = classes
            elif classes != self.class_names:
                raise ValueError(
                    f"{self.hparams.dataset}: the classes of split {on_disk!r} differ from the other "
                    f"splits' ({len(classes)} vs {len(self.class_names)}: {classes[:5]}... vs "
                    f"{self.class_names[:5]}...); labels would not mean the same class"
                )
            self._bases[on_disk] = base
        return self._bases[on_disk]

    def _build(self, split: str, on_disk: str) -> _Split:
        hp = self.hparams
        base = self._base(on_disk)
        indices = list(range(len(base)))
        if hp.dataset in _HOLDOUT and split != "test":
            train_idx, val_idx = holdout_split(len(base), hp.val_fraction, hp.seed)
            indices = train_idx if split == "train" else val_idx
        if split != "train" and hp.max_eval_samples is not None:
            indices = indices[: hp.max_eval_samples]
        transform = imagenet_transform(hp.image_size, train=split == "train", augment=hp.augment)
        return _Split(base, indices, transform)

    # --------------------------------------------------------------- loaders

    def _loader(self, split: str) -> DataLoader:
        if split not in self._splits:  # called outside a Trainer, without setup()
            self.setup(SPLIT_STAGE[split])
        hp = self.hparams
        return make_loader(
            self._splits[split],
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            train=split == "train",
        )
