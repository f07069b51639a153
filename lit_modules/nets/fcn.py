"""Fully convolutional networks for semantic segmentation: FCN-32s, FCN-16s, FCN-8s (Long et al.).

A trunk gives feature maps at strides 8, 16 and 32 (VGG16's pool3 / pool4 / pool5, a ResNet's
layer2 / layer3 / layer4, or the small digits trunk). The stride-32 map goes through the
convolutionalised classifier layers (fc6 / fc7), a 1x1 *score* layer turns every map into class
scores, and learnable transposed convolutions initialised to bilinear interpolation upsample:

    32s: score_fr                                        -> x32 up
    16s: up2(score_fr) + score_pool4                     -> x16 up
     8s: up2(up2(score_fr) + score_pool4) + score_pool3  -> x8 up

Score layers start at zero (paper §4.3), so a 16s net initialised from a 32s checkpoint starts
from the 32s net's predictions and the skips only add what they learn (staged training).
The input is zero-padded on the bottom/right to a multiple of 32 (every tap then lines up
exactly) and the output cropped back: any input size gives (B, K, H, W) scores.

torchvision's `fcn_resnet50` / `deeplabv3_resnet50` (dilated ResNets, no skips) are available
under the same interface for model-zoo parity. Nothing here imports Lightning.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lit_modules.nets.backbones import build_torchvision, is_file_path, load_weights_file
from lit_modules.nets.convolutionalize import convolutionalize

FCN_ARCHS = ("digits", "vgg16", "resnet18", "resnet34", "resnet50")
TORCHVISION_ARCHS = ("fcn_resnet50", "deeplabv3_resnet50")
ARCHS = (*FCN_ARCHS, *TORCHVISION_ARCHS)
VARIANTS = ("32s", "16s", "8s")
STRIDE = 32  # the coarsest tap: inputs are padded to a multiple of it


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """(C, C, 2f, 2f) weights making ConvTranspose2d(stride=f, padding=f/2) bilinear upsampling.

    The FCN reference's `upsample_filt`, on the diagonal: class c only feeds class c at start.
    """
    size = 2 * factor
    center = factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor  # (2f,)
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = filt1d[:, None] * filt1d[None, :]
    return weight


class Upsample(nn.ConvTranspose2d):
    """x`factor` learnable upsampling of class scores, initialised to bilinear interpolation.

    kernel 2f, stride f, padding f/2: (B, C, h, w) -> (B, C, h*f, w*f), aligned like
    `F.interpolate(..., mode="bilinear", align_corners=False)` away from the border.
    """

    def __init__(self, channels: int, factor: int, *, learnable: bool = True) -> None:
        if factor < 2 or factor % 2:
            raise ValueError(f"upsampling factor must be even and >= 2, got {factor}")
        super().__init__(
            channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False
        )
        self.factor, self.learnable = factor, learnable
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(channels, factor))
        self.weight.requires_grad_(learnable)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.learnable:
            return super().forward(x, output_size)
        # Fixed: the transposed conv with the diagonal bilinear kernel is separable, one
        # (f*h, h) matrix per axis: up = A_h x A_w^T per map, two small matmuls. Equal to the
        # conv to float rounding, and a CPU FCN-32s training step ~1.3x faster than interpolating
        # the zero-padded map to (h+2)f and cropping it (the fill and the backward of the 2.8x
        # larger map cost more than the net). The weight stays in the state dict, so checkpoints
        # load either way.
        # In float32 under bf16 autocast too, as F.interpolate runs: scores, not features.
        x = x.float()
        a_h = bilinear_matrix(self.factor, x.shape[-2], x.device)  # (f*h, h)
        a_w = bilinear_matrix(self.factor, x.shape[-1], x.device)  # (f*w, w)
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum("Hh,bchw,Ww->bcHW", a_h, x, a_w)  # (B, C, h*f, w*f)


@functools.lru_cache(maxsize=32)
def bilinear_matrix(f: int, n: int, device: torch.device) -> torch.Tensor:
    """(f*n, n) float32: the 1-D bilinear transposed conv (stride f, padding f/2) on n cells.
    Cached: a net upsamples maps of the same few sizes every step."""
    taps = 1 - (torch.arange(2 * f, device=device) - (f - 0.5)).abs() / f  # (2f,)
    out = torch.arange(f * n, device=device)[:, None] + f // 2  # output px + padding
    j = out - f * torch.arange(n, device=device)[None, :]  # (f*n, n) kernel tap index
    inside = (j >= 0) & (j < 2 * f)
    return torch.where(inside, taps[j.clamp(0, 2 * f - 1)], 0.0)


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A zero-initialised 1x1 class-score layer (paper §4.3: random init brought no gain)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


# ----------------------------------------------------------------------------- trunks


class Trunk(nn.Module):
    """Three stages: image -> (stride-8, stride-16, stride-32) feature maps."""

    def __init__(self, to8: nn.Module, to16: nn.Module, to32: nn.Module) -> None:
        super().__init__()
        self.to8, self.to16, self.to32 = to8, to16, to32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.to8(x)  # (B, C3, H/8, W/8)
        p4 = self.to16(p3)  # (B, C4, H/16, W/16)
        return p3, p4, self.to32(p4)  # (B, C5, H/32, W/32)


def _conv_bn(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _stage(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers = _conv_bn(cin, cout)
    for _ in range(convs - 1):
        layers += _conv_bn(cout, cout)
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def digits_trunk(
    in_channels: int, widths: tuple[int, ...] = (16, 32, 48, 96, 128), fc: int = 256
) -> tuple[Trunk, nn.Module, tuple[int, int, int]]:
    """A small VGG-style trunk (5 pooling stages, BatchNorm) for DigitCanvas scenes on a CPU."""
    w1, w2, w3, w4, w5 = widths
    to8 = nn.Sequential(_stage(in_channels, w1, 1), _stage(w1, w2, 1), _stage(w2, w3, 2))
    trunk = Trunk(to8, _stage(w3, w4, 2), _stage(w4, w5, 2))
    # fc6 / fc7 of a classifier on a 3x3 window of pool5, written as convolutions
    head = nn.Sequential(*_conv_bn(w5, fc, 3), nn.Dropout2d(0.1), *_conv_bn(fc, fc, 1))
    return trunk, head, (w3, w4, fc)


def vgg16_trunk(weights: str | None) -> tuple[Trunk, nn.Module, tuple[int, int, int]]:
    """VGG16 (the paper's net): pool3 / pool4 / pool5 taps, fc6 as 7x7 conv, fc7 as 1x1 conv.

    fc6 / fc7 come from `convolutionalize` (the one FC -> conv implementation). The paper pads
    the input by 100 pixels so fc6 (a valid 7x7 conv) fits small images; here fc6 is padded by 3
    instead, so its output keeps pool5's size and no offset crop is needed.
    """
    vgg = build_torchvision("vgg16", weights=weights)
    f = vgg.features
    trunk = Trunk(f[:17], f[17:24], f[24:31])  # pool3 (256 ch), pool4 (512), pool5 (512)
    dense = convolutionalize(vgg, input_size=224)  # classifier.0 / .3: (4096, 512, 7, 7) / 1x1
    fc6, fc7 = dense.get_submodule("classifier.0"), dense.get_submodule("classifier.3")
    fc6.padding = (3, 3)  # (B, 4096, H/32, W/32): same size as pool5
    head = nn.Sequential(fc6, nn.ReLU(), nn.Dropout2d(0.5), fc7, nn.ReLU(), nn.Dropout2d(0.5))
    return trunk, head, (256, 512, 4096)


def resnet_trunk(name: str, weights: str | None) -> tuple[Trunk, nn.Module, tuple[int, int, int]]:
    """A torchvision ResNet: layer2 / layer3 / layer4 taps; no fc layers (its head is a pool)."""
    r = build_torchvision(name, weights=weights)
    to8 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2)
    c = r.fc.in_features  # 512 (resnet18/34) or 2048 (resnet50)
    return Trunk(to8, r.layer3, r.layer4), nn.Identity(), (c // 4, c // 2, c)


# ----------------------------------------------------------------------------- FCN


class FCN(nn.Module):
    """FCN-32s / 16s / 8s on a trunk with stride-8/16/32 taps. Returns (B, K, H, W) scores."""

    def __init__(
        self,
        trunk: Trunk,
        head: nn.Module,
        channels: tuple[int, int, int],
        *,
        num_classes: int,
        variant: str = "8s",
        learn_final_upsampling: bool = True,
        skip_scales: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; valid: {', '.join(VARIANTS)}")
        c3, c4, c5 = channels
        self.variant, self.num_classes = variant, num_classes
        # (pool4, pool3) multipliers before the skips' score layers: the authors' at-once FCN-8s
        # uses (0.01, 0.0001) so the coarse path learns "what" before the skips refine "where".
        self.skip_scales = tuple(skip_scales)
        self.trunk, self.head = trunk, head
        self.score_fr = _score(c5, num_classes)
        if variant in ("16s", "8s"):
            self.score_pool4 = _score(c4, num_classes)
            self.upscore2 = Upsample(num_classes, 2)
        if variant == "8s":
            self.score_pool3 = _score(c3, num_classes)
            self.upscore_pool4 = Upsample(num_classes, 2)
        final = {"32s": 32, "16s": 16, "8s": 8}[variant]
        # The paper keeps the last upsampling fixed bilinear; learning it sharpens thin structures.
        self.upscore_final = Upsample(num_classes, final, learnable=learn_final_upsampling)
        self.frozen_features = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % STRIDE, 0, -h % STRIDE))  # (B, C, Hp, Wp), multiples of 32
        p3, p4, p5 = self.trunk(x)
        s = self.score_fr(self.head(p5))  # (B, K, Hp/32, Wp/32)
        if self.variant != "32s":
            s = self.upscore2(s) + self.score_pool4(
                p4 * self.skip_scales[0]
            )  # (B, K, Hp/16, Wp/16)
        if self.variant == "8s":
            s = self.upscore_pool4(s) + self.score_pool3(
                p3 * self.skip_scales[1]
            )  # (B, K, Hp/8, Wp/8)
        return self.upscore_final(s)[..., :h, :w]  # (B, K, H, W): crop the padding away

    def freeze_features(self) -> None:
        """FCN-32s-fixed: trunk and fc layers fixed (BatchNorm too); only score layers learn."""
        self.frozen_features = True
        for part in (self.trunk, self.head):
            part.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FCN:
        super().train(mode)
        if self.frozen_features:
            self.trunk.eval()  # FrozenBN: running statistics stay those it was built with
            self.head.eval()
        return self


class TorchvisionSegmentation(nn.Module):
    """torchvision's `fcn_resnet50` / `deeplabv3_resnet50` returning the `out` scores only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]  # (B, K, H, W)


def _torchvision_segmentation(name: str, num_classes: int, weights: str | None) -> nn.Module:
    """`weights`: null, a file, a segmentation weights name (21 classes) or an ImageNet backbone one."""
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict = {"num_classes": num_classes, "aux_loss": False}
    if weights is None or is_file_path(weights):
        model = builder(weights=None, weights_backbone=None, **kwargs)
        if weights is not None:
            model.load_state_dict(load_weights_file(weights))
        return TorchvisionSegmentation(model)
    seg = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]
    if key == "DEFAULT" or key in seg.__members__:
        enum = seg.DEFAULT if key == "DEFAULT" else seg[key]
        if num_classes != len(enum.meta["categories"]):
            raise ValueError(
                f"{name} weights {enum} have {len(enum.meta['categories'])} classes, "
                f"num_classes is {num_classes}"
            )
        return TorchvisionSegmentation(builder(weights=enum, **kwargs))
    backbone = torchvision.models.get_model_weights("resnet50")
    if key not in backbone.__members__:
        valid = [*seg.__members__, *backbone.__members__]
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: DEFAULT, {valid}, null")
    return TorchvisionSegmentation(builder(weights=None, weights_backbone=backbone[key], **kwargs))


