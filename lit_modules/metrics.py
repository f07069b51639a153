"""Metrics torchmetrics lacks: the FCN paper's four segmentation scores from one confusion matrix,
and a COCO mAP whose DDP sync works when ranks hold different numbers of images.

The confusion matrix itself is a torchmetrics `MulticlassConfusionMatrix(ignore_index=255)`: it
syncs across DDP ranks (a sum), so the scores computed from it are those of the whole data set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchmetrics.detection import MeanAveragePrecision

FCN_SCORES = ("pixel_acc", "mean_acc", "miou", "fwiou")


def fcn_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel accuracy, mean accuracy, mean IU and frequency-weighted IU (Long et al. §5).

    confusion: (K, K), n_ij = pixels of true class i predicted as class j (torchmetrics' layout:
    rows are targets). With t_i = sum_j n_ij:
        pixel acc = sum_i n_ii / sum_i t_i
        mean acc  = (1/n_cl) sum_i n_ii / t_i
        mean IU   = (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
        f.w. IU   = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
    A class never in the ground truth has no accuracy (0/0) and, if never predicted either, no
    IU: it is left out of the means (n_cl counts the classes that have one), as the authors'
    `score.py` does with `nanmean`. Returns 0-d float64 tensors.
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got {tuple(confusion.shape)}")
    n = confusion.double()
    diag = n.diagonal()  # n_ii
    t = n.sum(1)  # t_i: ground-truth pixels of class i
    predicted = n.sum(0)  # sum_j n_ji: pixels predicted as class i
    total = t.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: no labelled pixel was scored")
    acc = diag / t  # NaN where t_i == 0
    iu = diag / (t + predicted - diag)  # NaN where class i is neither present nor predicted
    return {
        "pixel_acc": diag.sum() / total,
        "mean_acc": acc.nanmean(),
        "miou": iu.nanmean(),
        "fwiou": (t * iu).nansum() / total,  # t_i = 0 wherever iu is NaN
    }


def interleave(shards: list[list[Any]]) -> list[Any]:
    """Rank-major shards back in data-set order: rank r's i-th item is item i * W + r.

    That is how `UnrepeatedDistributedSampler` (every cnnlab evaluation loader) deals out an
    evaluation set; in the original order, images get the 1-process image ids, so even score ties
    in the COCO matching break the same way as on one process.
    """
    longest = max((len(s) for s in shards), default=0)
    return [shard[i] for i in range(longest) for shard in shards if i < len(shard)]


class ShardedMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' COCO mAP with a DDP sync that allows uneven shards.

    torchmetrics gathers its per-image list states one tensor at a time, so ranks holding
    different numbers of images (an evaluation set that does not divide by the number of ranks,
    counted once) make different numbers of collective calls: gloo aborts with "Received data
    size doesn't match expected size", NCCL hangs. Here each list state is gathered as one object
    per rank, whatever its length, dtype or emptiness (a rank with no detections).
    """

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        world = dist.get_world_size(process_group)
        for attr in self._reductions:
            local = [_to_cpu(v) for v in getattr(self, attr)]  # tensors, or segm RLE tuples
            shards: list[Any] = [None] * world
            dist.all_gather_object(shards, local, group=process_group)
            setattr(self, attr, [_to_device(v, self.device) for v in interleave(shards)])


def _to_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
