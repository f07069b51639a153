"""DeepMask (Pinheiro, Collobert, Dollar, "Learning to Segment Object Candidates", NIPS 2015).

One net, two outputs for a `patch_size` window: a class-agnostic mask of the object centred in
it (the mask branch) and the probability that such a centred, canonical-scale object exists (the
score branch). Both branches read the whole trunk map of the window, as the paper's fully
connected layers do, and are written as convolutions whose kernel is that map: on a window the
output is (B, *, 1, 1); on a larger image every map cell is one window (stride = the trunk's).

- trunk: the conv stages of a classifier (`build_trunk`: the digits CNN, stride 4; VGG16 without
  its last max-pool, stride 16, the paper's; ResNet up to layer3, stride 16).
- mask branch: 1x1 conv + ReLU, then the paper's low-rank "fully connected" pixel classifiers:
  (map-sized conv to `rank`) and (1x1 conv to mask_size^2), no nonlinearity between them. The
  (mask_size x mask_size) logits are upsampled bilinearly to the window (paper: 56 -> 224).
- refinement (optional, `refine_channels` > 0; SharpMask-style, Pinheiro et al. 2016): three 3x3
  convs over the window's pixels (at mask resolution) and the coarse mask logits add a correction
  to those logits; the paper's DeepMask has none (0, the default).
- score branch: 1x1 conv + ReLU, a map-sized conv to `score_hidden` + ReLU + dropout, 1x1 conv to
  one logit. The paper max-pools 2x2 before its FC layers; a conv over the whole map instead keeps
  the dense score map at the trunk's stride, the same grid as the masks.

`multiscale_proposals` runs the net densely over a whole image at several scales (in fp32) and
keeps the top-k windows by score, refining the masks of the best `refine_top`; `paste_masks`
puts their masks back at image resolution. The net takes images in [0, 1] and normalises them
itself. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_modules.nets.localization import _map_shape, build_trunk

DIGITS_STATS = ((0.1307,), (0.3081,))  # MNIST's mean / std: the digits classifier's input
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _drop_last_pool(trunk: nn.Sequential) -> nn.Sequential:
    """The trunk without a trailing max-pool (VGG's pool5): the paper's stride-16 map."""
    layers = [
        m for stage in trunk for m in (stage if isinstance(stage, nn.Sequential) else [stage])
    ]
    while layers and isinstance(layers[-1], nn.MaxPool2d):
        layers.pop()
    return nn.Sequential(*layers)


def _stride(trunk: nn.Module, in_channels: int, size: int) -> int:
    """Input pixels per trunk map cell, measured on a `size` px input."""
    _, h, _ = _map_shape(trunk, in_channels, size)
    return max(1, round(size / h))


class DeepMask(nn.Module):
    """Trunk + mask branch + score branch; `forward` on windows, `dense` on whole images."""

    def __init__(
        self,
        trunk: nn.Module,
        *,
        in_channels: int,
        patch_size: int,
        mask_size: int,
        reduce_channels: int = 32,
        rank: int = 64,
        score_hidden: int = 128,
        dropout: float = 0.3,
        refine_channels: int = 0,
        mean: Sequence[float] = DIGITS_STATS[0],
        std: Sequence[float] = DIGITS_STATS[1],
    ) -> None:
        super().__init__()
        if mask_size < 1 or patch_size < 1:
            raise ValueError(
                f"patch_size and mask_size must be >= 1, got {patch_size}, {mask_size}"
            )
        self.in_channels, self.patch_size, self.mask_size = in_channels, patch_size, mask_size
        c, h, w = _map_shape(trunk, in_channels, patch_size)
        self.map_size = (h, w)  # the trunk's map of one window: the branches' kernel
        self.stride = _stride(trunk, in_channels, patch_size)
        self.trunk = trunk
        self.mask_branch = nn.Sequential(
            nn.Conv2d(c, reduce_channels, 1), nn.ReLU(inplace=True),
            nn.Conv2d(reduce_channels, rank, (h, w)),  # low-rank FC, part 1 (no nonlinearity)
            nn.Conv2d(rank, mask_size * mask_size, 1),  # part 2: one logit per mask pixel
        )  # fmt: skip
        self.score_branch = nn.Sequential(
            nn.Conv2d(c, reduce_channels, 1), nn.ReLU(inplace=True),
            nn.Conv2d(reduce_channels, score_hidden, (h, w)), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Conv2d(score_hidden, 1, 1),
        )  # fmt: skip
        # SharpMask-style refinement (Pinheiro, Lin, Collobert, Dollar, ECCV 2016), optional: 3x3
        # convs over the window's own pixels (at mask resolution) and the coarse mask logits
        # predict a correction to those logits. The coarse mask, read through the trunk's
        # stride, knows which object is centred; the pixels say where its edges are.
        self.refine = None
        if refine_channels > 0:
            r = refine_channels
            self.refine = nn.Sequential(
                nn.Conv2d(in_channels + 1, r, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(r, r, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(r, 1, 3, padding=1),
            )  # fmt: skip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DeepMask expects (B, {self.in_channels}, H, W) images in [0, 1], got "
                f"{tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the {self.patch_size} px window"
            )

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mask logits (B, m*m, ny, nx), score logits (B, ny, nx).

        Cell (i, j) is the window whose top-left corner is (j * stride, i * stride).
        """
        self._check(x)
        f = self.trunk((x - self.mean) / self.std)  # (B, C', H/stride, W/stride)
        return self.mask_branch(f), self.score_branch(f)[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, P, P) windows -> mask logits (B, m, m), score logits (B,)."""
        if x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"forward takes {self.patch_size}x{self.patch_size} windows, got "
                f"{tuple(x.shape[-2:])}; use dense() on whole images"
            )
        masks, scores = self.dense(x)  # (B, m*m, 1, 1), (B, 1, 1)
        masks = masks[:, :, 0, 0].unflatten(1, (self.mask_size, self.mask_size))
        return self.refined(x, masks), scores[:, 0, 0]

    def refined(self, windows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Windows (B, C, P, P) in [0, 1] and their coarse mask logits (B, m, m) -> the refined
        logits (B, m, m); the coarse ones when the net has no refinement."""
        if self.refine is None or not len(masks):
            return masks
        m = self.mask_size
        if windows.shape[-1] != m:  # the pixels at the mask's resolution (COCO: 224 -> 56)
            windows = F.interpolate(windows, size=(m, m), mode="bilinear", antialias=True)
        x = torch.cat([(windows - self.mean) / self.std, masks[:, None].to(windows.dtype)], 1)
        return masks + self.refine(x)[:, 0].to(masks.dtype)

    def upsample(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, m, m) mask logits -> (B, P, P): bilinear, as the paper's final upsampling."""
        size = (self.patch_size, self.patch_size)
        return F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def build_deepmask(
    *,
    backbone: str = "digits_cnn",
    weights: str | None = None,
    in_channels: int = 1,
    patch_size: int = 32,
    mask_size: int = 16,
    reduce_channels: int = 32,
    rank: int = 64,
    score_hidden: int = 128,
    dropout: float = 0.3,
    refine_channels: int = 0,
    normalize: str = "digits",
) -> DeepMask:
    """DeepMask on the conv stages of classifier `backbone` (see `build_trunk` for `weights`).

    normalize: `digits` (MNIST statistics, one channel) or `imagenet` (torchvision backbones).
    """
    if normalize not in ("digits", "imagenet"):
        raise ValueError(f"normalize must be digits or imagenet, got {normalize!r}")
    trunk = _drop_last_pool(build_trunk(backbone=backbone, weights=weights))
    mean, std = DIGITS_STATS if normalize == "digits" else IMAGENET_STATS
    if len(mean) != in_channels:
        mean, std = (mean[0],) * in_channels, (std[0],) * in_channels
    return DeepMask(
        trunk,
        in_channels=in_channels,
        patch_size=patch_size,
        mask_size=mask_size,
        reduce_channels=reduce_channels,
        rank=rank,
        score_hidden=score_hidden,
        dropout=dropout,
        refine_channels=refine_channels,
        mean=mean,
        std=std,
    )


# ----------------------------------------------------------------------------- whole images


@dataclass
class Proposals:
    """The top-k windows of one image, best first (K <= top_k)."""

    scores: torch.Tensor  # (K,) probabilities
    windows: torch.Tensor  # (K, 4) xyxy image pixels: the window each mask covers
    masks: torch.Tensor  # (K, m, m) mask logits of the window

    def __len__(self) -> int:
        return len(self.scores)


def _resize(image: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, round(H*s), round(W*s)); antialiased when shrinking."""
    if scale == 1.0:
        return image
    size = [max(1, round(v * scale)) for v in image.shape[-2:]]
    return F.interpolate(
        image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
    )


def window_grid(ny: int, nx: int, *, stride: int, patch_size: int, scale: float) -> torch.Tensor:
    """(ny * nx, 4) xyxy image-pixel windows of a dense map at `scale`, row-major: cell (i, j) is
    the `patch_size` window centred on resized pixel (j * stride, i * stride)."""
    ii, jj = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    cx, cy, half = (jj.flatten() * stride).float(), (ii.flatten() * stride).float(), patch_size / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], 1) / scale


@torch.no_grad()
def multiscale_proposals(
    net: DeepMask,
    image: torch.Tensor,
    *,
    scales: Sequence[float],
    top_k: int = 1000,
    refine_top: int | None = None,
) -> Proposals:
    """Dense DeepMask over one image (C, H, W) in [0, 1] at every scale; the top_k windows.

    A net with refinement refines the masks of the best `refine_top` windows (None: all top_k),
    as SharpMask refines only its top-scoring windows: each costs a small CNN on its pixels.
    At scale s the image is resized by s and padded with P/2 zeros (black) on each side, so a
    window is centred on every stride-th pixel of the resized image, borders included. Window
    (i, j) is centred on (j * stride, i * stride) resized pixels: (x - P/2) / s .. (x + P/2) / s
    in image pixels. Scores of all scales are ranked together (paper: no NMS).
    """
    # fp32 even under a bf16-mixed Trainer: bf16 logits of 2 px strokes flip at the mask
    # threshold (refined digits masks: val AR@100 0.85 in bf16 vs 0.91 in fp32). bf16 would be
    # faster (37 vs 55 ms a 96 px scene on the 2-core CPU, side by side), fp32 is within budget
    with torch.autocast(image.device.type, enabled=False):
        return _multiscale(net, image, scales, top_k, refine_top)


def _multiscale(
    net: DeepMask, image: torch.Tensor, scales: Sequence[float], top_k: int, refine_top: int | None
) -> Proposals:
    p, mm = net.patch_size, net.mask_size
    scores, windows, masks, padded, grids = [], [], [], [], []
    for s in scales:
        x = F.pad(_resize(image[None].float(), s), (p // 2, p - p // 2, p // 2, p - p // 2))
        m, sc = net.dense(x)  # (1, m*m, ny, nx), (1, ny, nx)
        ny, nx = sc.shape[-2:]
        windows.append(window_grid(ny, nx, stride=net.stride, patch_size=p, scale=s))
        scores.append(sc.flatten())  # (ny*nx,)
        masks.append(m[0].flatten(1).T)  # (ny*nx, m*m)
        padded.append(x[0])
        grids.append((ny, nx))
    score = torch.cat(scores).float()
    order = score.argsort(descending=True)[:top_k]
    top = torch.cat(masks)[order].float().unflatten(1, (mm, mm))  # (K, m, m)
    if net.refine is not None:
        r = order[: top_k if refine_top is None else refine_top]
        crops = _crops(padded, grids, r, stride=net.stride, size=p)
        top = torch.cat([net.refined(crops, top[: len(r)]).float(), top[len(r) :]])
    return Proposals(scores=score[order].sigmoid(), windows=torch.cat(windows)[order], masks=top)


def _crops(
    padded: list[torch.Tensor],
    grids: list[tuple[int, int]],
    order: torch.Tensor,
    *,
    stride: int,
    size: int,
) -> torch.Tensor:
    """The windows `order` (indices into every scale's row-major cells, concatenated) cut from
    the padded resized images (C, H_s, W_s): (K, C, size, size). Cell (i, j) of a scale starts
    at (i * stride, j * stride) of its padded image."""
    out = torch.empty(len(order), padded[0].shape[0], size, size, device=order.device)
    first, ar = 0, torch.arange(size, device=order.device)
    for x, (ny, nx) in zip(padded, grids, strict=True):
        hit = (order >= first) & (order < first + ny * nx)
        cell = order[hit] - first
        rows = (cell // nx * stride)[:, None] + ar  # (k, size)
        cols = (cell % nx * stride)[:, None] + ar
        out[hit] = x[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # (k, C, size, size)
        first += ny * nx
    return out


def paste_masks(
    masks: torch.Tensor, windows: torch.Tensor, size: tuple[int, int], threshold: float = 0.0
) -> torch.Tensor:
    """Mask logits (K, m, m) of windows (K, 4) -> (K, H, W) bool masks at image resolution.

    Windows of one size (one scale) are upsampled together (bilinear), thresholded at `threshold`
    (logit 0: probability 0.5), then each is copied into its place, clipped to the image.
    """
    h, w = size
    out = torch.zeros(len(masks), h, w, dtype=torch.bool)
    if not len(masks):
        return out
    sides = (windows[:, 2] - windows[:, 0]).round().long()  # (K,) window side in image px
    x0s, y0s = windows[:, 0].round().long().tolist(), windows[:, 1].round().long().tolist()
    for side in sides.unique().tolist():
        idx = (sides == side).nonzero()[:, 0]
        up = F.interpolate(masks[idx, None].float(), size=(side, side), mode="bilinear")
        up = (up[:, 0] > threshold).cpu()  # (n, side, side)
        for k, sub in zip(idx.tolist(), up, strict=True):
            x0, y0 = x0s[k], y0s[k]
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
            if xa < xb and ya < yb:
                out[k, ya:yb, xa:xb] = sub[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return out


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) xyxy float boxes, x2 / y2 exclusive; an empty mask gives zeros."""
    if not len(masks):
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)  # (K, H), (K, W)
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(masks.flatten(1).any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def scales_for(
    object_sizes: tuple[float, float], canonical: float, step: float = math.sqrt(2)
) -> list[float]:
    """Scales (geometric, ratio `step`) that bring objects of max dimension object_sizes[0]..[1]
    px to `canonical` px within a factor step**0.5 (the positives' scale tolerance when step
    is 2**0.5): the paper's 2^-2..2^1 in steps of 2^1/2, fitted to a data set's object sizes."""
    lo, hi = canonical / object_sizes[1], canonical / object_sizes[0]
    first = lo * math.sqrt(step)
    n = max(1, math.ceil(math.log(hi / first) / math.log(step) + 0.5))
    return [round(first * step**i, 4) for i in range(n)]
