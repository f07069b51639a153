"""OverFeat's localization net and its dense, multi-scale use as a detector (Sermanet et al. 2013).

`LocalizationNet` is a conv trunk (a pretrained classifier's conv stages) with two fully
connected heads that both read one training-size window: a classifier over K classes where
class 0 is background, and a box regressor (class-agnostic: 4 numbers; per-class: 4 per class).
Both heads are `Flatten -> Linear` chains, so `convolutionalize` turns the whole net into one
that slides over a larger image: every map cell predicts a class and a box for one window.

`dense_detections` runs that net at several scales and turns each confident cell into a box in
image pixels; `greedy_merge` is OverFeat's box merging (agglomerative: fuse the two most similar
boxes of a class until none overlap enough), `nms` the modern alternative. Nothing here imports
Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lit_modules.nets.backbones import build_backbone
from lit_modules.nets.transfer_net import _cnnlab_checkpoint, load_stages

BOX_HEADS = ("agnostic", "per_class")
MERGES = ("greedy", "nms")
Detections = dict[str, torch.Tensor]  # boxes (N, 4) xyxy image pixels, labels (N,), scores (N,)
LN2 = math.log(2.0)  # softplus(0): offsets of zero decode to half the window
MIN_HALF = 1e-2  # px: the least half-width of a decoded box


# ----------------------------------------------------------------------------- the net


def _is_conv_stage(stage: nn.Module) -> bool:
    """A stage of the trunk, not of the head: no flatten, Linear or global pool inside."""
    head = (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    return not any(isinstance(m, head) for m in stage.modules())


def build_trunk(
    *, backbone: str = "digits_cnn", weights: str | None = None, pool: int = 1
) -> nn.Sequential:
    """The conv stages of classifier `backbone` with `weights`, then an optional max-pool.

    weights: a TransferClassifier checkpoint or exported weights file (`net.stages.*`, e.g. the
    digits classifier), a plain state dict of `backbone`, a torchvision weights name, or null.
    The classifier's own FC layers are dropped (ResNet's last stage goes with its global pool):
    the localization heads replace them. `pool` > 1 coarsens the map: fewer, cheaper windows.
    """
    ckpt = _cnnlab_checkpoint(weights)
    stages, _ = build_backbone(backbone, weights=None if ckpt is not None else weights)
    if ckpt is not None:
        load_stages(stages, ckpt, path=str(weights), backbone=backbone)
    conv = [s for s in stages if _is_conv_stage(s)]
    if not conv:
        raise ValueError(f"backbone {backbone} has no conv stage before its head")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    return nn.Sequential(*conv, *([nn.MaxPool2d(pool)] if pool > 1 else []))


def _map_shape(trunk: nn.Module, in_channels: int, size: int) -> tuple[int, int, int]:
    """(C, h, w) of the trunk's map of one size x size window, or a clear error."""
    was = trunk.training
    try:
        with torch.no_grad():
            out = trunk.eval()(torch.zeros(1, in_channels, size, size))  # (1, C, h, w)
    except RuntimeError as err:  # a pool or conv bigger than the shrinking map
        raise ValueError(f"input_size {size} is too small for this trunk: {err}") from err
    finally:
        trunk.train(was)
    if out.ndim != 4 or min(out.shape[-2:]) < 1:
        raise ValueError(f"input_size {size} is too small for this trunk: its map is empty")
    c, h, w = out.shape[1:]
    return int(c), int(h), int(w)


