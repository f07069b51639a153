"""Callbacks that break a run on purpose: a SIGKILL mid-epoch, a NaN batch."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAt(Callback):
    """SIGKILL at (epoch, batch): no cleanup, no checkpoint, no flush, as when a node dies."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAt(Callback):
    """Fills the images of one training batch with NaN: a non-finite loss at a known step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            images = batch[0]
            for x in images if isinstance(images, list) else [images]:
                x.fill_(float("nan"))
