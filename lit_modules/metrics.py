"""Metrics torchmetrics lacks: the FCN paper's four segmentation scores from one confusion matrix,
the PASCAL VOC 2007 11-point AP that the R-CNN papers report, and a COCO mAP whose DDP sync works
when ranks hold different numbers of images.

The confusion matrix itself is a torchmetrics `MulticlassConfusionMatrix(ignore_index=255)`: it
syncs across DDP ranks (a sum), so the scores computed from it are those of the whole data set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric
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


class ShardedListStates:
    """Mixin for a torchmetrics Metric with per-image list states: a DDP sync that allows uneven shards.

    torchmetrics gathers list states one tensor at a time, so ranks holding different numbers of
    images (an evaluation set that does not divide by the number of ranks, counted once) make
    different numbers of collective calls: gloo aborts with "Received data size doesn't match
    expected size", NCCL hangs. Here each list state is gathered as one object per rank, whatever
    its length, dtype or emptiness (a rank with no detections), and put back in data-set order.
    Put it before the Metric class in the bases so that its `_sync_dist` wins.
    """

    _reductions: dict[str, Any]
    device: torch.device

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        world = dist.get_world_size(process_group)
        for attr in self._reductions:
            local = [_to_cpu(v) for v in getattr(self, attr)]  # tensors, or segm RLE tuples
            shards: list[Any] = [None] * world
            dist.all_gather_object(shards, local, group=process_group)
            setattr(self, attr, [_to_device(v, self.device) for v in interleave(shards)])


class ShardedMeanAveragePrecision(ShardedListStates, MeanAveragePrecision):
    """torchmetrics' COCO mAP with the uneven-shard DDP sync of `ShardedListStates`."""


def _to_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


# ----------------------------------------------------------------------------- VOC 2007 AP

# The 11 recall levels exactly as py-faster-rcnn's voc_eval.py (np.arange(0.0, 1.1, 0.1)) makes
# them in float64, so a recall landing exactly on k/10 falls on the same side as there.
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of continuous xyxy boxes a (N, 4) and b (M, 4): (N, M) float64, 0 for empty unions."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t."""
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in VOC07_RECALLS]
    return float(np.mean(points))


def voc07_class_aps(
    detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    truths: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """VOC07 AP of every class that has a non-difficult ground truth, as the VOC devkit scores it.

    detections: per image (boxes (N, 4) xyxy, scores (N,), labels (N,)); truths: per image
    (boxes (M, 4) xyxy, labels (M,), difficult (M,) bool), both in data-set order.
    Per class, detections are taken by decreasing score (ties: data-set order, as the devkit's
    stable MATLAB sort); each one goes to the ground truth of its class and image with the highest
    IoU (VOCevaldet.m). If that IoU is >= `iou_threshold`: a difficult box -> ignored (neither TP
    nor FP), already taken -> FP (a duplicate, even if another free box overlaps enough), else TP.
    Otherwise FP. Positives are the non-difficult boxes.
    """
    best_iou, best_gt, offset = [], [], 0  # per detection: its best same-class truth
    for (d_boxes, _, d_labels), (t_boxes, t_labels, _) in zip(detections, truths, strict=True):
        iou = box_iou_np(d_boxes.reshape(-1, 4), t_boxes.reshape(-1, 4))  # (N, M)
        iou[d_labels[:, None] != t_labels[None, :]] = -np.inf  # only boxes of the same class
        j = iou.argmax(1) if iou.shape[1] else np.zeros(len(d_boxes), np.int64)
        best_iou.append(iou[np.arange(len(j)), j] if iou.shape[1] else np.full(len(j), -np.inf))
        best_gt.append(j + offset)
        offset += len(t_boxes)
    scores = np.concatenate([np.zeros(0)] + [d[1] for d in detections]).astype(np.float64)
    labels = np.concatenate([np.zeros(0, np.int64)] + [d[2] for d in detections])
    t_labels = np.concatenate([np.zeros(0, np.int64)] + [t[1] for t in truths])
    difficult = np.concatenate([np.zeros(0, bool)] + [t[2] for t in truths]).astype(bool)
    best_iou_all = np.concatenate([np.zeros(0)] + best_iou)
    best_gt_all = np.concatenate([np.zeros(0, np.int64)] + best_gt)

    order = np.argsort(-scores, kind="stable")
    tp, fp = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    taken = np.zeros(len(t_labels), bool)
    for d in order.tolist():  # greedy, in score order; classes never share a truth
        g = best_gt_all[d]
        if best_iou_all[d] < iou_threshold:
            fp[d] = True
        elif not difficult[g]:
            fp[d] = taken[g]
            tp[d] = not taken[g]
            taken[g] = True

    aps = {}
    for c in np.unique(t_labels[~difficult]).tolist():
        ranked = order[labels[order] == c]  # this class's detections, best first
        tps, fps = np.cumsum(tp[ranked]), np.cumsum(fp[ranked])
        recall = tps / np.count_nonzero((t_labels == c) & ~difficult)
        precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)  # 0 before any TP / FP
        aps[int(c)] = voc07_ap(recall, precision)
    return aps


