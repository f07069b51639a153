"""Classifier backbones by name, their weights, and their split into stages (bottom -> top).

Every backbone is cut the same way: a list of stages that map an image to a feature vector
(B, D), and the classifier `Linear(D, K)` it was trained with. Transfer learning freezes or
fine-tunes whole stages and swaps the Linear; the old Linear is kept as the *source head* so
forgetting on the source task can be measured. Nothing here imports Lightning.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torchvision
from torch import nn

TORCHVISION_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
)
BACKBONES = ("digits_cnn", *TORCHVISION_BACKBONES)


class DigitsCNN(nn.Module):
    """A small VGG-style net for 28x28 digits: three conv stages, one hidden FC layer, classifier.

    The FC head (`Flatten -> Linear(C*7*7, hidden)`) is deliberate: it is the layer that
    `convolutionalize` rewrites as a 7x7 convolution, as in OverFeat / FCN.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = []
            for c in (cin, cout):
                layers += [
                    nn.Conv2d(c, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        w1, w2, w3 = widths
        self.features = nn.Sequential(
            block(in_channels, w1, pool=True),  # (B, w1, 14, 14)
            block(w1, w2, pool=True),  # (B, w2, 7, 7)
            block(w2, w3, pool=False),  # (B, w3, 7, 7)
        )
        # Dropout before the classifier, as in AlexNet/VGG's fc layers: it spreads the task over
        # many hidden units, which keeps these features useful for other tasks (DeCAF, Razavian).
        self.pre_logits = nn.Sequential(
            nn.Flatten(1), nn.Linear(w3 * 7 * 7, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, w3, 7, 7)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)  # (B, hidden)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def unpadded_digits_cnn(*, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """DigitsCNN's shape (28 px in, stride 4, a hidden FC layer) with valid, unpadded convs.

    OverFeat's point made exact: without zero padding a crop and the whole image see the same
    pixels, so the convolutionalized net's map equals the classifier on every crop (to float
    rounding). DigitsCNN pads its convs, so its dense and crop scores differ near crop borders.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),  # 28 -> 24
        nn.MaxPool2d(2),  # 24 -> 12
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),  # 12 -> 8
        nn.MaxPool2d(2),  # 8 -> 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, num_classes),
    )  # fmt: skip


def build_digits_cnn(
    *, num_classes: int = 10, in_channels: int = 1, weights: str | None = None
) -> DigitsCNN:
    model = DigitsCNN(num_classes=num_classes, in_channels=in_channels)
    if weights is not None:
        model.load_state_dict(load_weights_file(weights))
    return model


# ----------------------------------------------------------------------------- weights


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `path` (a plain state dict or a Lightning checkpoint), loaded safely.

    `weights_only=True`: a weights file is data, never code to execute.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code, truncated zip, not a torch file
        raise ValueError(_load_error(path, err)) from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state dict of tensors")
    return state


