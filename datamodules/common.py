"""Pieces every DataModule shares: loaders that count each evaluation sample exactly once."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    """
    sampler = None
    if not train and _distributed():
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
