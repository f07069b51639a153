"""Weights from a file build the same network as the same weights by name: the same frozen
BatchNorm, the same trainable parameters, the same tensors.

Nothing can be downloaded here, so "by name" is torchvision's own path with the weights enum's
`get_state_dict` (its download) monkeypatched to return the tensors that the file holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lit_modules.nets.detectors import TORCHVISION_BODIES, build_faster_rcnn
from lit_modules.transfer import TransferClassifier

SMALL = {"min_size": 64, "max_size": 64}


def _structure(net: nn.Module) -> tuple[list[str], dict[str, str], dict[str, float]]:
    """(parameters that train, the type of every norm layer, the eps of every norm layer)."""
    norms = {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)
    }
    return (
        sorted(name for name, p in net.named_parameters() if p.requires_grad),
        {name: type(m).__name__ for name, m in norms.items()},
        {name: m.eps for name, m in norms.items()},
    )


def _download_gives(monkeypatch: pytest.MonkeyPatch, member: object, state: dict) -> None:
    monkeypatch.setattr(type(member), "get_state_dict", lambda self, *a, **k: state)


def _assert_same_tensors(a: nn.Module, b: nn.Module, skip: str = "\0") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


@pytest.mark.parametrize(
    ("arch", "trainable"),
    [("mobilenet_v3_large_fpn", None), ("resnet50_fpn", 1)],
)
def test_detector_backbone_from_a_file_builds_as_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, trainable: int | None
) -> None:
    body = TORCHVISION_BODIES[arch]
    state = torchvision.models.get_model(body).state_dict()  # "ImageNet weights": random, fixed
    path = tmp_path / f"{body}_imagenet.pth"
    torch.save(state, path)
    member = torchvision.models.get_model_weights(body).DEFAULT
    kw = {"arch": arch, "num_classes": 5, "trainable_backbone_layers": trainable, **SMALL}
    with monkeypatch.context() as m:
        _download_gives(m, member, state)
        by_name = build_faster_rcnn(weights_backbone="DEFAULT", **kw)
    by_file = build_faster_rcnn(weights_backbone=str(path), **kw)

    assert _structure(by_file) == _structure(by_name)
    trainable_params, norms, _ = _structure(by_file)
    body = [n for n, _ in by_file.named_parameters() if n.startswith("backbone.body.")]
    assert set(body) - set(trainable_params), "the bottom stages are frozen"
    assert set(body) & set(trainable_params), "the top stages learn"
    assert {v for k, v in norms.items() if k.startswith("backbone.body.")} == {"FrozenBatchNorm2d"}
    _assert_same_tensors(by_file.backbone.body, by_name.backbone.body)
    first_conv = next(m for m in by_file.backbone.body.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(first_conv.weight, next(v for v in state.values() if v.ndim == 4))


@pytest.mark.parametrize(
    ("arch", "kind"),
    [
        ("mobilenet_v3_large_fpn", "download"),  # torchvision's file, fetched by hand
        ("mobilenet_v3_large_fpn", "checkpoint"),  # a FasterRCNNModule checkpoint
        ("resnet50_fpn", "download"),  # COCO_V1: FrozenBN eps 0, by name and from its file
    ],
)
def test_detector_from_a_file_builds_as_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, kind: str
) -> None:
    coco = build_faster_rcnn(arch=arch, num_classes=91, **SMALL).state_dict()  # "COCO weights"
    builder = getattr(torchvision.models.detection, f"fasterrcnn_{arch}")
    member = torchvision.models.get_model_weights(builder).DEFAULT
    if kind == "download":
        path = tmp_path / Path(member.url).name
        torch.save(coco, path)
    else:
        path = tmp_path / "best.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in coco.items()}}, path)
    kw = {"arch": arch, "num_classes": 5, "trainable_backbone_layers": 2, **SMALL}
    with monkeypatch.context() as m:
        _download_gives(m, member, coco)
        by_name = build_faster_rcnn(weights="DEFAULT", **kw)
    by_file = build_faster_rcnn(weights=str(path), **kw)

    assert _structure(by_file) == _structure(by_name)
    assert by_file.roi_heads.box_predictor.cls_score.out_features == 5
    _assert_same_tensors(by_file, by_name, skip="roi_heads.box_predictor")


def test_classifier_from_a_file_builds_as_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state, path)
    kw = {"backbone": "resnet18", "num_classes": 5, "mode": "finetune", "trainable_stages": 2}
    with monkeypatch.context() as m:
        _download_gives(m, torchvision.models.ResNet18_Weights.DEFAULT, state)
        by_name = TransferClassifier(weights="DEFAULT", **kw)
    by_file = TransferClassifier(weights=str(path), **kw)

    assert _structure(by_file) == _structure(by_name)
    by_name.train(), by_file.train()
    training = {n: m.training for n, m in by_file.named_modules()}
    assert training == {n: m.training for n, m in by_name.named_modules()}
    assert any(not t for n, t in training.items() if n.startswith("net.stages.0")), "frozen BN"
    _assert_same_tensors(by_file.net.stages, by_name.net.stages)
    _assert_same_tensors(by_file.net.source_head, by_name.net.source_head)
