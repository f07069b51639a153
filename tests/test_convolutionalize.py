"""convolutionalize: logits at the training size, class maps beyond, clear errors otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from lit_modules.nets import DigitsCNN, convolutionalize

# name -> (builder, training size, total stride of the class map)
NETS = {
    "vgg11": (lambda: torchvision.models.vgg11(weights=None), 224, 32),
    "vgg16": (lambda: torchvision.models.vgg16(weights=None), 224, 32),
    "alexnet": (lambda: torchvision.models.alexnet(weights=None), 224, 32),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 224, 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 224, 32),
    "digits_cnn": (lambda: DigitsCNN(num_classes=10), 28, 4),
}


def _in_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


@pytest.mark.parametrize("name", list(NETS))
def test_logits_at_training_size_and_map_beyond(name: str) -> None:
    build, size, stride = NETS[name]
    torch.manual_seed(0)
    model = build().eval()
    dense = convolutionalize(model, input_size=size)
    c = _in_channels(model)
    x = torch.randn(1, c, size, size)
    with torch.no_grad():
        logits = model(x)  # (1, K)
        out = dense(x)  # (1, K, 1, 1)
        bigger = dense(torch.randn(1, c, size, size + stride))
    assert out.shape == (*logits.shape, 1, 1)
    assert (out.flatten(1) - logits).abs().max().item() <= 1e-4
    assert bigger.shape == (1, logits.shape[1], 1, 2)  # one window per stride step
    assert dense.training_size == (size, size)


def _valid_cnn() -> nn.Sequential:
    """Valid (unpadded) convs: every map location is exactly the classifier on one crop."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 14 -> 7
        nn.Conv2d(4, 6, 3), nn.ReLU(),  # 7 -> 5
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(6 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 3),
    )  # fmt: skip


def test_every_location_is_the_classifier_on_its_crop() -> None:
    torch.manual_seed(0)
    model = _valid_cnn().eval()
    dense = convolutionalize(model)  # map size 5x5 inferred from Linear(150) and 6 channels
    assert dense.training_size == (16, 16)
    image = torch.randn(1, 1, 16 + 2 * 4, 16 + 3 * 2)  # stride 2: a 5 x 4 map
    with torch.no_grad():
        scores = dense(image)  # (1, 3, 5, 4)
        crops = torch.stack(
            [
                torch.stack(
                    [
                        model(image[..., 2 * i : 2 * i + 16, 2 * j : 2 * j + 16])[0]
                        for j in range(4)
                    ],
                    -1,
                )
                for i in range(5)
            ],
            -2,
        )  # (3, 5, 4)
    assert scores.shape == (1, 3, 5, 4)
    assert (scores[0] - crops).abs().max().item() <= 1e-5


def test_names_kept_and_weights_shared_not_copied() -> None:
    model = DigitsCNN().eval()
    dense = convolutionalize(model)
    assert set(dense.state_dict()) == set(model.state_dict())
    fc = dense.get_submodule("pre_logits.1")
    assert isinstance(fc, nn.Conv2d) and fc.weight.shape == (256, 64, 7, 7)
    assert fc.weight.data_ptr() == model.pre_logits[1].weight.data_ptr()
    assert isinstance(model.pre_logits[1], nn.Linear)  # the model itself is left as it was
    again = copy.deepcopy(dense)  # attributes survive a copy (EMA, checkpoint averaging)
    assert (again.stride, again.training_size) == (4, (28, 28))


def test_trains_in_train_mode() -> None:
    dense = convolutionalize(DigitsCNN().train(), input_size=28)
    assert dense.training
    out = dense(torch.randn(2, 1, 36, 40))  # (2, 10, 3, 4)
    out.sum().backward()
    assert out.shape == (2, 10, 3, 4) and dense.get_submodule("classifier").weight.grad is not None


def test_global_pool_without_input_size_gives_a_per_location_map() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    dense = convolutionalize(model)  # CAM-style: the pool is dropped, fc is a 1x1 conv
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        cam = dense(x)  # (1, 5, 2, 3)
        assert cam.shape == (1, 5, 2, 3)
        assert (cam.mean((2, 3)) - model(x)).abs().max().item() <= 1e-4


def test_nonaffine_head_needs_input_size() -> None:
    with pytest.raises(ValueError, match=r"'classifier.1' \(Hardswish\).*input_size"):
        convolutionalize(torchvision.models.mobilenet_v3_small(weights=None, num_classes=3))


class _NormHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.norm, self.fc2 = nn.Linear(4 * 8 * 8, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(torch.flatten(self.features(x), 1))))


def test_non_elementwise_op_between_linears_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'norm' \(LayerNorm\).*not an elementwise op"):
        convolutionalize(_NormHead())


def test_flattened_map_of_unknown_size_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 5 * 3, 2))
    with pytest.raises(ValueError, match=r"'1' \(Flatten\).*cannot be inferred"):
        convolutionalize(model)
    dense = convolutionalize(model, input_size=(7, 5))  # given: a 5x3 conv
    assert dense(torch.randn(1, 1, 9, 5)).shape == (1, 2, 3, 1)
    with pytest.raises(ValueError, match="input_size is not the size"):
        convolutionalize(model, input_size=9)


def test_image_smaller_than_the_window_is_refused() -> None:
    dense = convolutionalize(DigitsCNN().eval())
    with pytest.raises(ValueError, match=r"input too small.*28x28, got 20x40"):
        dense(torch.randn(1, 1, 20, 40))
    pooled = convolutionalize(torchvision.models.resnet18(weights=None), input_size=96)
    with pytest.raises(ValueError, match=r"input too small.*96x96, got 64x96"):
        pooled(torch.randn(1, 3, 64, 96))