class LocalizationNet(nn.Module):
    """Trunk -> (class logits (B, K), box offsets (B, 4) or (B, 4K)) for one `input_size` window.

    Class 0 is background. Boxes are encoded relative to the window (see `encode_boxes`).
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        input_size: int,
        num_classes: int,
        hidden: int = 128,
        dropout: float = 0.3,
        box_head: str = "agnostic",
    ) -> None:
        super().__init__()
        if box_head not in BOX_HEADS:
            raise ValueError(f"unknown box_head {box_head!r}; valid: {', '.join(BOX_HEADS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts background + objects: >= 2, got {num_classes}")
        first = next((m for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError("the trunk has no Conv2d layer")
        self.in_channels, self.input_size = first.in_channels, input_size
        self.num_classes = num_classes
        self.per_class = box_head == "per_class"
        c, h, w = _map_shape(trunk, self.in_channels, input_size)
        self.map_size = (h, w)  # the trunk's map of one window: the first FC's conv kernel
        d = c * h * w
        self.features = trunk
        self.cls_head = nn.Sequential(
            nn.Flatten(1), nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip
        self.box_head = nn.Sequential(
            nn.Flatten(1), nn.Linear(d, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 4 * (num_classes if self.per_class else 1)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)  # (B, C, h, w)
        return self.cls_head(f), self.box_head(f)  # (B, K), (B, 4) or (B, 4K)


def build_localization_net(
    *,
    backbone: str = "digits_cnn",
    weights: str | None = None,
    input_size: int = 40,
    num_classes: int = 11,
    pool: int = 2,
    hidden: int = 128,
    dropout: float = 0.3,
    box_head: str = "agnostic",
) -> LocalizationNet:
    trunk = build_trunk(backbone=backbone, weights=weights, pool=pool)
    return LocalizationNet(
        trunk,
        input_size=input_size,
        num_classes=num_classes,
        hidden=hidden,
        dropout=dropout,
        box_head=box_head,
    )


def select_boxes(offsets: torch.Tensor, labels: torch.Tensor, per_class: bool) -> torch.Tensor:
    """(B, 4) offsets of each sample's class from (B, 4) or (B, 4K) head outputs."""
    if not per_class:
        return offsets
    rows = offsets.view(len(offsets), -1, 4)  # (B, K, 4)
    return rows[torch.arange(len(rows), device=rows.device), labels]


# ----------------------------------------------------------------------------- box coding


def encode_boxes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 4) xyxy window pixels -> (N, 4) offsets: the centre's shift from the window's centre
    in window units, and width / height through an inverse softplus: zeros are a box half the
    window, centred. Softplus, not exp: linear for large boxes, so no overflow to clamp, and a
    gradient everywhere (an exp clamped at a bound leaves a box stuck past it with none)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0.5)  # (N, 2)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    y = 2 * wh / size * LN2  # softplus(t) for the target size
    return torch.cat([centre / size - 0.5, y + torch.log(-torch.expm1(-y))], dim=1)