def _load_error(path: Path, err: Exception) -> str:
    """One line for a failed `torch.load(weights_only=True)`.

    torch's own message is a paragraph that suggests `weights_only=False`, the unsafe way out.
    """
    code = re.search(r"GLOBAL ([\w.]+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and code:  # refused, never run
        return (
            f"weights file {path} refused: it holds pickled code ({code[1]}), not only tensors, "
            "and weights_only=True loading never runs code; re-save the weights from a trusted "
            "source as a plain state dict (torch.save(model.state_dict(), path))"
        )
    kind = type(err).__name__
    return (
        f"could not load weights file {path}: not a torch weights file, or a corrupt one ({kind})"
    )


def torchvision_weights(model: str | Callable[..., nn.Module], weights: str) -> Any:
    """The weights enum member of torchvision `model` (name or builder) for `DEFAULT`,
    `IMAGENET1K_V2` or a full `ResNet50_Weights.IMAGENET1K_V2`."""
    enum = torchvision.models.get_model_weights(model)
    key = weights.split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    valid = [w.name for w in enum]
    if key not in valid:
        name = model if isinstance(model, str) else model.__name__
        raise ValueError(
            f"unknown weights {weights!r} for {name}; valid: DEFAULT, {', '.join(valid)}, null, or a file path"
        )
    return enum[key]


@contextmanager
def state_instead_of_download(member: Any, state: dict[str, torch.Tensor]) -> Iterator[Any]:
    """Within the block, torchvision weights enum `member` "downloads" `state`.

    A torchvision builder given `member` builds what it builds for pretrained weights
    (FrozenBatchNorm2d, the default trainable stages, ...) and loads `state` strictly: weights
    from a file then give the very module that the same weights by name give.
    """
    with mock.patch.object(type(member), "get_state_dict", lambda self, *a, **k: state):
        yield member


def is_file_path(weights: str) -> bool:
    return "/" in weights or weights.endswith((".pt", ".pth", ".ckpt", ".bin"))


def build_torchvision(name: str, *, weights: str | None = None) -> nn.Module:
    """A torchvision classifier by name; weights by enum name (downloaded/cached) or file path."""
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if weights is None or is_file_path(weights):
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            state = load_weights_file(weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"weights file {weights} does not match {name}: {err}") from err
        return model
    enum = torchvision_weights(name, weights)
    try:
        return torchvision.models.get_model(name, weights=enum)
    except Exception as err:  # no network: say where the file is expected
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"could not get {enum} for {name} ({type(err).__name__}: {err}). Download {enum.url} "
            f"into {cache}, or pass the file's path as weights."
        ) from err


# ----------------------------------------------------------------------------- stages


def _split_by_stride(seq: nn.Sequential, in_channels: int) -> list[nn.Module]:
    """Group a `features` Sequential into stages: a child that lowers the resolution opens one.

    A group without parameters (VGG's last max-pool) is merged into the stage before it.
    """
    stages: list[list[nn.Module]] = [[]]
    x = torch.zeros(1, in_channels, 64, 64)
    with torch.no_grad():
        for child in seq:
            h = x.shape[-1]
            was_training = child.training
            x = child.eval()(x)
            child.train(was_training)  # probing must not change the caller's model
            if x.shape[-1] < h and _has_params(stages[-1]):
                stages.append([])
            stages[-1].append(child)
    if len(stages) > 1 and not _has_params(stages[-1]):
        last = stages.pop()
        stages[-1] += last
    return [nn.Sequential(*s) for s in stages]


def _has_params(modules: list[nn.Module]) -> bool:
    return any(p.numel() for m in modules for p in m.parameters())


def split_classifier(model: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """Cut a classifier into stages (image -> (B, D) features, bottom to top) and its last Linear."""
    if isinstance(model, DigitsCNN):
        return [*model.features, model.pre_logits], model.classifier
    if isinstance(model, torchvision.models.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        top = nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1))  # (B, 512 or 2048)
        return [stem, model.layer1, model.layer2, model.layer3, top], model.fc
    if hasattr(model, "features") and hasattr(
        model, "classifier"
    ):  # VGG, MobileNetV3, EfficientNet
        *hidden, head = list(model.classifier)
        stages = _split_by_stride(model.features, in_channels=3)
        pool = [model.avgpool, nn.Flatten(1)]
        if _has_params(hidden):  # VGG fc6/fc7, MobileNetV3's 1280-d layer: a stage of their own
            stages.append(nn.Sequential(*pool, *hidden))
        else:  # EfficientNet: pooling (+ dropout) closes the last conv stage
            stages[-1] = nn.Sequential(*stages[-1], *pool, *hidden)
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"{type(model).__name__}: last classifier layer is {type(head).__name__}, not Linear"
            )
        return stages, head
    raise TypeError(f"don't know how to split {type(model).__name__} into stages")


def build_backbone(name: str, *, weights: str | None = None) -> tuple[list[nn.Module], nn.Linear]:
    """Stages and original classifier of backbone `name` (see BACKBONES)."""
    if name == "digits_cnn":
        return split_classifier(build_digits_cnn(weights=weights))
    return split_classifier(build_torchvision(name, weights=weights))
