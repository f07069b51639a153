"""The R-CNN lineage's parts on external proposals: warped crops (R-CNN), pooling of a shared conv
map (SPP-net's pyramid, Fast R-CNN's RoI pool / RoI align), FC heads, box coding, sampling.

A classifier is cut into a conv `trunk` (image -> (B, C, h, w)) and its hidden FC layers `fc`
((N, C, s, s) -> (N, D)), both initialised from its weights file: R-CNN runs trunk + fc on every
warped crop; Fast R-CNN / SPP-net run the trunk once per image and fc on each pooled RoI.
Boxes are (N, 4) xyxy in image pixels everywhere. Nothing here imports Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import RoIAlign, batched_nms, box_iou, clip_boxes_to_image, roi_align
from torchvision.ops import roi_pool as tv_roi_pool

from lit_modules.nets.backbones import (
    build_backbone,
    is_file_path,
    load_weights_file,
)
from lit_modules.nets.detectors import (
    MNIST_MEAN,
    MNIST_STD,
    frozen_bn,
    stage_shapes,
    three_channels,
)
from lit_modules.nets.transfer_net import load_stages

POOLINGS = ("roi_pool", "roi_align", "spp")
CLASSIFIERS = ("softmax", "svm")
# Fast R-CNN's / torchvision's delta scaling: the regression targets get roughly unit variance.
BOX_CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


# ----------------------------------------------------------------------------- trunk


def build_trunk(
    *, backbone: str = "digits_cnn", weights: str | None = None, keep_last_pool: bool = True
) -> tuple[nn.Sequential, nn.Sequential]:
    """(conv trunk, hidden FC layers) of classifier `backbone` with `weights`.

    `weights`: a TransferClassifier checkpoint / exported file (`net.stages.*`, e.g.
    runs/weights/digits_source.pt), a torchvision state dict file, a torchvision weights name, or
    None. The conv part takes RGB (a 1-channel first conv is spread over 3) and its BatchNorms are
    frozen (detection batches are a few images). `keep_last_pool=False` drops a trailing max-pool
    (Fast R-CNN on VGG16: conv5_3 at stride 16 feeds the RoI pool, which replaces pool5).
    """
    cnnlab = weights is not None and is_file_path(weights) and _has_stages(weights)
    stages, _ = build_backbone(backbone, weights=None if cnnlab else weights)
    if cnnlab:
        load_stages(stages, load_weights_file(weights), path=weights, backbone=backbone)
    body = nn.Sequential(*stages)
    three_channels(body)
    n_conv = len(stage_shapes(body))  # stages with a 4-D output; the rest is the FC part
    conv, fc = nn.Sequential(*list(body)[:n_conv]), nn.Sequential(*list(body)[n_conv:])
    if not keep_last_pool:
        last = conv[-1]
        if isinstance(last, nn.Sequential) and isinstance(last[-1], nn.MaxPool2d):
            conv[-1] = nn.Sequential(*list(last)[:-1])
    frozen_bn(conv)
    return conv, fc


def _has_stages(path: str) -> bool:
    return any(k.startswith("net.stages.") for k in load_weights_file(path))


def trunk_stride(conv: nn.Sequential) -> int:
    return stage_shapes(conv)[-1][1]  # (channels, stride) of the last conv stage


def trunk_channels(conv: nn.Sequential) -> int:
    return stage_shapes(conv)[-1][0]


def image_stats(backbone: str) -> tuple[list[float], list[float]]:
    """Mean / std the backbone's classifier was trained with, per RGB channel."""
    if backbone == "digits_cnn":
        return MNIST_MEAN, MNIST_STD
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def fc_out_features(fc: nn.Module, in_shape: tuple[int, ...]) -> int:
    """D of the FC part on one (C, s, s) input (a probe: fc layers carry no other record of it)."""
    was = fc.training
    fc.eval()
    with torch.no_grad():
        d = fc(torch.zeros(1, *in_shape)).shape[1]
    fc.train(was)
    return d


def freeze_conv(conv: nn.Sequential, trainable: int | None) -> None:
    """Only the top `trainable` conv stages learn (None: all; 0: a frozen trunk, as SPP-net)."""
    n = len(conv)
    k = n if trainable is None else trainable
    if not 0 <= k <= n:
        raise ValueError(f"trainable_conv_stages must be in 0..{n} for this backbone, got {k}")
    for i, s in enumerate(conv):
        s.requires_grad_(i >= n - k)


