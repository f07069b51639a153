"""Pieces every DataModule shares: which splits a stage reads, and loaders that count each
evaluation sample exactly once."""

from __future__ import annotations

from collections.abc import Callable, Sized

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

# The splits each Trainer stage reads: `test` / `predict` / `validate` need only the split they
# evaluate (plus the checkpoint), so evaluating on a test set alone must not require train data.
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test"}  # a loader asked before setup


def stage_splits(stage: str | None) -> tuple[str, ...]:
    """The splits `stage` reads; all three when stage is None (`setup()` called by hand)."""
    if stage is None:
        return ("train", "val", "test")
    if stage not in STAGE_SPLITS:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGE_SPLITS)}")
    return STAGE_SPLITS[stage]


def stage_needs(owner: str, stage: str | None, split: str, missing: str) -> str:
    """The message for a split that `stage` reads but that is not there (an option, a folder)."""
    return f"{owner}: stage {stage or 'setup()'!r} reads the {split} split, but {missing}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EpochShuffleSampler(RandomSampler):
    """A shuffle that is a pure function of (seed, epoch).

    `RandomSampler` draws its order from the global RNG when an epoch's iterator is created, so a
    run resumed from a checkpoint sees another order than the uninterrupted run would have.
    Lightning calls `set_epoch` before every training epoch (also right after a resume); under
    DDP it swaps this sampler (a `RandomSampler`) for a `DistributedSampler`, epoch-seeded too.
    """

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = (torch.initial_seed() if seed is None else seed) % 2**62
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # read by `GroupedBatchSampler`, which shuffles by (seed, epoch) too
        self.generator.manual_seed(self.seed + 1_000_003 * epoch)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader for one split.

    Evaluation loaders get an `UnrepeatedDistributedSampler` under DDP: Lightning's default
    `DistributedSampler` pads the last shard by repeating samples, which would count some
    validation/test images twice and make a 2-GPU accuracy differ from a 1-GPU one.
    The training loader shuffles by epoch (`EpochShuffleSampler`) and draws its workers' base
    seed from its own generator, never from the global RNG: Lightning creates a resumed run's
    first iterator at another moment than the uninterrupted run's, and that draw would shift
    every random number (dropout, augmentation in this process) after it.
    """
    generator = None
    if train:
        sampler: Sampler = EpochShuffleSampler(dataset)
        generator = torch.Generator().manual_seed(sampler.seed)
    elif _distributed():
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        drop_last=drop_last,
        generator=generator,
    )


class SplitLoaders:
    """LightningDataModule mixin: the four loaders from one `_loader(split)`; predict reads test."""

    def _loader(self, split: str) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
