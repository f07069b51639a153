"""Non-finite losses: stop with a message naming the step and the loss term, or skip the step.

A NaN or Inf loss, once back-propagated, poisons every weight and every later checkpoint. Each
module checks its loss terms before `backward`: with `nonfinite_loss: stop` (the default) the run
stops there, before this step's update, with the last good checkpoint on disk; with `skip` the
step is dropped (no backward, no optimizer step) and counted in `train/skipped_steps`. Under DDP
the ranks agree first (one all-reduce of a flag), so they all stop or all skip together. A
skipped step also restores the BatchNorm statistics its forward pass moved (`BufferSnapshot`, one
of scripts/train.py's default callbacks).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

NONFINITE_POLICIES = ("stop", "skip")
NonFinitePolicy = Literal["stop", "skip"]


class NonFiniteLossError(FloatingPointError):
    """Training stopped at a NaN / Inf loss."""


def _describe(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(
        f"{name}={value.detach().float().mean().item():.4g}" for name, value in terms.items()
    )


def finite_loss(module: LightningModule, terms: dict[str, torch.Tensor], policy: str) -> bool:
    """True when every loss term is finite; else stop (raise) or count a skipped step (False)."""
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()]).any()
    trainer = module.trainer
    if trainer.world_size > 1:  # a NaN on one rank only: every rank must take the same branch
        bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
    if not bad:
        return True
    where = f"step {module.global_step} (epoch {module.current_epoch}, rank {trainer.global_rank})"
    if policy == "stop":
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or "none saved yet"
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {_describe(terms)}; training stopped before this "
            f"step's update, last good checkpoint: {last} "
            "(model.nonfinite_loss=skip skips such steps instead)"
        )
    snapshot = getattr(module, "_buffer_snapshot", None)
    if snapshot is not None:  # this step's forward already moved BatchNorm statistics: undo it
        for name, buffer in module.named_buffers():
            if name in snapshot:
                buffer.copy_(snapshot[name])
    skipped = getattr(module, "_skipped_steps", 0) + 1
    module._skipped_steps = skipped
    rank_zero_warn(
        f"non-finite loss at {where}: {_describe(terms)}; step skipped ({skipped} so far)"
    )
    module.log("train/skipped_steps", float(skipped), reduce_fx="max")
    return False


class BufferSnapshot(Callback):
    """With `nonfinite_loss: skip`, keeps the floating-point buffers (BatchNorm running statistics)
    of each step's start, so that a skipped step leaves no trace: its forward pass in train mode
    has already folded the non-finite activations into them. A few KB to MB per step."""

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int
    ) -> None:
        if pl_module.hparams.get("nonfinite_loss") != "skip":
            return
        pl_module._buffer_snapshot = {
            n: b.detach().clone() for n, b in pl_module.named_buffers() if b.is_floating_point()
        }
