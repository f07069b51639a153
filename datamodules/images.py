"""Unlabelled images for GANs: the embedded digits, ImageFolder / LSUN, CelebA, CIFAR-10.

A GAN trains on images alone, so batches are `(B, C, S, S)` float32 tensors in [-1, 1] (G's tanh
range), no labels. Validation still needs real images: the FID compares G's samples with them.
Nothing downloads unless `download: true` (CIFAR-10 and CelebA, in `prepare_data`).

`predict` feeds sample indices 0..num_samples-1, not images: the GAN turns index i into its own
seeded latent vector, so sample i is the same picture on any number of devices.

No model selection on the test images: val (which chooses the checkpoint by `val/fid`) and test
are disjoint in every data set. The test split is the FID's real *reference*
(`test_reference: test`, or a seeded half of the training images with `test_reference: train`,
for data whose test split is too small for a stable FID, like the 500 embedded test digits), and
with `fid_floor` its items are dicts `{"image", "floor"}`: `floor` marks a second real set,
disjoint from the reference and as large, drawn (seeded) from the training images. The GAN scores
it as `test/fid_floor`: the FID of real against real at these sample counts, the best a G can get.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from datamodules.classification import CIFAR10, holdout_split
from datamodules.common import SPLIT_STAGE, SplitLoaders, make_loader, stage_needs, stage_splits
from datamodules.digits import load_mnist5k
from datamodules.formats.image import open_image, scan_images, to_mode

DatasetName = Literal["digits", "imagefolder", "lsun", "celeba", "cifar10"]
DATASETS = ("digits", "imagefolder", "lsun", "celeba", "cifar10")
MODE_POLICIES = ("convert", "error")
SPLITS = ("train", "val", "test")
_LSUN_HINT = (
    "LSUN ships as LMDB: export a category to JPEG files first (github.com/fyu/lsun: "
    "`python3 data.py export bedroom_train_lmdb --out_dir DIR`) and set root: DIR"
)


def _scale(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> [-1, 1] float32 (G's tanh range)."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x * 2.0 - 1.0


def image_transform(image_size: int, channels: int) -> v2.Compose:
    """PIL image -> (C, S, S) float32 in [-1, 1]: resize the short side to S, centre crop S."""
    return v2.Compose(
        [
            v2.ToImage(),  # (C, H, W) uint8
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),  # CelebA 178x218 -> 64x64 keeps the face (DCGAN's crop)
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),  # [0, 1] -> [-1, 1]
        ]
    )


def list_images(root: Path) -> list[str]:
    """Every image file under `root` (recursively, sorted), by extension."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"image folder {root} holds no images (looked for {', '.join(IMG_EXTENSIONS)} "
            "files in it and its subfolders)"
        )
    return files


def check_modes(folder: Path, modes: dict[str, str], channels: int, policy: str) -> None:
    """Reject unreadable files; with policy `error`, also any image not already RGB (or L)."""
    bad = {p: m for p, m in modes.items() if m.startswith("error")}
    if bad:
        path, reason = next(iter(bad.items()))
        raise OSError(
            f"{path} is not a readable image ({reason[7:]}); {len(bad)} bad file(s) in {folder}"
        )
    want = "RGB" if channels == 3 else "L"
    other = {p: m for p, m in modes.items() if m != want}
    if not other:
        return
    counts = Counter(modes.values())
    summary = ", ".join(f"{n} {m}" for m, n in counts.most_common())
    example = ", ".join(f"{Path(p).name} is {m}" for p, m in list(other.items())[:3])
    if policy == "error":
        raise ValueError(
            f"{folder}: images of mixed modes ({summary}; e.g. {example}), expected all {want}. "
            f"Set `mixed_modes: convert` to convert them to {want} (transparency onto black)."
        )
    rank_zero_warn(f"{folder}: converting {len(other)} image(s) to {want} ({summary})")


