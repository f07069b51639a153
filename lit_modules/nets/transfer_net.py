"""A backbone cut into stages plus a new head: the network of every transfer-learning mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lit_modules.nets.backbones import _is_file_path, build_backbone, load_weights_file


class TransferNet(nn.Module):
    """stages (image -> (B, D)) -> head Linear(D, K); optionally the source task's head beside it.

    `freeze_bottom(n)` freezes the n lowest stages: no gradients, and their BatchNorm layers stay
    in eval mode (running statistics untouched) even after `train()` -- a frozen feature
    extractor must compute exactly the features it was trained with.
    """

    def __init__(self, stages: list[nn.Module], head: nn.Linear, source_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.source_head = source_head
        if source_head is not None:
            source_head.requires_grad_(False)
        self.num_frozen = 0

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Frozen stages run without autograd: no graph is built for layers that never learn.
        with torch.no_grad():
            for stage in self.stages[: self.num_frozen]:
                x = stage(x)
        for stage in self.stages[self.num_frozen :]:
            x = stage(x)
        return x  # (B, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def freeze_bottom(self, n: int) -> None:
        """Freeze stages[:n], unfreeze the rest (n = len(stages): a fixed feature extractor)."""
        if not 0 <= n <= len(self.stages):
            raise ValueError(f"can freeze 0..{len(self.stages)} stages, not {n}")
        self.num_frozen = n
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= n)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        for stage in self.stages[: self.num_frozen]:
            stage.eval()  # FrozenBN: running stats stay those of the pretrained net
        if self.source_head is not None:
            self.source_head.eval()
        return self


def _cnnlab_checkpoint(weights: str | None) -> dict[str, torch.Tensor] | None:
    """The state dict of a TransferClassifier checkpoint file, or None if `weights` is not one."""
    if weights is None or not _is_file_path(weights):
        return None
    state = load_weights_file(weights)
    return state if any(k.startswith("net.stages.") for k in state) else None


def build_transfer_net(
    *,
    backbone: str,
    num_classes: int,
    weights: str | None = None,
) -> TransferNet:
    """A TransferNet for `num_classes` on `backbone` with `weights` (name, file or None).

    A TransferClassifier checkpoint as `weights` (e.g. the digits 0-4 pretraining run) gives its
    stages *and* its head, which becomes the source head; a torchvision state dict or weights name
    gives the pretrained stages and the ImageNet classifier as source head.
    """
    ckpt = _cnnlab_checkpoint(weights)
    stages, old_head = build_backbone(backbone, weights=None if ckpt is not None else weights)
    pretrained = weights is not None
    if ckpt is not None:
        stage_state = {k[len("net.stages.") :]: v for k, v in ckpt.items() if k.startswith("net.stages.")}
        try:
            nn.ModuleList(stages).load_state_dict(stage_state)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {Path(weights)} does not match backbone {backbone}: {err}") from err
        w, b = ckpt["net.head.weight"], ckpt.get("net.head.bias")
        old_head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        old_head.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
    head = nn.Linear(old_head.in_features, num_classes)
    return TransferNet(stages, head, source_head=old_head if pretrained else None)
