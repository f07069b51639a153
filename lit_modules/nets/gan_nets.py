"""Generators and discriminators: DCGAN (Radford et al. 2015) and the MLP GAN (Goodfellow et al. 2014).

DCGAN's recipe (§3-4): no pooling (strided convolutions in D, fractionally-strided in G),
BatchNorm everywhere except G's output and D's input, ReLU in G with tanh at the output,
LeakyReLU 0.2 in D, weights N(0, 0.02). Images are in [-1, 1]. The 2014 GAN is two MLPs:
G with ReLU hidden layers, D with maxout hidden layers and dropout.

Every discriminator exposes `features(x) -> list[Tensor]`, one tensor per hidden layer, so the
DCGAN §5.1 transfer experiment (D's features + linear SVM) can read every layer. `DigitsJudge`
is the frozen digits classifier that scores samples (FID features, class probabilities).
Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_modules.nets.backbones import load_weights_file
from lit_modules.nets.transfer_net import build_transfer_net

ARCHS = ("dcgan", "mlp")
IMAGE_SIZES = (32, 64)


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN §4: conv / linear weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _num_blocks(image_size: int) -> int:
    """Stride-2 layers between 4x4 and the image: 3 for 32x32, 4 for 64x64."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")
    return int(math.log2(image_size)) - 2


# ----------------------------------------------------------------------------- DCGAN


class DCGANGenerator(nn.Module):
    """z (B, latent_dim) -> image (B, C, S, S) in [-1, 1] (S = 32: 4 -> 8 -> 16 -> 32)."""

    def __init__(
        self, *, latent_dim: int = 100, channels: int = 1, width: int = 64, image_size: int = 32
    ) -> None:
        super().__init__()
        n = _num_blocks(image_size)
        self.latent_dim = latent_dim
        widths = [width * 2 ** (n - 1 - i) for i in range(n)]  # e.g. [4w, 2w, w] for 32x32
        layers: list[nn.Module] = [  # "project and reshape": a 4x4 transposed conv on 1x1
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # no BN at output
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))  # (B, C, S, S)


class DCGANDiscriminator(nn.Module):
    """image (B, C, S, S) -> logit (B,); `features` gives every hidden layer's activations."""

    def __init__(self, *, channels: int = 1, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        n = _num_blocks(image_size)
        widths = [width * 2**i for i in range(n)]  # e.g. [w, 2w, 4w] for 32x32
        blocks = []
        for i, cout in enumerate(widths):
            cin = channels if i == 0 else widths[i - 1]
            norm = nn.Identity() if i == 0 else nn.BatchNorm2d(cout)  # no BN at D's input
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 4, 2, 1, bias=i == 0), norm, nn.LeakyReLU(0.2, True)
                )
            )
        self.blocks = nn.ModuleList(blocks)  # S/2, S/4, ..., 4x4
        self.head = nn.Conv2d(widths[-1], 1, 4, 1, 0)  # (B, 1, 1, 1) logit
        init_dcgan_weights(self)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[(B, w, S/2, S/2), (B, 2w, S/4, S/4), ..., (B, w * 2**(n-1), 4, 4)]."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1]).flatten()  # (B,) logits


# ----------------------------------------------------------------------------- MLP (2014)


class Maxout(nn.Module):
    """Maxout unit (Goodfellow et al. 2013): the max over `pieces` linear maps, (B, in) -> (B, out)."""

    def __init__(self, in_features: int, out_features: int, pieces: int) -> None:
        super().__init__()
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x).view(x.shape[0], self.out_features, self.pieces)  # (B, out, k)
        return y.amax(dim=2)  # (B, out)


class MLPGenerator(nn.Module):
    """z (B, latent_dim) -> image (B, C, S, S): ReLU hidden layers, tanh output (images in [-1, 1])."""

    def __init__(
        self,
        *,
        latent_dim: int = 100,
        channels: int = 1,
        image_size: int = 32,
        hidden: tuple[int, ...] = (1200, 1200),
    ) -> None:
        super().__init__()
        self.latent_dim, self.shape = latent_dim, (channels, image_size, image_size)
        layers: list[nn.Module] = []
        for cin, cout in zip((latent_dim, *hidden[:-1]), hidden, strict=True):
            layers += [nn.Linear(cin, cout), nn.ReLU(inplace=True)]
        layers += [nn.Linear(hidden[-1], channels * image_size**2), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(1)).view(z.shape[0], *self.shape)  # (B, C, S, S)