def digits_images(split: str, image_size: int = 32, channels: int = 1) -> torch.Tensor:
    """MNIST-5k `split` as GAN images: (N, C, S, S) float32 in [-1, 1], black 2-pixel border.

    Same order as `load_mnist5k()[split].labels`, so the D-feature SVM can label them.
    """
    x = torch.from_numpy(load_mnist5k()[split].images).unsqueeze(1)  # (N, 1, 28, 28) uint8
    x = F.pad(_scale(x), (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32)
    if image_size != 32:
        x = F.interpolate(x, size=image_size, mode="bilinear", antialias=True)
    return x.expand(-1, channels, -1, -1).contiguous()


class _Tensors(Dataset):
    """Preprocessed images held in memory: (N, C, S, S) float32."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class _Files(Dataset):
    """Image files, converted to the wanted mode and transformed: (C, S, S) float32."""

    def __init__(self, paths: Sequence[str], transform: v2.Compose, channels: int) -> None:
        self.paths, self.transform, self.channels = list(paths), transform, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # any mode -> RGB / L (16-bit scaled); an unreadable file is an OSError naming it
        return self.transform(open_image(self.paths[i], channels=self.channels))


class _Subset(Dataset):
    """`indices` of a torchvision (image, target) data set, images only, transformed."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: v2.Compose, channels: int):
        self.base, self.indices, self.transform, self.channels = (
            base,
            list(indices),
            transform,
            channels,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.base[self.indices[i]][0]
        return self.transform(to_mode(image, self.channels))


class _Tagged(Dataset):
    """Test items `{"image": (C, S, S), "floor": bool}`: the reference, or the floor's real set."""

    def __init__(self, base: Dataset, floor: bool) -> None:
        self.base, self.floor = base, floor

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.base[i], "floor": torch.tensor(self.floor)}


def seeded_order(n: int, seed: int) -> list[int]:
    """A fixed permutation of 0..n-1 (the same on every rank and run)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class _Indices(Dataset):
    """0..n-1 as int64 scalars: which latent vectors `predict` draws."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class CelebA(datasets.CelebA):
    """torchvision's CelebA that checks its files exist instead of their md5 on every load."""

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        files = [name for _, _, name in self.file_list if not name.endswith(".zip")]
        return (base / "img_align_celeba").is_dir() and all((base / f).is_file() for f in files)


class ImageDataModule(SplitLoaders, LightningDataModule):
    """Images in [-1, 1] for a GAN; val/test are real images for the FID.

    - `digits`: the embedded MNIST-5k split (train 4,000 / val 500 / test 500), 28x28 padded with
      2 black pixels to 32x32 (64: then resized), one channel (3: repeated).
    - `imagefolder` / `lsun`: every image under `root` (any sub-folders; class folders are
      ignored). With split folders under root (`train/`, `val/`, optional `test/`; test falls
      val/test: the checkpoint is chosen on val/, so test/ must be there to test), each stage
      reads only its own; otherwise `val_fraction` of every image is held out (seeded) for val
      and a disjoint `test_fraction` for test. Headers are checked at setup: an unreadable (corrupt, truncated) file
      is an error naming it; modes other than the wanted one (L, P, RGBA, CMYK, 16-bit...) are
      converted (`datamodules.formats.image`) with one warning giving the count, or rejected
      with `mixed_modes: error`.
    - `celeba`: torchvision's layout under `root/celeba`, its train/valid/test split, resized
      and centre-cropped to `image_size` (64 in DCGAN's experiments).
    - `cifar10`: a seeded `val_fraction` of the train batches is held out for val; the rest
      trains; the test batch (10,000) is the test.
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        root: str = "data",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        download: bool = False,
        val_fraction: float = 0.05,
        test_fraction: float | None = None,
        test_reference: Literal["test", "train"] = "test",
        fid_floor: bool = True,
        mixed_modes: Literal["convert", "error"] = "convert",
        check_images: bool = True,
        max_eval_samples: int | None = None,
        num_samples: int = 64,
        seed: int = 0,
    ) -> None:
        """
        Args:
            channels: 1 (grayscale) or 3 (RGB); images are converted to it.
            val_fraction: imagefolder/lsun without split folders, and cifar10: the share of the
                (training) images held out, seeded, for val.
            test_fraction: imagefolder/lsun without split folders: the share held out for test,
                disjoint from val (null: as large as val_fraction).
            test_reference: the test FID's real images: the `test` split, or `train`: a seeded
                half of the training images (at most max_eval_samples; the floor's set is the
                other half).
            fid_floor: test also yields a second real set (as many training images as the
                reference, disjoint from it), marked `floor`, for `test/fid_floor`.
            mixed_modes: imagefolder/lsun: `convert` other modes to the wanted one, or `error`.
            check_images: imagefolder/lsun: read every header at setup (turn off for millions).
            max_eval_samples: at most this many val/test images (the FID's real sample).
            num_samples: how many samples `predict` asks the GAN for.
        """
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if mixed_modes not in MODE_POLICIES:
            raise ValueError(f"mixed_modes must be convert or error, got {mixed_modes!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size not in (32, 64):
            raise ValueError(
                f"image_size must be 32 or 64 (the DCGAN nets' sizes), got {image_size}"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if test_fraction is not None and not 0.0 < val_fraction + test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1 - val_fraction), got {test_fraction}")
        if test_reference not in ("test", "train"):
            raise ValueError(f"test_reference must be test or train, got {test_reference!r}")
        if max_eval_samples is not None and max_eval_samples < 2:
            raise ValueError(
                f"max_eval_samples must be >= 2 (an FID needs two) or null, got {max_eval_samples}"
            )
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.root = Path(root).expanduser()
        self.channels, self.image_size = channels, image_size
        self._sets: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only)."""
        hp = self.hparams
        if hp.download and hp.dataset == "cifar10":
            for train in (True, False):
                CIFAR10(str(self.root), train=train, download=True)
        elif hp.download and hp.dataset == "celeba":
            CelebA(str(self.root), split="all", target_type=[], download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` reads (all three when stage is None); cached across calls.

        `predict` reads no images at all: it feeds sample indices (see `predict_dataloader`).
        """
        if stage == "predict":
            return
        builders = {
            "digits": self._digits,
            "imagefolder": self._folder,
            "lsun": self._folder,
            "celeba": self._celeba,
            "cifar10": self._cifar10,
        }
        self._build = builders[self.hparams.dataset]
        for split in stage_splits(stage):
            if split in self._sets:
                continue
            if split == "test":
                self._sets[split] = self._test_set(stage)
            else:
                self._sets[split] = self._limited(self._build(split, stage), split)

    def _limited(self, data: Dataset, split: str) -> Dataset:
        limit = self.hparams.max_eval_samples
        if split != "train" and limit is not None and len(data) > limit:
            return Subset(data, range(limit))
        return data

    def _test_set(self, stage: str | None) -> Dataset:
        """The FID's real reference, plus (`fid_floor`) as many other real images tagged floor."""
        hp = self.hparams
        if hp.test_reference == "test" and not hp.fid_floor:
            return self._limited(self._build("test", stage), "test")
        try:
            train = self._build("train", stage)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} (test reads training images for the FID floor or reference: set "
                "`fid_floor: false` and `test_reference: test` to test without them)"
            ) from err
        order = seeded_order(len(train), hp.seed + 1)
        if hp.test_reference == "train":
            n = len(train) // 2
            n = n if hp.max_eval_samples is None else min(n, hp.max_eval_samples)
            reference, others = Subset(train, order[:n]), order[n : 2 * n]
        else:
            reference = self._limited(self._build("test", stage), "test")
            others = order[: len(reference)]
        if not hp.fid_floor:
            return reference
        if len(others) < len(reference):
            rank_zero_warn(
                f"the FID floor compares {len(reference)} reference images with only "
                f"{len(others)} other real images: the training split has no more"
            )
        return ConcatDataset([_Tagged(reference, False), _Tagged(Subset(train, others), True)])

    # --------------------------------------------------------------- builders

    def _digits(self, split: str, stage: str | None) -> Dataset:
        return _Tensors(digits_images(split, self.image_size, self.channels))

    def _folder_files(self, split: str, stage: str | None) -> list[str]:
        """The image files of `split`: root/<split> when root has split folders, else a seeded
        hold-out of every image under root (test = val)."""
        hp = self.hparams
        if not self.root.is_dir():
            hint = f"; {_LSUN_HINT}" if hp.dataset == "lsun" else ""
            raise FileNotFoundError(f"{hp.dataset}: image folder {self.root} does not exist{hint}")
        if any((self.root / s).is_dir() for s in SPLITS):
            folder = self.root / split
            if not folder.is_dir():
                what = f"{folder} does not exist (root has split folders: each stage reads its own"
                if split == "test":
                    what += "; val/ chooses the checkpoint, so it cannot also be the test"
                raise FileNotFoundError(stage_needs(hp.dataset, stage, split, what + ")"))
            return list_images(folder)
        every = list_images(self.root)
        return [every[i] for i in self._three_way(len(every))[split]]

    def _three_way(self, n: int) -> dict[str, list[int]]:
        """Seeded, disjoint train / val / test indices of n images (val_fraction, test_fraction)."""
        hp = self.hparams
        test_fraction = hp.val_fraction if hp.test_fraction is None else hp.test_fraction
        if n < 3:
            raise ValueError(
                f"{self.root}: need at least 3 images to hold out val and test, got {n}"
            )
        order = seeded_order(n, hp.seed)
        n_val = max(1, round(n * hp.val_fraction))
        n_test = max(1, min(n - n_val - 1, round(n * test_fraction)))
        val, test = order[:n_val], order[n_val : n_val + n_test]
        return {"train": sorted(order[n_val + n_test :]), "val": sorted(val), "test": sorted(test)}

    def _folder(self, split: str, stage: str | None) -> Dataset:
        hp = self.hparams
        files = self._folder_files(split, stage)
        if hp.check_images:
            check_modes(self.root, scan_images(files), self.channels, hp.mixed_modes)
        return _Files(files, image_transform(self.image_size, self.channels), self.channels)

    def _celeba(self, split: str, stage: str | None) -> Dataset:
        base = self.root / CelebA.base_folder
        on_disk = {"train": "train", "val": "valid", "test": "test"}[split]
        try:
            data = CelebA(str(self.root), split=on_disk, target_type=[], download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"celeba: {base} must hold img_align_celeba/ and the list_*.txt / identity_CelebA.txt "
                f"files ({err}); pass `download: true` or point `root` at them"
            ) from err
        transform = image_transform(self.image_size, self.channels)
        return _Subset(data, range(len(data)), transform, self.channels)

    def _cifar10(self, split: str, stage: str | None) -> Dataset:
        """Train on CIFAR-10's train batches less a seeded `val_fraction` held out for val; test
        on its test batch (only the batches of the split being read must be on disk)."""
        base = self.root / CIFAR10.base_folder
        if not base.is_dir():
            raise FileNotFoundError(
                f"cifar10: {base} not found; pass `download: true` to fetch it into {self.root}"
            )
        train = split != "test"
        try:
            data = CIFAR10(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            what = f"its {'train' if train else 'test'} batches are not all in {base} ({err})"
            raise FileNotFoundError(stage_needs("cifar10", stage, split, what)) from err
        transform = image_transform(self.image_size, self.channels)
        if not train:
            return _Subset(data, range(len(data)), transform, self.channels)
        train_idx, val_idx = holdout_split(len(data), self.hparams.val_fraction, self.hparams.seed)
        return _Subset(data, train_idx if split == "train" else val_idx, transform, self.channels)

    # --------------------------------------------------------------- loaders

    def _loader(self, split: str) -> DataLoader:
        if split not in self._sets:  # a loader asked for outside a Trainer, without setup()
            self.setup(SPLIT_STAGE[split])
        hp = self.hparams
        train = split == "train"
        # drop_last in training: a last batch of 1 image would break BatchNorm (and D's balance).
        return make_loader(
            self._sets[split],
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            train=train,
            drop_last=train and len(self._sets[split]) > hp.batch_size,
        )

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        return make_loader(
            _Indices(hp.num_samples), batch_size=hp.batch_size, num_workers=0, train=False
        )
