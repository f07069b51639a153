"""A backbone cut into stages plus a new head: the network of every transfer-learning mode."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_modules.nets.backbones import build_backbone, is_file_path, load_weights_file


class TransferNet(nn.Module):
    """The first `feature_stages` stages of a pretrained net -> features (B, D) -> head Linear(D, K).

    `feature_stages` is Yosinski et al.'s n: how many bottom stages are transferred (default: all).
    A cut below the top gives a feature map, max-pooled to `pool` x `pool` and flattened (DCGAN §5.1,
    Razavian et al.): spatial layout survives, the vector stays small. All stages are kept, so the
    source task's head can still be evaluated on the full (possibly fine-tuned) network.

    `freeze_bottom(n)` freezes the n lowest stages: no gradients, and their BatchNorm layers stay
    in eval mode (running statistics untouched) even after `train()` -- a frozen feature
    extractor must compute exactly the features it was trained with. Stages above the cut never
    learn (nothing but the source head uses them).
    """

    def __init__(
        self,
        stages: list[nn.Module],
        head: nn.Linear,
        source_head: nn.Linear | None = None,
        *,
        feature_stages: int | None = None,
        pool: int = 4,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.source_head = source_head
        if source_head is not None:
            source_head.requires_grad_(False)
        self.feature_stages = len(stages) if feature_stages is None else feature_stages
        if not 1 <= self.feature_stages <= len(stages):
            raise ValueError(f"feature_stages must be in 1..{len(stages)}, got {feature_stages}")
        self.pool = pool
        self.freeze_bottom(0)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):
            # Frozen stages run without autograd: no graph for layers that never learn.
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.num_frozen):
                x = self.stages[i](x)
        return x

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # (B, C, H, W) from a cut below the top
            x = F.adaptive_max_pool2d(x, self.pool).flatten(1)  # (B, C * pool * pool)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pooled(self._run(x, 0, self.feature_stages))  # (B, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_source(self, x: torch.Tensor) -> torch.Tensor:
        """Source-task logits: every stage, then the kept source head."""
        if self.source_head is None:
            raise RuntimeError(
                "this network has no source head (it was not built from pretrained weights)"
            )
        return self.source_head(self._run(x, 0, len(self.stages)))

    def freeze_bottom(self, n: int) -> None:
        """Freeze stages[:n], let stages[n:feature_stages] learn (n = feature_stages: fixed extractor)."""
        if not 0 <= n <= self.feature_stages:
            raise ValueError(f"can freeze 0..{self.feature_stages} stages, not {n}")
        self.num_frozen = n
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(n <= i < self.feature_stages)
        self.train(self.training)

    def _frozen(self) -> list[nn.Module]:
        return [
            s for i, s in enumerate(self.stages) if not self.num_frozen <= i < self.feature_stages
        ]

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        for stage in self._frozen():
            stage.eval()  # FrozenBN: running stats stay those of the pretrained net
        if self.source_head is not None:
            self.source_head.eval()
        return self


def _cnnlab_checkpoint(weights: str | None) -> dict[str, torch.Tensor] | None:
    """The state dict of a TransferClassifier checkpoint file, or None if `weights` is not one."""
    if weights is None or not is_file_path(weights):
        return None
    state = load_weights_file(weights)
    return state if any(k.startswith("net.stages.") for k in state) else None


def load_stages(
    stages: list[nn.Module], state: dict[str, torch.Tensor], *, path: str, backbone: str
) -> None:
    """Load the `net.stages.*` weights of a TransferClassifier checkpoint into `stages`."""
    prefix = "net.stages."
    stage_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not stage_state:
        raise ValueError(
            f"{Path(path)} has no net.stages.* weights: not a cnnlab (TransferClassifier) checkpoint"
        )
    try:
        nn.ModuleList(stages).load_state_dict(stage_state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {Path(path)} does not match backbone {backbone}: {err}"
        ) from err


def build_transfer_net(
    *,
    backbone: str,
    num_classes: int,
    weights: str | None = None,
    feature_stages: int | None = None,
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
        load_stages(stages, ckpt, path=weights, backbone=backbone)
        w, b = ckpt["net.head.weight"], ckpt.get("net.head.bias")
        old_head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        old_head.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
    n = len(stages) if feature_stages is None else feature_stages
    if not 1 <= n <= len(stages):
        raise ValueError(
            f"feature_stages must be in 1..{len(stages)} for {backbone}, got {feature_stages}"
        )
    dim = old_head.in_features if n == len(stages) else _cut_dim(stages[:n])
    source = old_head if pretrained else None
    return TransferNet(stages, nn.Linear(dim, num_classes), source, feature_stages=n)


def _cut_dim(stages: list[nn.Module], pool: int = 4) -> int:
    """Feature size after `stages` and max-pooling to pool x pool: channels * pool**2."""
    first = next(m for s in stages for m in s.modules() if isinstance(m, nn.Conv2d))
    probe = nn.Sequential(*stages)
    was_training = probe.training
    with torch.no_grad():
        x = probe.eval()(torch.zeros(1, first.in_channels, 64, 64))
    probe.train(was_training)
    return x.shape[1] * pool * pool if x.ndim == 4 else x.shape[1]