# ----------------------------------------------------------------------------- R-CNN crops


def expand_boxes(boxes: torch.Tensor, *, context: float) -> torch.Tensor:
    """Boxes grown so that the original fills (1 - 2 * context) of each side (R-CNN's context
    padding: 16 px of a 227 px warp is context = 16 / 227). (N, 4) -> (N, 4)."""
    if not 0.0 <= context < 0.5:
        raise ValueError(f"context must be in [0, 0.5), got {context}")
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 / (1 - 2 * context)  # (N, 2)
    return torch.cat([centre - half, centre + half], dim=1)


MIN_ROIS_PER_THREAD = 256  # below this a thread's start costs more than its share of the loop


@cache
def _roi_threads(n: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process (`pid`): a forked child inherits the parent's pool but not its threads."""
    return ThreadPoolExecutor(n, thread_name_prefix="cnnlab-roi")


def over_threads(
    op: Callable[..., torch.Tensor],
    features: torch.Tensor,
    boxes: torch.Tensor | list[torch.Tensor],
    **kwargs: object,
) -> torch.Tensor:
    """`op(features, boxes, **kwargs)` (torchvision's roi_pool / roi_align) with the RoIs split
    over torch's intra-op threads, at inference on the CPU.

    torchvision's CPU RoI kernels loop over the RoIs on one thread: at 2,000 RoIs roi_pool was
    43 ms on one thread, 25 ms split over two (one feature map of 64 x 24 x 24). Each RoI's
    output depends on that RoI alone, so the split result is bitwise the one call's. With
    autograd the backward would scatter-add the chunks' gradients in another order, so training
    keeps the single call. Returns (K, C, ...) in the order of `boxes`.
    """
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled() and features.requires_grad
    rois = boxes
    if isinstance(boxes, list):  # per image (N_i, 4) -> (K, 5) rows of (image index, box)
        rois = torch.cat([F.pad(b, (1, 0), value=i) for i, b in enumerate(boxes)])
    parts = min(threads, len(rois) // MIN_ROIS_PER_THREAD)
    if grad or features.device.type != "cpu" or parts < 2:
        return op(features, rois, **kwargs)
    chunks = rois.tensor_split(parts)
    pool = _roi_threads(threads, os.getpid())
    return torch.cat(list(pool.map(lambda r: op(features, r, **kwargs), chunks)))


class ThreadedRoIPool(nn.Module):
    """Fast R-CNN's RoI max pooling (torchvision's roi_pool), its RoIs over the CPU threads at
    inference (`over_threads`): (B, C, h, w), boxes [(N_i, 4)] -> (N, C, s, s)."""

    def __init__(self, output_size: int, spatial_scale: float) -> None:
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return over_threads(
            tv_roi_pool, features, boxes,
            output_size=self.output_size, spatial_scale=self.spatial_scale,
        )  # fmt: skip


def warp_crops(
    images: torch.Tensor | Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    *,
    size: int,
    context: float = 16 / 227,
) -> torch.Tensor:
    """Every box of every image, context-padded and warped (anisotropically) to size x size.

    images: (B, C, H, W) or B tensors (C, H_i, W_i), already normalised so that the zeros
    roi_align reads outside the image are the mean pixel (R-CNN pads with the mean too).
    boxes: B tensors (N_i, 4) xyxy. Returns (sum N_i, C, size, size), boxes in order.
    """
    crops = []
    for img, b in zip(images, boxes, strict=True):
        if len(b) == 0:
            continue
        big = expand_boxes(b.to(img.dtype), context=context)
        # bilinear sampling on a size x size grid over each box: a vectorised warp
        crops.append(
            over_threads(
                roi_align, img[None], [big], output_size=size, sampling_ratio=2, aligned=True
            )
        )  # (N_i, C, size, size)
    if not crops:
        c = images[0].shape[-3] if len(images) else 3
        return torch.zeros(0, c, size, size)
    return torch.cat(crops)


# ----------------------------------------------------------------------------- pooling


class SpatialPyramidPool(nn.Module):
    """SPP-net: each RoI's window of the conv map max-pooled into l x l bins for every level l,
    flattened and concatenated: (N, C * sum(l^2)) whatever the box size (He et al. 2014)."""

    def __init__(self, levels: Sequence[int] = (4, 2, 1), spatial_scale: float = 1.0) -> None:
        super().__init__()
        if not levels or min(levels) < 1:
            raise ValueError(f"levels must be positive bin counts, got {levels}")
        self.levels, self.spatial_scale = tuple(levels), spatial_scale

    def forward(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        # features (B, C, h, w); boxes B tensors (N_i, 4) in image pixels
        pooled = [
            over_threads(
                tv_roi_pool, features, boxes, output_size=lv, spatial_scale=self.spatial_scale
            )
            for lv in self.levels
        ]  # (N, C, l, l) per level
        return torch.cat([p.flatten(1) for p in pooled], dim=1)  # (N, C * sum l^2)

    def out_features(self, channels: int) -> int:
        return channels * sum(lv * lv for lv in self.levels)


def build_pooler(
    pooling: str, *, output_size: int, spatial_scale: float, levels: Sequence[int] = (4, 2, 1)
) -> nn.Module:
    """`pooler(features (B, C, h, w), boxes [(N_i, 4)]) -> (N, ...)`, one of POOLINGS."""
    if pooling == "roi_pool":
        return ThreadedRoIPool(output_size, spatial_scale)  # Fast R-CNN: max over s x s bins
    if pooling == "roi_align":  # Mask R-CNN's bilinear version: no rounding of bin edges
        return RoIAlign(output_size, spatial_scale, sampling_ratio=2, aligned=True)
    if pooling == "spp":
        return SpatialPyramidPool(levels, spatial_scale)
    raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")


# ----------------------------------------------------------------------------- head


class BoxHead(nn.Module):
    """Hidden FC layers -> class logits (K + 1) and class-specific box deltas (4 (K + 1)).

    An optional `svm` layer (K one-vs-rest linear scores, R-CNN's SVMs) reads the same features.
    """

    def __init__(
        self, fc: nn.Module, *, in_features: int, num_classes: int, svm: bool = False
    ) -> None:
        super().__init__()
        self.fc = fc
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)
        # Fast R-CNN's init: small logits, near-zero deltas at the start of fine-tuning
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.svm = nn.Linear(in_features, num_classes - 1) if svm else None
        if self.svm is not None:
            nn.init.zeros_(self.svm.weight)
            nn.init.constant_(self.svm.bias, -1.0)  # every class starts "absent"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.fc(x)  # (N, D)
        return feats, self.cls_score(feats), self.bbox_pred(feats)  # (N, D), (N, K+1), (N, 4(K+1))


def truncated_svd(module: nn.Module, *, rank: int) -> nn.Module:
    """A copy of `module` with every Linear wider than `rank` both ways replaced by two thinner
    ones, W (out, in) ~ U_t diag(S_t) V_t^T: Fast R-CNN's test-time compression of fc6 / fc7
    (in*out -> t*(in+out) multiply-adds per RoI)."""
    if isinstance(module, nn.Linear) and min(module.in_features, module.out_features) > rank:
        u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=module.bias is not None)
        first.weight.data.copy_(s[:rank, None] * vh[:rank])  # (t, in)
        second.weight.data.copy_(u[:, :rank])  # (out, t)
        if module.bias is not None:
            second.bias.data.copy_(module.bias.detach())
        return nn.Sequential(first, second).to(module.weight.device)
    if not list(module.children()):
        return module
    copy = type(module).__new__(type(module))
    copy.__dict__ = {**module.__dict__, "_modules": dict(module._modules)}
    for name, child in module.named_children():
        copy._modules[name] = truncated_svd(child, rank=rank)
    return copy


# ----------------------------------------------------------------------------- training targets


def match_proposals(
    proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best IoU (N,), label of the best gt (N,), best gt box (N, 4)) per proposal; no gt: 0s."""
    n = len(proposals)
    if len(gt_boxes) == 0:
        z = proposals.new_zeros(n)
        return z, z.long(), proposals.new_zeros(n, 4)
    iou, idx = box_iou(proposals, gt_boxes).max(dim=1)  # (N,), (N,)
    return iou, gt_labels[idx], gt_boxes[idx]


def sample_rois(
    iou: torch.Tensor,
    *,
    num: int,
    fg_fraction: float,
    fg_iou: float,
    bg_iou_low: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground indices, background indices): at most fg_fraction * num with IoU >= fg_iou,
    the rest from bg_iou_low <= IoU < fg_iou, both drawn at random (the papers' 25% / 75%)."""
    fg = torch.nonzero(iou >= fg_iou).flatten()
    bg = torch.nonzero((iou < fg_iou) & (iou >= bg_iou_low)).flatten()
    n_fg = min(len(fg), int(round(num * fg_fraction)))
    n_bg = min(len(bg), num - n_fg)
    fg = fg[torch.randperm(len(fg), device=fg.device)[:n_fg]]
    bg = bg[torch.randperm(len(bg), device=bg.device)[:n_bg]]
    return fg, bg


def detection_loss(
    logits: torch.Tensor,
    deltas: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Fast R-CNN's multi-task loss: cross-entropy over K + 1 classes + smooth-L1 of the true
    class's deltas on the foreground RoIs (normalised by all RoIs, as torchvision's)."""
    loss_cls = F.cross_entropy(logits, labels)
    fg = torch.nonzero(labels > 0).flatten()
    per_class = deltas.reshape(len(deltas), -1, 4)  # (N, K+1, 4)
    pred = per_class[fg, labels[fg]]  # (F, 4)
    loss_box = F.smooth_l1_loss(pred, targets[fg], beta=1 / 9, reduction="sum") / max(
        1, labels.numel()
    )
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


def svm_hinge_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    is_gt: torch.Tensor,
    iou_per_class: torch.Tensor,
    *,
    neg_iou: float = 0.3,
    hard_negatives: int = 32,
) -> torch.Tensor:
    """R-CNN's one-vs-rest SVM objective with hard negatives, for one batch of RoIs.

    scores (N, K): the SVMs' outputs; labels (N,) 0..K; is_gt (N,) bool; iou_per_class (N, K):
    each RoI's best IoU with a gt of class k. Per class, the positives are the gt boxes, the
    negatives the RoIs under `neg_iou` with every gt of the class (the rest is ignored, as in the
    paper); of those, only the `hard_negatives` highest scoring that violate the margin
    (score > -1) count: the mined hard negatives. Mean hinge over the positives plus mean hinge
    over the hard negatives: a few gt boxes against many negatives would otherwise teach "absent"
    (the paper's SVMs weight the positives up for the same reason).
    """
    k = scores.shape[1]
    cls = torch.arange(1, k + 1, device=labels.device)
    pos = is_gt[:, None] & (labels[:, None] == cls)  # (N, K)
    neg = (iou_per_class < neg_iou) & (scores > -1)  # (N, K) margin violators
    masked = scores.detach().masked_fill(~neg, float("-inf"))
    top = masked.topk(min(hard_negatives, len(scores)), dim=0).indices  # (h, K)
    hard = torch.zeros_like(neg).scatter_(0, top, True) & neg
    pos_loss = (F.relu(1 - scores) * pos).sum() / pos.sum().clamp(min=1)
    neg_loss = (F.relu(1 + scores) * hard).sum() / hard.sum().clamp(min=1)
    return pos_loss + neg_loss


# ----------------------------------------------------------------------------- inference


def postprocess(
    scores: torch.Tensor,
    deltas: torch.Tensor,
    proposals: torch.Tensor,
    image_size: tuple[int, int],
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
) -> dict[str, torch.Tensor]:
    """One image's detections from per-RoI class scores (N, K+1, column 0 background) and
    deltas (N, 4(K+1)): class-specific boxes, score threshold, per-class NMS, top detections."""
    n, c = scores.shape
    boxes = BOX_CODER.decode_single(deltas, proposals).reshape(n, c, 4)  # (N, K+1, 4)
    boxes = clip_boxes_to_image(boxes, image_size)[:, 1:].reshape(-1, 4)  # (N K, 4)
    labels = torch.arange(1, c, device=scores.device).repeat(n)  # (N K,)
    flat = scores[:, 1:].reshape(-1)  # (N K,)
    wide = (boxes[:, 2] - boxes[:, 0] > 1e-2) & (boxes[:, 3] - boxes[:, 1] > 1e-2)
    keep = torch.nonzero((flat > score_threshold) & wide).flatten()
    boxes, labels, flat = boxes[keep], labels[keep], flat[keep]
    keep = batched_nms(boxes, flat, labels, nms_iou)[:max_detections]  # score order
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": flat[keep]}


def empty_detections(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "labels": torch.zeros(0, dtype=torch.long, device=device),
        "scores": torch.zeros(0, device=device),
    }
