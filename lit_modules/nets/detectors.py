"""Faster R-CNN detectors from torchvision's parts: published builders, a slim CPU net, transfer.

Every builder returns torchvision's `FasterRCNN`, so the training / inference contract is the
library's: `net(images, targets) -> {loss_*}` in train mode, `net(images) -> [{boxes, labels,
scores}]` in eval mode, images a list of (3, H, W) floats in [0, 1] (normalisation and resizing
happen inside, in `GeneralizedRCNNTransform`). Nothing here imports Lightning.

Architectures (`arch`):
- `resnet50_fpn`, `resnet50_fpn_v2`, `mobilenet_v3_large_fpn`: torchvision's published models;
  `weights` (COCO) and `weights_backbone` (ImageNet) by enum name or file; a file builds the
  module the name builds (FrozenBatchNorm2d, `trainable_backbone_layers`), then loads its tensors.
- `resnet18_fpn`: a slim ResNet-18 + FPN (narrow FPN and box head) that trains on a CPU.
- `transfer`: the conv stages of a cnnlab classifier checkpoint (`net.stages.*` keys, e.g. the
  digits network of `configs/transfer/digits_pretrain_source.yaml`) + FPN: the classifier's
  features initialise the detector.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from lit_modules.nets.backbones import (
    BACKBONES,
    build_backbone,
    build_torchvision,
    is_file_path,
    load_weights_file,
    state_instead_of_download,
    torchvision_weights,
)
from lit_modules.nets.roi_ops import BagMultiScaleRoIAlign
from lit_modules.nets.transfer_net import load_stages

TORCHVISION_DETECTORS: dict[str, Callable[..., FasterRCNN]] = {
    "resnet50_fpn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "resnet50_fpn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
}
TORCHVISION_BODIES = {
    "resnet50_fpn": "resnet50",
    "resnet50_fpn_v2": "resnet50",
    "mobilenet_v3_large_fpn": "mobilenet_v3_large",
}
ARCHS = (*TORCHVISION_DETECTORS, "resnet18_fpn", "transfer")
MNIST_MEAN, MNIST_STD = [0.1307] * 3, [0.3081] * 3  # what digits_cnn was trained with, per RGB


def _anchor_generator(
    sizes: list[list[int]] | None, ratios: list[float] | None, levels: int
) -> AnchorGenerator | None:
    """One tuple of sizes per feature level, the same aspect ratios (h / w) on every level."""
    if sizes is None and ratios is None:
        return None
    sizes = sizes or [[32 * 2**i] for i in range(levels)]
    if len(sizes) != levels:
        raise ValueError(
            f"anchor_sizes needs one list per feature level ({levels}), got {len(sizes)}"
        )
    if len({len(s) for s in sizes}) != 1:
        raise ValueError(f"every level needs the same number of anchor sizes, got {sizes}")
    ratios = ratios or [0.5, 1.0, 2.0]
    return AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * levels)


def _replace_predictor(net: FasterRCNN, num_classes: int) -> None:
    """A new (num_classes)-way box predictor on a pretrained detector: the usual fine-tuning cut."""
    old = net.roi_heads.box_predictor
    if old.cls_score.out_features != num_classes:
        net.roi_heads.box_predictor = FastRCNNPredictor(old.cls_score.in_features, num_classes)


def _torchvision_detector(
    arch: str,
    *,
    num_classes: int,
    weights: str | None,
    weights_backbone: str | None,
    trainable_backbone_layers: int | None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's detector; weights from a file build the same module as weights by name.

    torchvision decides FrozenBatchNorm2d and the trainable stages from whether it is handed a
    weights enum, so a file goes in as that enum, loading the file's tensors instead of the
    download (`state_instead_of_download`). Only a detector file not named as torchvision's
    download keeps FrozenBatchNorm2d's eps 1e-5 where COCO_V1 of resnet50_fpn by name sets 0
    (eps is not in a state dict).
    """
    builder, body = TORCHVISION_DETECTORS[arch], TORCHVISION_BODIES[arch]
    common = {"trainable_backbone_layers": trainable_backbone_layers, **kwargs}
    if weights is not None and is_file_path(weights):
        net = _detector_from_file(arch, weights, common)
    elif weights is not None:
        net = builder(weights=torchvision_weights(builder, weights), **common)
    elif weights_backbone is not None and is_file_path(weights_backbone):
        member = torchvision_weights(body, "DEFAULT")
        state = _classifier_state(body, weights_backbone)
        try:
            with state_instead_of_download(member, state):
                net = builder(weights_backbone=member, num_classes=num_classes, **common)
        except RuntimeError as err:  # tensor shapes of another net
            raise ValueError(
                f"weights_backbone {weights_backbone} does not match {arch}'s {body}: {err}"
            ) from err
    else:
        wb = None if weights_backbone is None else torchvision_weights(body, weights_backbone)
        net = builder(weights_backbone=wb, num_classes=num_classes, **common)
    _replace_predictor(net, num_classes)
    return net


