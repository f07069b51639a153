"""Pictures of predictions: written as PNGs in the run directory and logged to W&B when it is on."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import draw_bounding_boxes, make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised floats -> (B, 3, H, W) uint8, each image stretched to [0, 255]."""
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def labelled_grid(
    images: torch.Tensor, texts: list[str], correct: list[bool], *, side: int = 84
) -> torch.Tensor:
    """A grid of images, each with its caption in green (right) or red (wrong): (3, H, W) uint8."""
    x = to_uint8(images)
    x = F.interpolate(x.float(), size=(side, side), mode="nearest").to(torch.uint8)
    box = torch.tensor([[0, 0, side - 1, side - 1]], dtype=torch.float32)
    tiles = [
        draw_bounding_boxes(img, box, labels=[t], colors="lime" if ok else "red", width=2)
        for img, t, ok in zip(x, texts, correct, strict=True)
    ]
    return make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2)


def run_dir(module: LightningModule) -> Path:
    """Where this run writes its files (the CSV logger's versioned folder, or default_root_dir)."""
    trainer = module.trainer
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_picture(
    module: LightningModule, key: str, picture: torch.Tensor, caption: str = ""
) -> Path | None:
    """Call on every rank. Write `picture` (3, H, W) uint8 to <run>/images/<key>_epochNNN.png; log it to W&B too."""
    trainer = module.trainer
    folder = run_dir(module)  # every rank: `trainer.log_dir` is a collective (broadcast) under DDP
    if not trainer.is_global_zero:
        return None
    path = folder / "images" / f"{key.replace('/', '_')}_epoch{trainer.current_epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png(picture.cpu(), str(path))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption or key])
    return path
