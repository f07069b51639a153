"""FasterRCNNModule: region proposals inside the network (RPN + RoI heads), torchvision's parts.

Training logs every loss term (`train/loss_classifier`, `train/loss_box_reg`,
`train/loss_objectness`, `train/loss_rpn_box_reg`) and their sum `train/loss`. Validation and
test report COCO-style box mAP from torchmetrics' `MeanAveragePrecision` with the
`faster_coco_eval` backend (`val/map`, `val/map_50`, `val/map_75`, ...; `test/map*`; `map_50` is
COCO's 101-point AP at IoU 0.5; the size buckets use the annotation's `area` when the target
has one), beside `val/voc07_map_50` / `test/voc07_map_50`: PASCAL VOC 2007 11-point AP at IoU 0.5
as the VOC devkit computes it, the metric of the R-CNN papers' tables. `test/images_per_s` is
the detector's forward on this device, data loading excluded. Crowd / VOC-difficult boxes are
ignored by both mAPs and never trained on. `predict` returns COCO results
rows, written to `predictions.json` by the PredictionsJSON callback, and draws the predictions.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule

from lit_modules.callbacks import (
    check_choice,
    check_data_classes,
    check_labels,
    log_train_terms,
    make_optimizer,
)
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.metrics import ShardedMeanAveragePrecision, VOC07MeanAveragePrecision
from lit_modules.nets.detectors import ARCHS, build_faster_rcnn
from lit_modules.visual import TILE_SIDE, draw_detections, log_picture

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("multistep", "cosine", "none")
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


# COCOeval's own thresholds, in float64. torchmetrics' defaults come from torch.linspace in
# float32 (0.2 -> 0.2000000030): a recall of exactly k/100 then falls on the other side of its
# threshold and the mAP drifts from pycocotools' by up to ~5e-4 (measured on 30 digit scenes).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
REC_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()


def _new_map() -> ShardedMeanAveragePrecision:
    return ShardedMeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="faster_coco_eval",
        iou_thresholds=IOU_THRESHOLDS,
        rec_thresholds=REC_THRESHOLDS,
    )


def _metric_targets(targets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """What both mAPs read; `area` (COCO's annotation area) sets the COCO size buckets if present."""
    return [
        {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "iscrowd": t["iscrowd"].long(),
            **({"area": t["area"].float()} if "area" in t else {}),
        }
        for t in targets
    ]


def to_coco_rows(pred: dict[str, torch.Tensor], image_id: int) -> list[dict[str, Any]]:
    """COCO results rows of one image's detections: bbox as [x, y, w, h]."""
    boxes = pred["boxes"].detach().float().cpu()  # (N, 4) xyxy
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(c),
            "bbox": [round(v, 3) for v in b],
            "score": round(float(s), 5),
        }
        for b, c, s in zip(
            xywh.tolist(), pred["labels"].tolist(), pred["scores"].tolist(), strict=True
        )
    ]