def load_coarser(net: FCN, path: str | Path) -> list[str]:
    """Staged training: copy a coarser FCN's weights (32s -> 16s, 16s -> 8s) into `net`.

    `path` is an FCNModule checkpoint or an FCN state dict of the same arch. Every tensor whose
    name and shape match is copied (trunk, fc layers, score layers, 2x upsamplings); the new skip's
    score layer stays at zero, so the finer net starts from the coarser one's scores. Returns the
    names left at their initial value.
    """
    state = load_weights_file(path)
    if any(k.startswith("net.") for k in state):  # a LightningModule checkpoint
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    needed = [k for k in own if k.startswith(("trunk.", "head.", "score_fr."))]
    bad = [k for k in needed if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise ValueError(
            f"{path} is not an FCN checkpoint of this arch: {len(bad)} trunk/score tensors "
            f"missing or of another shape, e.g. {bad[:3]}"
        )
    copy = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    net.load_state_dict(copy, strict=False)
    return sorted(set(own) - set(copy))


def build_fcn(
    *,
    arch: str = "digits",
    variant: str | None = "8s",
    num_classes: int = 11,
    in_channels: int = 1,
    weights: str | None = None,
    init_from: str | None = None,
    learn_final_upsampling: bool = True,
    skip_scales: tuple[float, float] = (1.0, 1.0),
) -> nn.Module:
    """An FCN-`variant` on `arch` (see ARCHS), or one of torchvision's segmentation nets.

    weights: ImageNet weights for the trunk (a torchvision name such as `IMAGENET1K_V1`, or a file);
    for torchvision's nets also their own segmentation weights (`DEFAULT`, 21 VOC classes).
    init_from: a coarser FCN's checkpoint for staged training (see `load_coarser`).
    skip_scales: (pool4, pool3) feature multipliers for at-once training (see FCN).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if arch in TORCHVISION_ARCHS:
        if variant is not None or init_from is not None:
            raise ValueError(
                f"{arch} is torchvision's own net (dilated, no skips): set variant: null and "
                "init_from: null"
            )
        if in_channels != 3:
            raise ValueError(f"{arch} takes 3-channel images (for digits set data.channels: 3)")
        return _torchvision_segmentation(arch, num_classes, weights)
    if variant is None:
        raise ValueError(f"arch {arch} needs a variant: one of {', '.join(VARIANTS)}")
    if arch == "digits":
        if weights is not None:
            raise ValueError("the digits trunk is trained from scratch: set weights: null")
        parts = digits_trunk(in_channels)
    elif in_channels != 3:
        raise ValueError(f"arch {arch} takes 3-channel images, got in_channels={in_channels}")
    elif arch == "vgg16":
        parts = vgg16_trunk(weights)
    else:
        parts = resnet_trunk(arch, weights)
    net = FCN(
        *parts,
        num_classes=num_classes,
        variant=variant,
        learn_final_upsampling=learn_final_upsampling,
        skip_scales=skip_scales,
    )
    if init_from is not None:
        load_coarser(net, init_from)
    return net
