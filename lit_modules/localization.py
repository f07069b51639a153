"""BoxRegressor: OverFeat's localization, a classifier and a box regressor on one shared trunk.

The trunk is a pretrained classifier's conv stages (a TransferClassifier / digits-classifier
weights file, or torchvision weights by name); two FC heads read the same training-size window:
class logits over background + K classes and a box (class-agnostic, or one per class). The
loss is cross-entropy plus `box_loss_weight` times smooth-L1 (on the box offsets) or GIoU (on the
boxes), the box term on object windows only. Background windows (label 0) teach the classifier
a low object confidence off-digit, which the dense use of the net (lit_modules/overfeat.py)
needs; the plain localization task has none.

Evaluation is ILSVRC's localization criterion on single-object images: a prediction is right
when its class is right AND its box has IoU >= 0.5 with the truth (`val/loc_acc`,
`test/loc_acc`; the checkpoint is chosen on val), beside `mean_iou` (the predicted class's box
against the truth, whatever the class) and `acc` (the class alone).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import Metric

from datamodules.digits import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD
from lit_modules.callbacks import (
    check_choice,
    check_data_classes,
    check_labels,
    log_train_terms,
    make_optimizer,
)
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.nets.localization import (
    BOX_HEADS,
    build_localization_net,
    decode_boxes,
    select_boxes,
)
from lit_modules.nets.localization import box_loss as compute_box_loss
from lit_modules.visual import draw_detections, log_picture

BOX_LOSSES = ("smooth_l1", "giou")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "none")
NORMALIZE = ("digits", "imagenet")
Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


class Normalizer(nn.Module):
    """Images in [0, 1] -> the trunk's input: its channel count and its training normalisation."""

    def __init__(self, *, in_channels: int, normalize: str) -> None:
        super().__init__()
        check_choice("normalize", normalize, NORMALIZE)
        mean, std = (
            ((DIGITS_MEAN,), (DIGITS_STD,))
            if normalize == "digits"
            else (IMAGENET_MEAN, IMAGENET_STD)
        )
        reps = max(1, in_channels // len(mean))
        self.in_channels = in_channels
        self.register_buffer(
            "mean", torch.tensor(mean * reps)[:in_channels, None, None], persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std * reps)[:in_channels, None, None], persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-3] != self.in_channels:  # grey <-> RGB: the scenes are grey either way
            images = images.mean(-3, keepdim=True).expand(
                *images.shape[:-3], self.in_channels, *images.shape[-2:]
            )
        return (images - self.mean) / self.std  # (B, C, H, W)