class DetectionScoring:
    """Evaluation shared by the detectors (Faster R-CNN, OverFeat, the R-CNN lineage): COCO box
    mAP and VOC07 11-point AP on val and test, the test forward timed (`test/images_per_s`),
    a picture of the first batch, COCO results rows on predict.

    A LightningModule mixes it in before LightningModule, calls `_init_scoring()` in __init__
    and provides `forward(images) -> [{boxes, labels, scores}]`, `draw(images, preds, targets)`
    and `hparams.num_sample_images`; `_extra_seconds(targets)` adds work done outside forward
    (external proposals) to the timed test forward. A CPU run's batches stay as they come.
    """

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # a DataLoader's batch is on the CPU already: Lightning's move would walk every tensor of
        # the images list and the target dicts for nothing (~0.1 ms of a 25 ms Fast R-CNN step)
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]

    def _init_scoring(self) -> None:
        self.val_map, self.test_map = _new_map(), _new_map()
        self.val_voc07, self.test_voc07 = VOC07MeanAveragePrecision(), VOC07MeanAveragePrecision()
        self._samples: tuple[list[torch.Tensor], list[dict], list[dict]] | None = None
        self._test_seconds, self._test_images = 0.0, 0

    def _caption(self) -> str:
        return f"detections with score >= {self.hparams.draw_score_threshold} (truth in green)"

    def _keep_samples(self, batch_idx: int, images: list, preds: list, targets: list) -> None:
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            self._samples = (images[:k], preds[:k], targets[:k])

    def _log_samples(self, key: str) -> None:
        if self._samples is not None:
            images, preds, targets = self._samples
            self._samples = None
            log_picture(self, key, self.draw(images, preds, targets), caption=self._caption())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        preds = self(images)
        self.val_map.update(preds, _metric_targets(targets))
        self.val_voc07.update(preds, _metric_targets(targets))
        self._keep_samples(batch_idx, images, preds, targets)

    def _log_map(
        self, coco: ShardedMeanAveragePrecision, voc07: VOC07MeanAveragePrecision, stage: str
    ) -> None:
        values = coco.compute()  # already synced across ranks
        coco.reset()
        for k in MAP_KEYS:
            self.log(f"{stage}/{k}", values[k].float(), prog_bar=k == "map")
        self.log(f"{stage}/voc07_map_50", voc07.compute().float())  # synced too
        voc07.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, self.val_voc07, "val")
        self._log_samples("val/detections")

    def on_test_epoch_start(self) -> None:
        self._test_seconds, self._test_images = 0.0, 0

    def _extra_seconds(self, targets: list[dict[str, Any]]) -> float:
        return 0.0

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        self._sync()
        t0 = time.perf_counter()
        preds = self(images)
        self._sync()
        self._test_seconds += time.perf_counter() - t0 + self._extra_seconds(targets)
        self._test_images += len(images)
        self.test_map.update(preds, _metric_targets(targets))
        self.test_voc07.update(preds, _metric_targets(targets))
        self._keep_samples(batch_idx, images, preds, targets)

    def on_test_epoch_end(self) -> None:
        t0 = time.perf_counter()
        self._log_map(self.test_map, self.test_voc07, "test")
        self.log("test/map_seconds", time.perf_counter() - t0)  # the COCO + VOC07 evaluation
        speed = self._test_images / max(self._test_seconds, 1e-9)
        self.log("test/images_per_s", speed, sync_dist=True)  # per device, mean over devices
        self._log_samples("test/detections")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, list[dict[str, Any]]]:
        images, targets = batch[0], batch[1] if len(batch) > 1 else None
        preds = self(images)
        ids = [t["image_id"] for t in targets] if targets else list(range(len(images)))
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0:
            picture = self.draw(images[:k], preds[:k], targets[:k] if targets else None)
            log_picture(self, "predict/detections", picture, caption=self._caption())
        # a dict, not a list: a list per batch would read as one list per predict loader
        return {
            "rows": [row for p, i in zip(preds, ids, strict=True) for row in to_coco_rows(p, i)]
        }

    def format_predictions(self, outputs: list[dict[str, list[dict]]]) -> list[dict[str, Any]]:
        """COCO results rows (image_id, category_id, bbox xywh, score), loader order."""
        return [row for out in outputs for row in out["rows"]]


