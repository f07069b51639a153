"""RoIAlign by embedding_bag gives torchvision's numbers and gradients."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision

from lit_modules.nets.roi_ops import BagMultiScaleRoIAlign, roi_align


def _rois(k: int, images: int, extent: float, seed: int = 0) -> torch.Tensor:
    """(k, 5) RoIs, some partly or wholly outside an `extent` px image, some under 1 px."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * (extent + 20) - 10
    wh = torch.rand(k, 2, generator=g) * extent * 0.6 + 0.2
    index = torch.randint(0, images, (k, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_matches_torchvision_values_and_gradients(aligned, sampling_ratio):
    torch.manual_seed(0)
    features = torch.randn(3, 5, 13, 17, requires_grad=True)
    rois = _rois(60, images=3, extent=68)
    args = (7, 0.25, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(features, rois, *args)
    grad_out = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad((ref * grad_out).sum(), features)
    out = roi_align(features, rois, *args)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), features)
    assert out.shape == ref.shape == (60, 5, 7, 7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_roi_align_rectangular_output_and_no_rois():
    features = torch.randn(2, 4, 10, 10)
    rois = _rois(9, images=2, extent=10)
    ref = torchvision.ops.roi_align(features, rois, (3, 5), 1.0, 2)
    torch.testing.assert_close(roi_align(features, rois, (3, 5), 1.0, 2), ref)
    assert roi_align(features, rois[:0], 7).shape == (0, 4, 7, 7)


def test_roi_align_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio must be > 0"):
        roi_align(torch.randn(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 2, 2]]), 2, sampling_ratio=0)


def test_multiscale_pooler_matches_torchvision():
    torch.manual_seed(1)
    features = OrderedDict(
        [
            ("0", torch.randn(2, 8, 24, 24)),
            ("1", torch.randn(2, 8, 12, 12)),
            ("pool", torch.randn(2, 8, 6, 6)),
        ]
    )
    boxes = [_rois(40, 1, 96, seed=s)[:, 1:].clamp(0, 96) for s in (2, 3)]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], dim=1) for b in boxes]
    shapes = [(96, 96), (96, 96)]
    kwargs = {"featmap_names": ["0", "1"], "output_size": 7, "sampling_ratio": 2}
    ref = torchvision.ops.MultiScaleRoIAlign(**kwargs)(features, boxes, shapes)
    out = BagMultiScaleRoIAlign(**kwargs)(features, boxes, shapes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
