"""FCNModule: semantic segmentation with FCN-32s / 16s / 8s (Long, Shelhamer, Darrell 2015).

Pixelwise cross-entropy (255 ignored) on the scores of a fully convolutional net. Evaluation
accumulates one confusion matrix per stage (torchmetrics, summed over DDP ranks) and logs the
paper's four scores from it: `*/pixel_acc`, `*/mean_acc`, `*/miou`, `*/fwiou`.
`trainable: score` is FCN-32s-fixed (only the last layer learns); `init_from` starts a finer net
from a coarser one's checkpoint (staged training: 32s -> 16s -> 8s).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import draw_segmentation_masks

from lit_modules.callbacks import (
    check_choice,
    check_labels,
    log_train_terms,
    make_optimizer,
    one_cycle,
)
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.metrics import fcn_scores
from lit_modules.nets.fcn import ARCHS, FCN, build_fcn
from lit_modules.visual import class_legend, log_picture, run_dir, segmentation_grid, to_uint8

IGNORE = 255
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "poly", "onecycle", "none")
TRAINABLE = ("all", "score")


def overlay(
    images: torch.Tensor, labels: torch.Tensor, palette: list[tuple[int, int, int]]
) -> torch.Tensor:
    """(B, C, H, W) images + (B, H, W) class maps -> (B, 3, H, W) uint8, classes >= 1 coloured.

    Background (0) and ignored pixels (255) are left as they are: the image shows through.
    """
    pictures = to_uint8(images)  # (B, 3, H, W)
    classes = torch.arange(1, len(palette), device=labels.device)  # (K-1,)
    out = []
    for img, lab in zip(pictures, labels.cpu(), strict=True):
        masks = lab[None] == classes[:, None, None].cpu()  # (K-1, H, W) bool
        out.append(draw_segmentation_masks(img, masks, alpha=0.6, colors=palette[1:]))
    return torch.stack(out)


class FCNModule(LightningModule):
    monitor = ("val/miou", "max")  # what the best checkpoint tracks

    def __init__(
        self,
        arch: str = "digits",
        variant: Literal["32s", "16s", "8s"] | None = "8s",
        num_classes: int = 11,
        in_channels: int = 1,
        weights: str | None = None,
        init_from: str | None = None,
        trainable: Literal["all", "score"] = "all",
        learn_final_upsampling: bool = True,
        skip_scales: tuple[float, float] = (1.0, 1.0),
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "poly", "onecycle", "none"] = "cosine",
        warmup_pct: float = 0.3,
        channels_last: bool = False,
        loss_reduction: Literal["mean", "sum"] = "mean",
        num_sample_images: int = 6,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            nonfinite_loss: a NaN / Inf loss `stop`s training (naming the step and the term)
                or `skip`s the step, counted in train/skipped_steps (lit_modules/guard.py).
            arch: `digits` (small trunk), `vgg16` (the paper's), `resnet18/34/50`, or torchvision's
                own `fcn_resnet50` / `deeplabv3_resnet50` (then variant: null).
            variant: 32s, 16s or 8s: how many skips (pool4, pool3) join the stride-32 scores.
            weights: trunk weights: a torchvision name (`IMAGENET1K_V1`), a file, or null.
            init_from: a coarser FCN's checkpoint (staged training: 16s from 32s, 8s from 16s).
            trainable: `all`, or `score`: trunk and fc layers fixed, only the score layers learn
                (FCN-32s-fixed).
            learn_final_upsampling: the paper keeps the last upsampling fixed bilinear (false).
            skip_scales: (pool4, pool3) multipliers before the skips' score layers (at-once
                training; the authors use (0.01, 0.0001) for VGG16).
            scheduler: per step over the whole fit; `onecycle` (Smith & Topin) warms up to `lr`
                over the first `warmup_pct` of the steps, then anneals to ~0: it converges in far
                fewer steps than a cosine from `lr` (the CPU demo's choice).
            warmup_pct: the share of the steps `onecycle` spends warming up.
            channels_last: NHWC activations and weights: oneDNN's convolutions (bf16-mixed ones
                most) run faster in that layout on CPUs (digits FCN-8s step: 1.2-1.4x measured).
            loss_reduction: `sum` is the paper's unnormalised loss (with a tiny lr, batch 1).
            num_sample_images: validation scenes drawn as overlays each epoch (0: none).
        """
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        check_choice("trainable", trainable, TRAINABLE)
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        if not 0.0 < warmup_pct < 1.0:
            raise ValueError(f"warmup_pct must be in (0, 1), got {warmup_pct}")
        self.save_hyperparameters()
        self.net = build_fcn(
            arch=arch,
            variant=variant,
            num_classes=num_classes,
            in_channels=in_channels,
            weights=weights,
            init_from=init_from,
            learn_final_upsampling=learn_final_upsampling,
            skip_scales=skip_scales,
        )
        if trainable == "score":
            if not isinstance(self.net, FCN):
                raise ValueError(f"trainable: score needs an FCN arch, not {arch}")
            self.net.freeze_features()
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, reduction=loss_reduction)
        cm = lambda: MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)  # noqa: E731
        self.val_cm, self.test_cm = cm(), cm()
        # Loss per labelled pixel, synced as (sum, count): the same on any number of ranks.
        self.val_loss, self.test_loss = (MeanMetric().set_dtype(torch.float64) for _ in "vt")
        self._samples: tuple[torch.Tensor, ...] | None = None
        self._predict_dir = None

    # ------------------------------------------------------------------ checks

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        data_classes = getattr(dm, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes (largest label {data_classes - 1}) but "
                f"model.num_classes is {self.hparams.num_classes}: "
                f"set --model.init_args.num_classes {data_classes}"
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # on CPU, every batch: a data set without num_classes escapes `setup`'s check
        if not self.trainer.predicting:
            check_labels(batch[1], self.hparams.num_classes, ignore_index=IGNORE)
        return batch

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.hparams.in_channels:
            raise ValueError(
                f"{self.hparams.arch} expects (B, {self.hparams.in_channels}, H, W) images, got "
                f"{tuple(x.shape)} (for digits set data.channels: {self.hparams.in_channels})"
            )

    def _palette(self) -> list[tuple[int, int, int]]:
        from datamodules.segmentation import voc_palette

        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "palette", None) or voc_palette(self.hparams.num_classes)

    def _class_names(self) -> list[str]:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "class_names", None) or [str(c) for c in range(self.hparams.num_classes)]

    # ------------------------------------------------------------------ steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:  # same (B, C, H, W) shape, NHWC strides
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)  # (B, K, H, W) scores

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch  # (B, C, H, W), (B, H, W) int64
        if batch_idx == 0:
            self._check_input(x)
        loss = self.criterion(self(x), y)
        if not finite_loss(self, {"loss": loss}, self.hparams.nonfinite_loss):
            return None  # skipped: no backward, no optimizer step
        log_train_terms(self, {"loss": loss})
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], cm: Any, stage: str) -> Any:
        x, y = batch
        scores = self(x)  # (B, K, H, W)
        pred = scores.argmax(1)  # (B, H, W)
        cm.update(pred, y)
        labelled = (y != IGNORE).sum()
        if labelled > 0:
            loss = F.cross_entropy(scores, y, ignore_index=IGNORE, reduction="sum") / labelled
            getattr(self, f"{stage}_loss").update(loss.double(), weight=labelled)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        return pred

    def _log_scores(self, cm: MulticlassConfusionMatrix, stage: str) -> None:
        confusion = cm.compute()  # (K, K), summed over every rank: identical on all ranks
        cm.reset()
        if confusion.sum() == 0:
            return
        scores = fcn_scores(confusion)
        self.log_dict({f"{stage}/{k}": v.float() for k, v in scores.items()}, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self._check_input(batch[0])
        pred = self._evaluate(batch, self.val_cm, "val")
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            self._samples = (batch[0][:k], pred[:k], batch[1][:k])

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_cm, "val")
        if self._samples is None:
            return
        x, pred, y = self._samples
        self._samples = None
        palette = self._palette()
        truth, guess = overlay(x, y, palette), overlay(x, pred, palette)  # (k, 3, H, W) each
        legend = class_legend([*y, *pred], self._class_names(), palette)
        grid = segmentation_grid({"ground truth": truth, "prediction": guess}, legend)
        log_picture(self, "val/overlays", grid, caption="top: ground truth, bottom: prediction")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_cm, "test")

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_cm, "test")

    # ------------------------------------------------------------------ predict

    def on_predict_start(self) -> None:
        folder = run_dir(self) / "predictions"  # every rank: run_dir is a collective under DDP
        folder.mkdir(parents=True, exist_ok=True)
        self._predict_dir = folder

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Predicted class maps; each one also written as an overlay PNG beside the image."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        pred = self(x).argmax(1)  # (B, H, W)
        pictures = torch.cat([to_uint8(x), overlay(x, pred, self._palette())], dim=-1)
        rank = f"rank{self.global_rank}_" if self.trainer.world_size > 1 else ""
        files = []
        for i, picture in enumerate(pictures):  # (3, H, 2W): image | overlay
            path = self._predict_dir / f"{rank}batch{batch_idx:05d}_{i:03d}.png"
            torchvision.io.write_png(picture, str(path))
            files.append(str(path.relative_to(self._predict_dir.parent)))
        return {"files": files, "classes": [sorted(set(p.unique().tolist()) - {0}) for p in pred]}

    def format_predictions(self, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of predictions.json: the overlay file and the classes found, per image."""
        rows = [(f, c) for o in outputs for f, c in zip(o["files"], o["classes"], strict=True)]
        return [{"index": i, "overlay": f, "classes": c} for i, (f, c) in enumerate(rows)]

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = make_optimizer((p for p in self.net.parameters() if p.requires_grad), hp)
        if hp.scheduler == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "poly":  # DeepLab's (1 - step/total)^0.9
            sched: Any = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=0.9)
        elif hp.scheduler == "onecycle":  # momentum (Adam's beta1) cycles too, 0.95 -> 0.85
            sched = one_cycle(opt, hp.lr, total, hp.warmup_pct)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