class VOC07MeanAveragePrecision(ShardedListStates, Metric):
    """PASCAL VOC 2007 mAP at IoU 0.5 (11-point interpolated AP): the metric of R-CNN, SPP-net,
    Fast and Faster R-CNN tables; see `voc07_class_aps` for the matching.

    `update(preds, targets)` takes torchvision's / MeanAveragePrecision's dicts: preds with
    `boxes` (xyxy), `scores`, `labels`; targets with `boxes`, `labels` and optional `iscrowd`
    (cnnlab's flag for VOC `difficult` objects). `compute()` is the mean AP over the classes with
    at least one non-difficult ground truth (-1 when there is none, as torchmetrics' mAP), on CPU.

    IoU is that of the continuous boxes, without the devkit's +1: cnnlab keeps VOC's 1-based
    inclusive pixel boxes as x1 = xmin - 1, x2 = xmax (formats/voc.py), and then the continuous
    IoU equals the devkit's +1 IoU on the XML's integer boxes exactly (py-faster-rcnn instead adds
    1 to its 0-based inclusive boxes: the same for ground truth). The threshold is the devkit's
    `>= 0.5` (voc_eval.py uses `> 0.5`: they differ only at IoU exactly 0.5).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    STATES = ("det_boxes", "det_scores", "det_labels", "gt_boxes", "gt_labels", "gt_difficult")

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold
        for name in self.STATES:
            self.add_state(name, default=[], dist_reduce_fx=None)

    def update(
        self, preds: list[dict[str, torch.Tensor]], target: list[dict[str, torch.Tensor]]
    ) -> None:
        for p, t in zip(preds, target, strict=True):
            self.det_boxes.append(p["boxes"].detach().reshape(-1, 4))
            self.det_scores.append(p["scores"].detach())
            self.det_labels.append(p["labels"].detach())
            self.gt_boxes.append(t["boxes"].detach().reshape(-1, 4))
            self.gt_labels.append(t["labels"].detach())
            self.gt_difficult.append(t.get("iscrowd", torch.zeros_like(t["labels"])).bool())

    def compute(self) -> torch.Tensor:
        def per_image(*states: list[torch.Tensor]) -> list[tuple[np.ndarray, ...]]:
            return [  # float32 first: numpy has no bf16 (a bf16-mixed run's predictions)
                tuple((v.float() if v.is_floating_point() else v).cpu().numpy() for v in image)
                for image in zip(*states, strict=True)
            ]

        detections = per_image(self.det_boxes, self.det_scores, self.det_labels)
        truths = per_image(self.gt_boxes, self.gt_labels, self.gt_difficult)
        aps = voc07_class_aps(detections, truths, self.iou_threshold)
        return torch.tensor(float(np.mean(list(aps.values()))) if aps else -1.0)
