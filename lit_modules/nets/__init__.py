"""Plain nn.Modules and their builders. Nothing in this package imports Lightning."""

from lit_modules.nets.backbones import BACKBONES, DigitsCNN, build_backbone, build_digits_cnn
from lit_modules.nets.convolutionalize import convolutionalize
from lit_modules.nets.transfer_net import TransferNet, build_transfer_net

__all__ = [
    "BACKBONES",
    "DigitsCNN",
    "TransferNet",
    "build_backbone",
    "build_digits_cnn",
    "build_transfer_net",
    "convolutionalize",
]