class MLPDiscriminator(nn.Module):
    """image (B, C, S, S) -> logit (B,): dropout, then maxout hidden layers (the 2014 MNIST net)."""

    def __init__(
        self,
        *,
        channels: int = 1,
        image_size: int = 32,
        hidden: tuple[int, ...] = (240, 240),
        pieces: int = 5,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        dims = (channels * image_size**2, *hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), Maxout(cin, cout, pieces))
            for cin, cout in zip(dims[:-1], dims[1:], strict=True)
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden[-1], 1))
        init_dcgan_weights(self)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[(B, hidden[0]), (B, hidden[1]), ...]."""
        x, out = x.flatten(1), []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1]).flatten()  # (B,) logits


# ----------------------------------------------------------------------------- the digits judge


class DigitsJudge(nn.Module):
    """A frozen digits classifier that scores GAN samples: 256-d penultimate features + class probs.

    Takes G's images ((B, 1, 32, 32) or (B, 1, 64, 64), float in [-1, 1]) and converts them to
    what the classifier was trained on: 28x28 (the 2-pixel padding cropped off), normalised with
    the `mean` / `std` it was trained with (MNIST's).
    `num_features` tells torchmetrics' FID the feature size; it stays in eval mode for good.
    """

    def __init__(self, path: str | Path, *, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std
        path = Path(path)
        state = load_weights_file(path)  # FileNotFoundError / ValueError name the file
        if not any(k.startswith("net.stages.") for k in state) or "net.head.weight" not in state:
            raise ValueError(
                f"{path} is not a digits classifier checkpoint (no net.stages.* / net.head.* "
                "weights): the digits FID needs the TransferClassifier digits_cnn weights written "
                "by configs/gan/digits_classifier.yaml"
            )
        classes = state["net.head.weight"].shape[0]
        if classes != 10:
            raise ValueError(
                f"{path} is a {classes}-class classifier: the digits metrics need one trained on "
                "all 10 digits (configs/gan/digits_classifier.yaml)"
            )
        try:
            net = build_transfer_net(backbone="digits_cnn", num_classes=10, weights=str(path))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{path} does not match the digits_cnn classifier: {err}") from err
        self.stages, self.classifier = net.stages, net.source_head  # the trained 10-way head
        self.num_features = self.classifier.in_features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DigitsJudge:
        return super().train(False)  # BatchNorm / dropout of a measuring instrument never change

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"the digits classifier scores 1-channel images, got {x.shape[1]}")
        x = (x.float() + 1) / 2  # (B, 1, S, S) in [0, 1]
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=32, mode="bilinear", antialias=True)
        x = x[..., 2:30, 2:30]  # (B, 1, 28, 28): the digits were padded by 2
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, 256) penultimate features

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(x)).softmax(1)  # (B, 10)


# ----------------------------------------------------------------------------- builders


def _check(arch: str, channels: int, latent_dim: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")


def build_generator(
    *,
    arch: Literal["dcgan", "mlp"] = "dcgan",
    latent_dim: int = 100,
    channels: int = 1,
    image_size: int = 32,
    width: int = 64,
    mlp_hidden: tuple[int, ...] = (1200, 1200),
) -> nn.Module:
    """G for `arch`: DCGAN's width is its last hidden layer's channels (doubling towards z)."""
    _check(arch, channels, latent_dim)
    if arch == "dcgan":
        return DCGANGenerator(
            latent_dim=latent_dim, channels=channels, width=width, image_size=image_size
        )
    _num_blocks(image_size)  # same sizes as DCGAN, so the two are compared on the same images
    return MLPGenerator(
        latent_dim=latent_dim, channels=channels, image_size=image_size, hidden=tuple(mlp_hidden)
    )


def build_discriminator(
    *,
    arch: Literal["dcgan", "mlp"] = "dcgan",
    channels: int = 1,
    image_size: int = 32,
    width: int = 64,
    mlp_hidden: tuple[int, ...] = (240, 240),
    maxout_pieces: int = 5,
    dropout: float = 0.2,
) -> nn.Module:
    """D for `arch`: DCGAN's width is its first layer's channels (doubling with depth)."""
    _check(arch, channels, 1)
    if arch == "dcgan":
        return DCGANDiscriminator(channels=channels, width=width, image_size=image_size)
    _num_blocks(image_size)
    return MLPDiscriminator(
        channels=channels,
        image_size=image_size,
        hidden=tuple(mlp_hidden),
        pieces=maxout_pieces,
        dropout=dropout,
    )