def _classifier_state(name: str, path: str | None) -> dict[str, torch.Tensor]:
    """A full state dict of torchvision classifier `name` (what its ImageNet download holds): the
    file's tensors, or random ones for None. The classification head is random either way (the
    detector drops it), so a body saved alone or with another head loads too."""
    full = torchvision.models.get_model(name, weights=None).state_dict()
    if path is None:
        return full
    head = ("fc.", "classifier.")
    state = {k: v for k, v in load_weights_file(path).items() if not k.startswith(head)}
    missing = [
        k
        for k in full
        if k not in state and not k.startswith(head) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in full]
    if missing or unexpected:
        raise ValueError(
            f"weights_backbone {path} is not a {name} state dict: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return {**full, **state}


def _detector_from_file(arch: str, path: str, common: dict[str, Any]) -> FasterRCNN:
    """`arch` from a detector state dict or FasterRCNNModule checkpoint, built as by name.

    torchvision's own file (named as its download URL) goes in as its enum member: exactly the
    by-name build. Any other file (a cnnlab checkpoint, any number of classes) builds the
    pretrained-backbone structure, which is what `weights` by name builds too, then loads.
    """
    builder = TORCHVISION_DETECTORS[arch]
    state = {k.removeprefix("net."): v for k, v in load_weights_file(path).items()}
    scores = state.get("roi_heads.box_predictor.cls_score.weight")  # (classes, D)
    if scores is None:
        raise ValueError(f"weights file {path} holds no detector (no roi_heads.box_predictor)")
    enum = torchvision.models.get_model_weights(builder)
    member = next((m for m in enum if Path(m.url).name == Path(path).name), None)
    try:
        if member is not None:
            with state_instead_of_download(member, state):
                return builder(weights=member, **common)
        body = torchvision_weights(TORCHVISION_BODIES[arch], "DEFAULT")
        with state_instead_of_download(body, _classifier_state(TORCHVISION_BODIES[arch], None)):
            net = builder(weights_backbone=body, num_classes=scores.shape[0], **common)
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"weights file {path} does not match {arch}: {err}") from err
    return net