def decode_boxes(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(..., 4) offsets -> (..., 4) xyxy window pixels; a valid box (x2 > x1) whatever the
    offsets: sizes have a floor, where softplus would underflow to a zero-width box."""
    centre = (offsets[..., :2] + 0.5) * size
    half = (F.softplus(offsets[..., 2:]) / LN2 * size / 4).clamp_min(MIN_HALF)  # (..., 2)
    return torch.cat([centre - half, centre + half], dim=-1)


def box_loss(
    offsets: torch.Tensor, boxes: torch.Tensor, *, size: int, kind: str = "smooth_l1"
) -> torch.Tensor:
    """Mean box loss of (N, 4) predicted offsets against (N, 4) xyxy target boxes (window px).

    smooth_l1: on the encoded offsets (Fast R-CNN's). giou: the generalized IoU loss of the
    decoded boxes (scale-free, in [0, 2]) plus the smooth-L1 term, as DETR pairs GIoU with L1:
    alone, GIoU's first gradients (boxes not yet overlapping their targets) only grow the boxes,
    and past the targets its pull back fades as 1 / area: the boxes blow up and stay there.
    """
    if len(boxes) == 0:
        return offsets.sum() * 0.0  # no object in the batch: a zero that keeps the graph
    if kind not in ("smooth_l1", "giou"):
        raise ValueError(f"unknown box loss {kind!r}; valid: smooth_l1, giou")
    loss = F.smooth_l1_loss(offsets, encode_boxes(boxes, size), beta=0.1)
    if kind == "giou":
        pred = decode_boxes(offsets, size) / size
        loss = loss + torchvision.ops.generalized_box_iou_loss(pred, boxes / size, reduction="mean")
    return loss


# ----------------------------------------------------------------------------- dense detection


def _resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    return F.interpolate(
        images, scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1
    )


def dense_detections(
    dense: nn.Module,
    images: torch.Tensor,
    *,
    window: int,
    stride: int,
    scales: Sequence[float],
    per_class: bool,
    score_threshold: float,
) -> list[list[Detections]]:
    """Every confident window of a convolutionalized LocalizationNet, at every scale.

    images: (B, C, H, W), as the net takes them. Map cell (i, j) at scale s is the window whose
    top-left corner is (j * stride, i * stride) in the resized image; its box goes back to image
    pixels (/ s). A cell is kept when its best object class has probability >= score_threshold.
    Returns, per image, one Detections per scale that fits (labels 1..K-1, scores = probability).
    """
    h, w = images.shape[-2:]
    fits = [s for s in scales if math.floor(h * s) >= window and math.floor(w * s) >= window]
    if not fits:
        raise ValueError(
            f"image {h}x{w} is smaller than the net's {window}x{window} window at every scale "
            f"{list(scales)}: no window fits (the smallest input is {window} px at some scale)"
        )
    out: list[list[Detections]] = [[] for _ in range(len(images))]
    for s in fits:
        logits, offsets = dense(_resize(images, s))  # (B, K, h, w), (B, 4 or 4K, h, w)
        prob = logits.float().softmax(1)
        score, label = prob[:, 1:].max(1)  # (B, h, w): the best object class of every cell
        label = label + 1
        b, i, j = (score >= score_threshold).nonzero(as_tuple=True)
        cells = offsets.float().unflatten(1, (-1, 4))  # (B, 1 or K, 4, h, w)
        k = label[b, i, j] if per_class else torch.zeros_like(b)
        boxes = decode_boxes(cells[b, k, :, i, j], window)  # (N, 4) window pixels
        origin = torch.stack([j, i, j, i], 1).to(boxes) * stride  # (N, 4)
        boxes = (boxes + origin) / s
        for n in range(len(images)):
            mine = b == n
            out[n].append(
                {
                    "boxes": boxes[mine],
                    "labels": label[b, i, j][mine],
                    "scores": score[b, i, j][mine],
                }
            )
    return out


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) with (M, 4) float64 boxes, every pair in one broadcast."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    wh = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:]) - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_merge(
    boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """OverFeat's greedy merge of one class's boxes: (M, 4) boxes, (M,) scores, M <= N.

    Repeatedly the two most similar boxes (highest IoU: OverFeat's match score, made scale-free)
    are fused while their IoU reaches `iou_threshold`: the fused box is the score-weighted mean of
    every box merged into it, its score the sum of their scores (OverFeat adds up the class
    outputs of the windows behind a box: many agreeing windows make a confident detection).
    """
    n = len(boxes)
    if n <= 1:
        return boxes, scores
    b = boxes.detach().double().cpu().numpy().copy()  # (N, 4)
    s = scores.detach().double().cpu().numpy().copy()  # (N,)
    alive = np.ones(n, bool)
    iou = _iou_matrix(b, b)  # (N, N)
    np.fill_diagonal(iou, -1.0)
    while True:
        flat = int(iou.argmax())
        p, q = divmod(flat, n)
        if iou[p, q] < iou_threshold:
            break
        total = s[p] + s[q]
        b[p] = (s[p] * b[p] + s[q] * b[q]) / total
        s[p] = total
        alive[q] = False
        iou[q, :] = iou[:, q] = -1.0
        row = np.where(alive, _iou_matrix(b[p : p + 1], b)[0], -1.0)
        row[p] = -1.0
        iou[p, :] = iou[:, p] = row
    return torch.from_numpy(b[alive]).to(boxes), torch.from_numpy(s[alive]).to(scores)


def merge_detections(
    parts: list[Detections],
    *,
    merge: str = "greedy",
    iou_threshold: float = 0.5,
    max_candidates: int = 400,
    max_detections: int = 100,
    cross_class_iou: float | None = None,
) -> Detections:
    """One image's final detections from its per-scale windows, merged per class.

    The `max_candidates` best windows (over all scales) go in; `greedy`: OverFeat's merge,
    `nms`: torchvision's batched NMS (each class on its own). `cross_class_iou` (not in
    OverFeat): a final class-blind NMS at that IoU, so that one object read as two classes by
    different windows keeps only its stronger reading. Sorted by score, at most `max_detections`.
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; valid: {', '.join(MERGES)}")
    boxes = torch.cat([p["boxes"] for p in parts])  # (N, 4)
    labels = torch.cat([p["labels"] for p in parts])  # (N,)
    scores = torch.cat([p["scores"] for p in parts])  # (N,)
    top = scores.argsort(descending=True)[:max_candidates]
    boxes, labels, scores = boxes[top], labels[top], scores[top]
    if merge == "nms":
        keep = torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    else:
        out_b, out_l, out_s = [], [], []
        for c in labels.unique().tolist():
            mine = labels == c
            mb, ms = greedy_merge(boxes[mine], scores[mine], iou_threshold=iou_threshold)
            out_b.append(mb)
            out_s.append(ms)
            out_l.append(torch.full((len(ms),), c, dtype=labels.dtype, device=labels.device))
        if out_b:
            boxes, labels, scores = torch.cat(out_b), torch.cat(out_l), torch.cat(out_s)
    if cross_class_iou is not None:
        keep = torchvision.ops.nms(boxes, scores, cross_class_iou)
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    order = scores.argsort(descending=True)[:max_detections]
    return {"boxes": boxes[order], "labels": labels[order], "scores": scores[order]}
