"""Backbones cut into stages, and TransferNet: forward/backward over every net, stages, freezing."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lit_modules.nets import BACKBONES, DigitsCNN, TransferNet, build_transfer_net
from lit_modules.nets.backbones import split_classifier


def _input(name: str, batch: int = 2) -> torch.Tensor:
    if name == "digits_cnn":
        return torch.randn(batch, 1, 28, 28)  # (B, 1, 28, 28)
    # (B, 3, 64, 64): the smallest size every torchvision net is checked at
    return torch.randn(batch, 3, 64, 64)


def _classifier(name: str) -> nn.Module:
    return DigitsCNN() if name == "digits_cnn" else torchvision.models.get_model(name, weights=None)


def _last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's final Linear: DigitsCNN.classifier, ResNet.fc, or classifier[-1]."""
    last = model.classifier if isinstance(model, DigitsCNN) else getattr(model, "fc", None)
    return last if isinstance(last, nn.Linear) else model.classifier[-1]


def _expected_stage_params(name: str) -> int:
    """Parameters of the original classifier minus its last Linear (counted on the meta device)."""
    with torch.device("meta"):
        model = _classifier(name)
    total = sum(p.numel() for p in model.parameters())
    return total - sum(p.numel() for p in _last_linear(model).parameters())


@pytest.mark.parametrize(
    "name",
    list(BACKBONES),
)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    net = build_transfer_net(backbone=name, num_classes=3, weights=None)
    # split_classifier: at least 3 stages, each parameter in exactly one, none lost
    assert len(net.stages) >= 3
    ids = [id(p) for _, p in net.stages.named_parameters(remove_duplicate=False)]
    assert len(ids) == len(set(ids)), "a parameter is shared between stages"
    assert sum(p.numel() for p in net.stages.parameters()) == _expected_stage_params(name)

    net.train()
    out = net(_input(name))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and len(trainable) == len(list(net.parameters()))  # nothing frozen by default
    for pname, p in trainable:
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "digits_cnn"]
)
def test_stages_compose_to_the_penultimate_features(name: str) -> None:
    torch.manual_seed(0)
    model = _classifier(name).eval()
    last = _last_linear(model)
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    x = _input(name)
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    penultimate = seen[0]  # (B, D): what the original classifier sees

    stages, head = split_classifier(model)
    assert head is last and len(stages) >= 3
    net = TransferNet(stages, head).eval()
    with torch.no_grad():
        feats = net.forward_features(x)
        manual = x
        for stage in stages:
            manual = stage(manual)
        again = net(x)
    assert feats.shape == penultimate.shape == (2, head.in_features)
    torch.testing.assert_close(manual, penultimate, rtol=0, atol=0)
    torch.testing.assert_close(feats, penultimate, rtol=0, atol=0)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_split_classifier_keeps_the_train_mode() -> None:
    model = torchvision.models.mobilenet_v3_small(weights=None).train()
    split_classifier(model)
    assert all(m.training for m in model.modules())


def _bn_state(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [b.clone() for m in modules for b in m.buffers()]


@pytest.mark.parametrize("name", ["digits_cnn", "resnet18"])
def test_freeze_bottom(name: str) -> None:
    torch.manual_seed(0)
    net = build_transfer_net(backbone=name, num_classes=3, weights=None)
    n = 2
    net.freeze_bottom(n)
    net.eval()
    net.train()  # frozen BatchNorm must survive a train() call
    frozen, free = list(net.stages[:n]), list(net.stages[n:])
    for stage in frozen:
        assert not any(p.requires_grad for p in stage.parameters())
        assert not any(m.training for m in stage.modules())
    for stage in free:
        assert all(p.requires_grad for p in stage.parameters())
        assert all(m.training for m in stage.modules())
    bns = [m for s in net.stages for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not bn.training for bn in bns) and any(bn.training for bn in bns)

    before_frozen, before_free = _bn_state(frozen), _bn_state(free)
    assert before_frozen, "the frozen stages hold BatchNorm buffers"
    out = net(_input(name, batch=4))
    out.sum().backward()
    for a, b in zip(before_frozen, _bn_state(frozen), strict=True):
        assert torch.equal(a, b), "a frozen BatchNorm updated its running statistics"
    assert any(not torch.equal(a, b) for a, b in zip(before_free, _bn_state(free), strict=True))
    for stage in frozen:
        assert all(p.grad is None for p in stage.parameters())
    for stage in free:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stage.parameters())
    assert net.head.weight.grad is not None

    net.freeze_bottom(0)  # thaw everything again
    assert all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in net.modules())

    for bad in (-1, len(net.stages) + 1):
        with pytest.raises(ValueError, match="freeze"):
            net.freeze_bottom(bad)