def frozen_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d -> FrozenBatchNorm2d with its statistics (detection's batches are tiny)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            frozen_bn(child)
    return module


def three_channels(stages: nn.Sequential) -> None:
    """A 1-channel first conv takes RGB: weights / 3 per channel, exact on gray (R=G=B) images."""
    conv = next(m for m in stages.modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == 1:
        conv.weight = nn.Parameter(conv.weight.detach().repeat(1, 3, 1, 1) / 3)
        conv.in_channels = 3


def stage_shapes(stages: nn.Sequential, side: int = 128) -> list[tuple[int, int]]:
    """(channels, stride) of every conv stage's output, on a zero image; stops at the FC head."""
    out, x = [], torch.zeros(1, 3, side, side)
    was = stages.training
    stages.eval()
    with torch.no_grad():
        for s in stages:
            if any(
                isinstance(m, nn.Flatten | nn.Linear | nn.AdaptiveAvgPool2d) for m in s.modules()
            ):
                break
            x = s(x)
            if x.ndim != 4:
                break
            out.append((x.shape[1], side // x.shape[-1]))
    stages.train(was)
    return out


def _freeze_stages(stages: nn.Sequential, trainable: int | None) -> None:
    """Only the top `trainable` stages learn (None: all); frozen ones get no gradients."""
    n = len(stages)
    k = n if trainable is None else trainable
    if not 0 <= k <= n:
        raise ValueError(f"trainable_backbone_layers must be in 0..{n} for this backbone, got {k}")
    for i, s in enumerate(stages):
        s.requires_grad_(i >= n - k)


def _fpn_detector(
    body: nn.Sequential,
    returned: list[int],
    *,
    num_classes: int,
    fpn_channels: int,
    representation_size: int,
    anchor_sizes: list[list[int]] | None,
    aspect_ratios: list[float] | None,
    roi_sampling_ratio: int,
    **kwargs: Any,
) -> FasterRCNN:
    """FasterRCNN on `body` (a Sequential of stages), FPN over stages `returned` + a max-pool level."""
    shapes = stage_shapes(body)
    if not returned or any(not 0 <= i < len(shapes) for i in returned):
        raise ValueError(f"returned stages must be in 0..{len(shapes) - 1}, got {returned}")
    backbone = BackboneWithFPN(
        body[: max(returned) + 1],
        return_layers={str(i): str(j) for j, i in enumerate(returned)},
        in_channels_list=[shapes[i][0] for i in returned],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    levels = len(returned) + 1
    names = [str(j) for j in range(len(returned))]
    anchors = _anchor_generator(anchor_sizes, aspect_ratios, levels) or _anchor_generator(
        [[32 * 2**i] for i in range(levels)], None, levels
    )
    # torchvision's pooler, its RoIAlign as an embedding_bag: same numbers, 2-5x faster on a CPU
    pool = BagMultiScaleRoIAlign(
        featmap_names=names, output_size=7, sampling_ratio=roi_sampling_ratio
    )
    head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    return FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_head=head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **kwargs,
    )


def _default_returned(shapes: list[tuple[int, int]], min_stride: int) -> list[int]:
    """The deepest stage at each stride >= min_stride (how torchvision picks ResNet layers)."""
    last: dict[int, int] = {}
    for i, (_, stride) in enumerate(shapes):
        if stride >= min_stride:
            last[stride] = i
    return sorted(last.values())


def _transfer_body(backbone: str, weights: str | None) -> nn.Sequential:
    """The conv stages (4-D outputs) of `backbone`, loaded from a cnnlab checkpoint if given."""
    stages, _ = build_backbone(
        backbone, weights=None if weights is None or is_file_path(weights) else weights
    )
    if weights is not None and is_file_path(weights):
        load_stages(stages, load_weights_file(weights), path=weights, backbone=backbone)
    body = nn.Sequential(*stages)
    three_channels(body)
    conv = len(stage_shapes(body))
    return nn.Sequential(*list(body)[:conv])


def build_faster_rcnn(
    *,
    arch: str = "resnet18_fpn",
    num_classes: int = 91,
    weights: str | None = None,
    weights_backbone: str | None = None,
    backbone: str = "digits_cnn",
    trainable_backbone_layers: int | None = None,
    returned_stages: list[int] | None = None,
    fpn_channels: int = 64,
    representation_size: int = 256,
    anchor_sizes: list[list[int]] | None = None,
    aspect_ratios: list[float] | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    roi_sampling_ratio: int = 2,
    **kwargs: Any,
) -> FasterRCNN:
    """A Faster R-CNN for `num_classes` (background included: K objects -> K + 1).

    `weights`: the whole detector (COCO enum name or file; the box predictor is replaced when
    `num_classes` differs); `weights_backbone`: ImageNet weights for the body (torchvision
    archs), or for `transfer` the cnnlab checkpoint / torchvision weights of `backbone`.
    `returned_stages` (resnet18_fpn / transfer): which stages feed the FPN (default: the deepest
    one per stride >= 4). `fpn_channels`, `representation_size`: width of the slim nets' FPN and
    box head. `roi_sampling_ratio` (slim nets): RoIAlign's bilinear samples per bin side; CPU
    RoIAlign's backward is a serial scatter, so 1 sample instead of torchvision's 2 quarters the
    cost that dominated a digits training step. Further keyword args (min_size, max_size, rpn_batch_size_per_image,
    box_batch_size_per_image, rpn_*_nms_top_n_*, box_detections_per_img, ...) go to FasterRCNN.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: need >= 2, got {num_classes}")
    if arch in TORCHVISION_DETECTORS:
        levels = 3 if arch == "mobilenet_v3_large_fpn" else 5
        anchors = _anchor_generator(anchor_sizes, aspect_ratios, levels)
        if anchors is not None:
            kwargs["rpn_anchor_generator"] = anchors
        if image_mean is not None:
            kwargs.update(image_mean=image_mean, image_std=image_std)
        return _torchvision_detector(
            arch,
            num_classes=num_classes,
            weights=weights,
            weights_backbone=weights_backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    if arch == "resnet18_fpn":
        resnet = build_torchvision("resnet18", weights=weights_backbone)
        stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)  # stride 4
        body = nn.Sequential(stem, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        mean = image_mean or [0.485, 0.456, 0.406]
        std = image_std or [0.229, 0.224, 0.225]
        default = [2, 3, 4]
    else:
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
        body = _transfer_body(backbone, weights_backbone)
        digits = backbone == "digits_cnn"
        mean = image_mean or (MNIST_MEAN if digits else [0.485, 0.456, 0.406])
        std = image_std or (MNIST_STD if digits else [0.229, 0.224, 0.225])
        default = _default_returned(stage_shapes(body), min_stride=4)
    frozen_bn(body)
    _freeze_stages(body, trainable_backbone_layers)
    net = _fpn_detector(
        body,
        returned_stages if returned_stages is not None else default,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        representation_size=representation_size,
        anchor_sizes=anchor_sizes,
        aspect_ratios=aspect_ratios,
        roi_sampling_ratio=roi_sampling_ratio,
        image_mean=mean,
        image_std=std,
        **kwargs,
    )
    if weights is not None:  # a whole cnnlab detector (FasterRCNNModule checkpoint or state dict)
        state = {k.removeprefix("net."): v for k, v in load_weights_file(weights).items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"weights file {weights} does not match this {arch} detector: {err}"
            ) from err
    return net


@torch.no_grad()
def rpn_proposals(net: FasterRCNN, images: list[torch.Tensor], *, top_n: int) -> list[torch.Tensor]:
    """The RPN's top-`top_n` boxes per image (score order, after its NMS), in image pixels.

    What Faster R-CNN's box head would see at test time, with the test-time caps raised to
    `top_n` (pre-NMS per level and post-NMS), for recall-vs-number-of-proposals curves.
    Returns [(N_i, 4) xyxy], N_i <= top_n.
    """
    was_training, rpn = net.training, net.rpn
    saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    rpn._pre_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] = top_n
    try:
        net.eval()
        sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = net.transform(images)  # resized as the detector sees them
        features = net.backbone(batch.tensors)
        proposals, _ = rpn(batch, features)
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = saved
        net.train(was_training)
    out = []
    for boxes, seen, size in zip(proposals, batch.image_sizes, sizes, strict=True):
        ratio = torch.tensor([size[1] / seen[1], size[0] / seen[0]] * 2, device=boxes.device)
        out.append(boxes * ratio)  # back to the original image's pixels
    return out
