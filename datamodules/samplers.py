"""Batch samplers that give every DDP rank the same number of batches.

Under DDP every training step ends in a gradient all-reduce, so a rank with one batch more than
the others waits in a collective that the others never enter: the run hangs. Lightning's
`DistributedSampler` pads each rank to the same number of images, which is enough for a plain
`BatchSampler` (`make_loader`'s training loader: every rank gets ceil(N / W) images, hence the
same number of batches), but not for batches grouped by aspect ratio: the same number of images
per rank falls into the groups differently and gives each rank its own number of batches.
`GroupedBatchSampler` therefore forms the grouped batches of the whole data set once, identically
on every rank, and deals whole batches out to the ranks (padded by reusing the first batches, as
torchvision's reference sampler pads by reusing images).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


def _shard(sampler: Sampler[int] | Sized) -> tuple[int, int]:
    """(rank, world size) of this process: from the `DistributedSampler` that Lightning injects
    under DDP, else from the process group (`use_distributed_sampler: false`), else (0, 1)."""
    if isinstance(sampler, DistributedSampler):
        return sampler.rank, sampler.num_replicas
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grouped_batches(
    group_ids: list[int], batch_size: int, drop_last: bool, seed: int, epoch: int
) -> list[list[int]]:
    """Every index of `group_ids` in batches of one group, in a shuffle fixed by (seed, epoch).

    Batches are formed as the shuffled indices arrive (so the groups interleave at random); the
    leftovers of each group form a last, smaller batch, dropped with `drop_last`.
    """
    generator = torch.Generator().manual_seed(seed + 1_000_003 * epoch)
    order = torch.randperm(len(group_ids), generator=generator).tolist()
    buckets: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for i in order:
        bucket = buckets.setdefault(group_ids[i], [])
        bucket.append(i)
        if len(bucket) == batch_size:
            batches.append(bucket[:])
            bucket.clear()
    if not drop_last:
        batches += [b for _, b in sorted(buckets.items()) if b]
    return batches


def deal(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s share of `batches`: every `world`-th batch from `rank` on, after padding the
    list to a multiple of `world` with its first batches (reused), so every rank gets as many."""
    if not batches:
        return []
    total = math.ceil(len(batches) / world) * world
    padded = [batches[i % len(batches)] for i in range(total)]
    return padded[rank::world]


class GroupedBatchSampler(BatchSampler):
    """Batches whose images share an aspect-ratio group (wide / tall): less padding per batch.

    The batches are a pure function of (`seed`, epoch), the same on every rank; each rank takes
    every W-th batch (`deal`), so all W ranks run the same number of steps. `sampler` only tells
    the epoch and the shard, never the order: Lightning injects a `DistributedSampler` under DDP
    (whose rank, world size and `set_epoch` are read) and calls `set_epoch` on it, or on the
    `EpochShuffleSampler` given here, before every epoch. `seed` must be the same on every rank
    (the datamodule passes the run's seed) or the ranks would deal from different shuffles.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sized,
        batch_size: int,
        drop_last: bool,
        group_ids: list[int],
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.group_ids, self.seed = list(group_ids), seed

    def _batches(self) -> list[list[int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        rank, world = _shard(self.sampler)
        batches = grouped_batches(self.group_ids, self.batch_size, self.drop_last, self.seed, epoch)
        return deal(batches, rank, world)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for g in self.group_ids:
            counts[g] = counts.get(g, 0) + 1
        rnd = math.floor if self.drop_last else math.ceil
        total = sum(rnd(c / self.batch_size) for c in counts.values())
        return math.ceil(total / _shard(self.sampler)[1])
