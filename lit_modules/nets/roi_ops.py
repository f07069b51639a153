"""RoIAlign as one `embedding_bag`: torchvision's numbers, a backward that is fast on a CPU.

torchvision's CPU RoIAlign backward is a serial loop that recomputes every bilinear weight per
channel: on the digits Faster R-CNN it took 44% of a training step (92 ms of 230 ms, 512 RoIs of
64 channels, measured with torch.profiler). Here each output bin is a bag of its s x s sample
points x 4 bilinear corners, rows of the channels-last feature map, summed with their weights:
`embedding_bag`'s forward and backward are vectorised over channels and parallel over bags.
The sample points and weights follow torchvision's kernel exactly (its `pre_calc`), so the output
matches `torchvision.ops.roi_align` to float rounding for every box (tests/test_roi_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales


def _axis_samples(
    start: Tensor, length: Tensor, bins: int, s: int, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample positions along one axis of K RoIs -> (low, high) indices and weights, (K, bins*s).

    torchvision's rule: a point beyond [-1, size] weighs 0; below 0 it is clamped to 0; at or
    past the last pixel both corners are the last pixel.
    """
    t = (torch.arange(bins * s, device=start.device, dtype=start.dtype) + 0.5) / s  # bin + offset
    pos = start[:, None] + t[None, :] * (length / bins)[:, None]  # (K, bins*s)
    inside = ((pos >= -1.0) & (pos <= size)).to(pos.dtype)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return low, high, (1 - frac) * inside, frac * inside


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """`torchvision.ops.roi_align` for a fixed `sampling_ratio` > 0, by `F.embedding_bag`.

    features (N, C, H, W); rois (K, 5) as (batch index, x1, y1, x2, y2) in image pixels.
    Returns (K, C, ph, pw). The RoIs get no gradient (Faster R-CNN detaches its proposals).
    """
    if sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be > 0 (adaptive is not supported), got {sampling_ratio}"
        )
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    n, c, h, w = features.shape
    k, s = rois.shape[0], sampling_ratio
    if k == 0:
        return features.new_zeros((0, c, ph, pw))
    with torch.no_grad():
        boxes = rois[:, 1:].float() * spatial_scale - (0.5 if aligned else 0.0)
        x1, y1 = boxes[:, 0], boxes[:, 1]
        bw, bh = boxes[:, 2] - x1, boxes[:, 3] - y1
        if not aligned:  # the legacy RoIAlign: RoIs at least 1 px wide
            bw, bh = bw.clamp(min=1.0), bh.clamp(min=1.0)
        ylo, yhi, wylo, wyhi = _axis_samples(y1, bh, ph, s, h)  # (K, ph*s)
        xlo, xhi, wxlo, wxhi = _axis_samples(x1, bw, pw, s, w)  # (K, pw*s)
        base = rois[:, 0].long()[:, None, None] * (h * w)
        # (K, ph*s, pw*s, 4) rows of the (N*H*W, C) map and their weights, corners last
        rows = torch.stack(
            [
                base + (ylo * w)[:, :, None] + xlo[:, None, :],
                base + (ylo * w)[:, :, None] + xhi[:, None, :],
                base + (yhi * w)[:, :, None] + xlo[:, None, :],
                base + (yhi * w)[:, :, None] + xhi[:, None, :],
            ],
            dim=-1,
        )
        weights = torch.stack(
            [
                wylo[:, :, None] * wxlo[:, None, :],
                wylo[:, :, None] * wxhi[:, None, :],
                wyhi[:, :, None] * wxlo[:, None, :],
                wyhi[:, :, None] * wxhi[:, None, :],
            ],
            dim=-1,
        ) / (s * s)  # the mean over a bin's s x s samples
        # one bag per output bin: (K, ph, s, pw, s, 4) -> (K * ph * pw, s * s * 4)
        rows = rows.view(k, ph, s, pw, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(k * ph * pw, -1)
        weights = (
            weights.view(k, ph, s, pw, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(k * ph * pw, -1)
        )
    table = features.permute(0, 2, 3, 1).reshape(n * h * w, c)  # channels-last rows
    out = F.embedding_bag(rows, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return out.view(k, ph, pw, c).permute(0, 3, 1, 2).contiguous()  # (K, C, ph, pw)


class BagMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping, scales and numbers), its RoIAlign
    computed by `roi_align` above: a drop-in `box_roi_pool` for FasterRCNN."""

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
        )  # (K, 5)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        c, (ph, pw) = feats[0].shape[1], self.output_size
        out = feats[0].new_zeros((len(rois), c, ph, pw))
        for level, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                pooled = roi_align(feat, rois[idx], (ph, pw), scale, self.sampling_ratio)
                out[idx] = pooled.to(out.dtype)  # autocast may give levels different dtypes
        return out