class LocalizationScores(Metric):
    """loc_acc (class right and IoU >= 0.5), mean_iou and acc over object images; summed over ranks."""

    full_state_update = False

    def __init__(self, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        for name in ("located", "correct", "count"):
            self.add_state(name, torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        pred_boxes: torch.Tensor,
        pred_labels: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """(B, 4) xyxy and (B,) labels, predicted and true; images labelled background are skipped."""
        obj = labels > 0
        pred_boxes, pred_labels, boxes, labels = (
            pred_boxes[obj],
            pred_labels[obj],
            boxes[obj],
            labels[obj],
        )
        iou = box_iou_pairs(pred_boxes, boxes)  # (N,)
        right = pred_labels == labels
        self.located += (right & (iou >= self.iou_threshold)).sum()  # tensors: no host sync
        self.correct += right.sum()
        self.count += obj.sum()
        self.iou_sum += iou.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(1)
        return {
            "loc_acc": self.located / n,
            "mean_iou": (self.iou_sum / n).float(),
            "acc": self.correct / n,
        }


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of box a[i] with box b[i], (N, 4) xyxy each."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / union.clamp_min(1e-9)


class BoxRegressor(LightningModule):
    monitor = ("val/loc_acc", "max")  # what the best checkpoint tracks

    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        input_size: int = 40,
        num_classes: int = 11,
        pool: int = 2,
        hidden: int = 128,
        dropout: float = 0.3,
        box_head: Literal["agnostic", "per_class"] = "agnostic",
        box_loss: Literal["smooth_l1", "giou"] = "smooth_l1",
        box_loss_weight: float = 1.0,
        trainable_stages: int | None = None,
        normalize: Literal["digits", "imagenet"] = "digits",
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_steps: int = 0,
        num_sample_images: int = 16,
        channels_last: bool = False,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            backbone: `digits_cnn` or a torchvision classifier (vgg16, resnet50, ...): its conv
                stages are the shared trunk.
            weights: the trunk's weights: a TransferClassifier checkpoint / exported weights file
                (e.g. runs/weights/digits_classifier.pt), a torchvision name (DEFAULT), or null.
            input_size: the window side the heads read (the training images' size).
            num_classes: background + object classes (digits: 11; label 0 is background).
            pool: a max-pool of this size after the trunk: a coarser map, cheaper dense use.
            hidden: width of each head's hidden FC layer; dropout: in the class head.
            box_head: `agnostic` (one box) or `per_class` (one box per class; the predicted
                class's box is the prediction, the true class's box is trained).
            box_loss: `smooth_l1` (on the encoded offsets) or `giou` (on the boxes).
            trainable_stages: how many top trunk stages learn (null: all); the others stay frozen
                (no gradients, BatchNorm in eval mode).
            normalize: the trunk's input normalisation (images arrive in [0, 1]).
            warmup_steps: linear warm-up of the learning rate from lr / 100.
            num_sample_images: validation images drawn with their boxes each epoch (0: none).
            channels_last: NHWC weights and activations: oneDNN's CPU convolutions run faster in
                that layout (digits training step 1.36x measured, bf16-mixed, 2 threads).
            nonfinite_loss: a NaN / Inf loss `stop`s training or `skip`s the step (guard.py).
        """
        super().__init__()
        check_choice("box_head", box_head, BOX_HEADS)
        check_choice("box_loss", box_loss, BOX_LOSSES)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        if box_loss_weight < 0:
            raise ValueError(f"box_loss_weight must be >= 0, got {box_loss_weight}")
        self.save_hyperparameters()
        self.net = build_localization_net(
            backbone=backbone, weights=weights, input_size=input_size, num_classes=num_classes,
            pool=pool, hidden=hidden, dropout=dropout, box_head=box_head,
        )  # fmt: skip
        stages = [s for s in self.net.features if any(p.numel() for p in s.parameters())]
        n = len(stages)
        if trainable_stages is not None and not 0 <= trainable_stages <= n:
            raise ValueError(
                f"trainable_stages must be in 0..{n} for {backbone}, got {trainable_stages}"
            )
        self.frozen = stages[: n - (n if trainable_stages is None else trainable_stages)]
        for stage in self.frozen:
            stage.requires_grad_(False)
        self.train(self.training)  # frozen stages in eval mode now: Lightning's fit keeps modes
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.normalizer = Normalizer(in_channels=self.net.in_channels, normalize=normalize)
        self.val_scores, self.test_scores = LocalizationScores(), LocalizationScores()
        self._samples: tuple[torch.Tensor, dict, dict] | None = None

    def train(self, mode: bool = True) -> BoxRegressor:
        super().train(mode)
        for stage in self.frozen:
            stage.eval()  # FrozenBN: the pretrained statistics stay
        return self

    def setup(self, stage: str) -> None:
        check_data_classes(self)
        dm = self.trainer.datamodule if self._trainer is not None else None
        size = getattr(dm, "hparams", {}).get("canvas_size")
        if size is not None and size != self.hparams.input_size:
            raise ValueError(
                f"data.canvas_size {size} differs from model.input_size "
                f"{self.hparams.input_size}: the heads read windows of input_size px"
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.predicting:
            check_labels(batch[1]["labels"], self.hparams.num_classes)
        return batch

    # ------------------------------------------------------------------ steps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) images in [0, 1] -> class logits (B, K), box offsets (B, 4 or 4K)."""
        size = self.hparams.input_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"BoxRegressor reads (B, C, {size}, {size}) windows, got {tuple(images.shape)} "
                "(a larger image goes through the convolutionalized net: OverFeatDetector)"
            )
        if self.hparams.channels_last:  # same (B, C, S, S) shape, NHWC strides
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalizer(images))

    def predict_boxes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The predicted class (background allowed), its probability and its box (B, 4) xyxy."""
        logits, offsets = (t.float() for t in self(images))  # float32 boxes under bf16 too
        prob = logits.softmax(1)
        scores, labels = prob.max(1)
        boxes = decode_boxes(
            select_boxes(offsets, labels, self.net.per_class), self.hparams.input_size
        )
        return {"boxes": boxes, "labels": labels, "scores": scores}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        labels, boxes = targets["labels"], targets["boxes"]
        logits, offsets = self(images)
        loss_cls = F.cross_entropy(logits, labels)
        obj = labels > 0
        chosen = select_boxes(offsets[obj], labels[obj], self.net.per_class)  # (N, 4)
        hp = self.hparams
        loss_box = compute_box_loss(chosen, boxes[obj], size=hp.input_size, kind=hp.box_loss)
        terms = {"loss_cls": loss_cls, "loss_box": loss_box}
        if not finite_loss(self, terms, hp.nonfinite_loss):
            return None  # skipped: no backward, no optimizer step
        loss = loss_cls + hp.box_loss_weight * loss_box
        log_train_terms(self, {**terms, "loss": loss}, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: Batch, scores: LocalizationScores) -> dict[str, torch.Tensor]:
        images, targets = batch
        pred = self.predict_boxes(images)
        scores.update(pred["boxes"], pred["labels"], targets["boxes"], targets["labels"])
        return pred

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        pred = self._evaluate(batch, self.val_scores)
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            self._samples = (
                batch[0][:k],
                {n: v[:k] for n, v in pred.items()},
                {n: v[:k] for n, v in batch[1].items()},
            )

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_scores)

    def _log_scores(self, stage: str, scores: LocalizationScores) -> None:
        for name, value in scores.compute().items():  # already synced across ranks
            self.log(f"{stage}/{name}", value.float(), prog_bar=name == "loc_acc")
        scores.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_scores)
        if self._samples is not None:
            images, pred, truth = self._samples
            self._samples = None
            names = {d + 1: str(d) for d in range(self.hparams.num_classes - 1)}
            names[0] = "bg"
            preds = [{n: v[i : i + 1] for n, v in pred.items()} for i in range(len(images))]
            targets = [{"boxes": truth["boxes"][i : i + 1]} for i in range(len(images))]
            picture = draw_detections(
                list(images), preds, targets, names=names, threshold=0.0, side=96
            )
            log_picture(
                self, "val/boxes", picture, caption="predicted class and box (truth in green)"
            )

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.test_scores)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return {k: v.cpu() for k, v in self.predict_boxes(images).items()}

    def format_predictions(self, outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
        """Rows of predictions.json, loader order: class (0: background), score, box xyxy."""
        cat = {k: torch.cat([o[k] for o in outputs]) for k in ("labels", "scores", "boxes")}
        return [
            {
                "index": i,
                "label": int(c),
                "score": round(float(s), 5),
                "box": [round(v, 2) for v in b],
            }
            for i, (c, s, b) in enumerate(
                zip(cat["labels"], cat["scores"], cat["boxes"].tolist(), strict=True)
            )
        ]

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = make_optimizer(params, hp)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            f = 1.0
            if hp.scheduler == "cosine":
                f = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            if step < warmup:
                f *= 0.01 + 0.99 * step / warmup
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