class FasterRCNNModule(DetectionScoring, LightningModule):
    monitor = ("val/map", "max")  # what the best checkpoint tracks

    def __init__(
        self,
        arch: str = "resnet18_fpn",
        num_classes: int = 91,
        weights: str | None = None,
        weights_backbone: str | None = None,
        backbone: str = "digits_cnn",
        trainable_backbone_layers: int | None = None,
        returned_stages: list[int] | None = None,
        fpn_channels: int = 64,
        representation_size: int = 256,
        anchor_sizes: list[list[int]] | None = None,
        aspect_ratios: list[float] | None = None,
        roi_sampling_ratio: int = 2,
        min_size: int = 800,
        max_size: int = 1333,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        box_detections_per_img: int = 100,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: Literal["multistep", "cosine", "none"] = "multistep",
        milestones: list[int] | None = None,
        warmup_steps: int = 1000,
        num_sample_images: int = 8,
        draw_score_threshold: float = 0.5,
        channels_last: bool = False,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            nonfinite_loss: a NaN / Inf loss `stop`s training (naming the step and the term)
                or `skip`s the step, counted in train/skipped_steps (lit_modules/guard.py).
            arch: resnet50_fpn, resnet50_fpn_v2, mobilenet_v3_large_fpn (torchvision's), resnet18_fpn
                (slim, CPU) or transfer (a cnnlab classifier's conv stages as backbone).
            num_classes: object classes + 1 (background): VOC 21, COCO 91, digits 11.
            weights: the whole detector: COCO weights name (DEFAULT, COCO_V1), a file, or null.
            weights_backbone: ImageNet weights of the body (name or file); for arch transfer the
                `backbone` classifier's checkpoint (e.g. runs/weights/digits_source.pt).
            trainable_backbone_layers: how many top backbone stages learn (null: torchvision's
                default for its archs, all for the others).
            anchor_sizes: one list of sizes per feature level; aspect_ratios (h / w) for every level.
            roi_sampling_ratio: RoIAlign samples per bin side (resnet18_fpn / transfer); 1 is
                ~4x cheaper on a CPU, where RoIAlign's backward dominated a digits step.
            min_size, max_size: GeneralizedRCNNTransform's resize (shorter side, cap on the longer).
            rpn_batch_size_per_image, box_batch_size_per_image: anchors / RoIs sampled per image
                for the RPN and box-head losses.
            milestones: multistep only: epochs after which lr drops 10x (torchvision: 16, 22 of 26).
            warmup_steps: linear warm-up from lr / 1000 (torchvision's recipe).
            num_sample_images: validation images drawn with their detections each epoch (0: none).
            channels_last: NHWC weights, hence NHWC feature maps from the first convolution on:
                oneDNN's CPU convolutions run faster in that layout (digits Faster R-CNN training
                step 1.13-1.19x measured, float32, 2 threads).
        """
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        self.save_hyperparameters()
        self.net = build_faster_rcnn(
            arch=arch,
            num_classes=num_classes,
            weights=weights,
            weights_backbone=weights_backbone,
            backbone=backbone,
            trainable_backbone_layers=trainable_backbone_layers,
            returned_stages=returned_stages,
            fpn_channels=fpn_channels,
            representation_size=representation_size,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            roi_sampling_ratio=roi_sampling_ratio,
            min_size=min_size,
            max_size=max_size,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_batch_size_per_image=box_batch_size_per_image,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_detections_per_img=box_detections_per_img,
        )
        if channels_last:  # the images are batched NCHW by the net's transform; the layout
            self.net.to(memory_format=torch.channels_last)  # follows the weights from there
        self._init_scoring()
        self._step_start, self._train_seconds, self._train_steps = 0.0, 0.0, 0

    def setup(self, stage: str) -> None:
        check_data_classes(self)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # on CPU, every batch: a data set without num_classes escapes `setup`'s check
        if not self.trainer.predicting:
            labels = [t["labels"] for t in batch[1]]
            check_labels(torch.cat(labels) if labels else torch.empty(0), self.hparams.num_classes)
        return batch

    # ------------------------------------------------------------------ steps

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if self.training:
            return self.net(images)
        # Inference in float32 even under bf16-mixed: bf16 keeps 8 bits of mantissa, so decoded
        # boxes would snap to 0.5 px at 96 px (4 px at 800 px) and cost mAP at high IoU.
        with torch.autocast(self.device.type, enabled=False):
            return self.net(images)  # [{boxes (N, 4) xyxy, labels (N,), scores (N,)}] per image

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        # crowd / difficult boxes are not trained on (torchvision's references drop them too)
        train_targets = [
            {"boxes": t["boxes"][~t["iscrowd"]], "labels": t["labels"][~t["iscrowd"]]}
            for t in targets
        ]
        losses = self.net(images, train_targets)
        loss = sum(losses.values())
        if not finite_loss(self, losses, self.hparams.nonfinite_loss):
            return None  # skipped: no backward, no optimizer step
        log_train_terms(self, {**losses, "loss": loss}, batch_size=len(images))
        return loss

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        # forward + backward + optimizer step, data loading excluded: the cost of one step
        self._train_seconds += time.perf_counter() - self._step_start
        self._train_steps += 1
        log_train_terms(self, {"seconds_per_step": self._train_seconds / self._train_steps})

    # ------------------------------------------------------------------ pictures

    def _names(self) -> dict[int, str]:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "category_names", None) or {}

    @torch.no_grad()
    def draw(
        self,
        images: list[torch.Tensor],
        preds: list[dict[str, torch.Tensor]],
        targets: list[dict[str, Any]] | None = None,
        side: int = TILE_SIDE,
    ) -> torch.Tensor:
        """A grid of images with ground truth (green) and detections (labelled, red): (3, H, W) uint8."""
        return draw_detections(
            images,
            preds,
            targets,
            names=self._names(),
            threshold=self.hparams.draw_score_threshold,
            side=side,
        )

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = make_optimizer(params, hp)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(
            1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        )
        warmup = min(hp.warmup_steps, total)
        drops = [m * per_epoch for m in (hp.milestones or [])]

        def factor(step: int) -> float:
            f = 1.0
            if hp.scheduler == "multistep":
                f = 0.1 ** sum(step >= d for d in drops)
            elif hp.scheduler == "cosine":
                f = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            if step < warmup:  # linear warm-up from lr / 1000, as torchvision's references
                f *= 1e-3 + (1 - 1e-3) * step / warmup
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
