"""R-CNN, SPP-net and Fast R-CNN on external proposals (selective search, sliding windows, ...).

The batch is the detection topic's, each target carrying its image's `proposals` (N, 4) xyxy and
`proposal_s` (seconds they cost). Both modules fine-tune a classifier's weights (the digits
classifier of runs/weights/digits_source.pt, or VGG16 on VOC) on proposals labelled by IoU:
>= fg_iou with a gt -> its class, else background; 25% foreground per mini-batch; the gt boxes
join the training proposals; class-specific box regression; per-class NMS at test.

- `RCNNModule` (Girshick et al. 2014): every proposal context-padded, warped to the classifier's
  input size and run through the whole net; `classifier: svm` adds R-CNN's per-class linear
  SVMs on the fine-tuned features, trained by hinge loss with hard negatives in a final phase.
- `FastRCNNModule` (Girshick 2015; He et al. 2014 for `pooling: spp`): the conv trunk once per
  image, each RoI pooled from the shared map (roi_pool | roi_align | SPP-net's pyramid), FC heads,
  multi-task loss.

Scoring is the detection topic's (`DetectionScoring`): test/map, test/map_50, test/voc07_map_50,
... and `test/images_per_s` counting the proposals' time, beside `test/images_per_s_net` (the
net alone, as the papers' per-image test times).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import normalize

from lit_modules.callbacks import (
    check_choice,
    check_data_classes,
    check_labels,
    log_train_terms,
    make_optimizer,
)
from lit_modules.detection import OPTIMIZERS, DetectionScoring
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.nets.rcnn import (
    BOX_CODER,
    CLASSIFIERS,
    POOLINGS,
    BoxHead,
    build_pooler,
    build_trunk,
    detection_loss,
    empty_detections,
    fc_out_features,
    freeze_conv,
    image_stats,
    match_proposals,
    postprocess,
    sample_rois,
    svm_hinge_loss,
    truncated_svd,
    trunk_channels,
    trunk_stride,
    warp_crops,
)
from lit_modules.visual import draw_detections

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
SCHEDULERS = ("cosine", "multistep", "none")


class _ProposalDetector(DetectionScoring, LightningModule):
    """What R-CNN and Fast R-CNN share: proposals from the targets, RoI sampling, the loss step,
    test timing with and without proposals, optimiser. Subclasses set `self.head`, `self.mean`,
    `self.std` and implement `_roi_outputs(images, rois, train)` -> (feats, logits, deltas)."""

    monitor = ("val/map", "max")

    def _init_common(self) -> None:
        self._init_scoring()
        self._proposals: list[torch.Tensor] | None = None
        self._proposal_seconds = 0.0

    # ------------------------------------------------------------------ data checks

    def setup(self, stage: str) -> None:
        check_data_classes(self)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.predicting:
            labels = [t["labels"] for t in batch[1]]
            check_labels(torch.cat(labels) if labels else torch.empty(0), self.hparams.num_classes)
        return batch

    # ------------------------------------------------------------------ proposals

    # DetectionScoring's val / test / predict steps call `self(images)`; the proposals ride in
    # the targets, so each batch's are set aside here and `forward` reads them.
    def _stash(self, batch: Batch) -> None:
        targets = batch[1] if len(batch) > 1 else None
        if not targets or "proposals" not in targets[0]:
            raise ValueError(
                "R-CNN / Fast R-CNN need targets[i]['proposals'] (ProposalDetectionDataModule)"
            )
        self._proposals = [t["proposals"] for t in targets]

    def on_validation_batch_start(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._stash(batch)

    def on_test_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stash(batch)

    def on_predict_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stash(batch)

    def _test_proposals(self, proposals: torch.Tensor) -> torch.Tensor:
        cap = self.hparams.test_max_proposals
        return proposals[:cap] if cap is not None else proposals  # in the proposer's rank order

    def _extra_seconds(self, targets: list[dict[str, Any]]) -> float:
        s = sum(float(t.get("proposal_s", 0.0)) for t in targets)
        self._proposal_seconds += s
        return s

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._proposal_seconds = 0.0

    def on_test_epoch_end(self) -> None:
        net_seconds = self._test_seconds - self._proposal_seconds
        images = self._test_images
        super().on_test_epoch_end()
        self.log("test/images_per_s_net", images / max(net_seconds, 1e-9), sync_dist=True)
        self.log(
            "test/proposal_s_per_image", self._proposal_seconds / max(images, 1), sync_dist=True
        )

    # ------------------------------------------------------------------ inference

    def _normalise(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [normalize(img, self.mean, self.std) for img in images]  # (3, H, W) each

    def _scores(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)  # (N, K+1)

    @torch.no_grad()
    def forward(
        self, images: list[torch.Tensor], proposals: list[torch.Tensor] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """[{boxes (D, 4) xyxy, labels (D,), scores (D,)}] per (3, H, W) image in [0, 1];
        `proposals` [(N_i, 4)] default to the current batch's (set aside by the batch hooks)."""
        proposals = proposals if proposals is not None else self._proposals
        if proposals is None or len(proposals) != len(images):
            raise ValueError("forward needs one (N, 4) proposal tensor per image")
        rois = [self._test_proposals(p.float()) for p in proposals]
        hp = self.hparams
        with torch.autocast(self.device.type, enabled=False):
            feats, logits, deltas = self._roi_outputs(self._normalise(images), rois, train=False)
            scores = self._scores(feats, logits)
        out, start = [], 0
        for img, r in zip(images, rois, strict=True):
            n = len(r)
            if n == 0:
                out.append(empty_detections(img.device))
                continue
            sl = slice(start, start + n)
            start += n
            out.append(
                postprocess(
                    scores[sl],
                    deltas[sl],
                    r,
                    tuple(img.shape[-2:]),
                    score_threshold=hp.score_threshold,
                    nms_iou=hp.nms_iou,
                    max_detections=hp.max_detections,
                )  # fmt: skip
            )
        return out

    # ------------------------------------------------------------------ training

    def _sample(
        self, targets: list[dict[str, Any]]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per image `rois_per_image` RoIs (proposals + gt boxes): ([(R_i, 4)], labels (R,),
        regression targets (R, 4))."""
        hp = self.hparams
        rois, labels, reg = [], [], []
        for t in targets:
            keep = ~t["iscrowd"].bool() if "iscrowd" in t else slice(None)
            gt, gl = t["boxes"][keep].float(), t["labels"][keep]
            props = torch.cat([t["proposals"].float().to(gt.device), gt])  # (N + G, 4)
            iou, lab, box = match_proposals(props, gt, gl)
            fg, bg = sample_rois(
                iou, num=hp.rois_per_image, fg_fraction=hp.fg_fraction, fg_iou=hp.fg_iou,
                bg_iou_low=hp.bg_iou_low,
            )  # fmt: skip
            idx = torch.cat([fg, bg])
            lab = lab[idx].clone()
            lab[len(fg) :] = 0
            rois.append(props[idx])
            labels.append(lab)
            reg.append(BOX_CODER.encode_single(box[idx], props[idx]))
        return rois, torch.cat(labels), torch.cat(reg)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        rois, labels, reg = self._sample(targets)
        if sum(len(r) for r in rois) == 0:
            return None  # nothing to learn from (no proposals, no gt)
        _, logits, deltas = self._roi_outputs(self._normalise(images), rois, train=True)
        losses = detection_loss(logits, deltas, labels, reg)
        return self._log_losses(losses, len(images))

    def _log_losses(self, losses: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
        loss = sum(losses.values())
        if not finite_loss(self, losses, self.hparams.nonfinite_loss):
            return None
        log_train_terms(self, {**losses, "loss": loss}, batch_size=n)
        return loss

    # ------------------------------------------------------------------ optimisation

    def _param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def _lr_factors(self, total: int) -> list[Any]:
        hp = self.hparams
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            f = 1.0
            if hp.scheduler == "cosine":
                f = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            elif hp.scheduler == "multistep":  # the papers' recipe: lr x0.1 after each milestone
                f = 0.1 ** sum(step >= m for m in hp.milestones or [])
            if step < warmup:  # linear warm-up from lr / 1000
                f *= 1e-3 + (1 - 1e-3) * step / warmup
            return f

        return [factor]

    def _total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self._param_groups()
        opt = make_optimizer(groups, hp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factors(self._total_steps()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ pictures

    def draw(
        self,
        images: list[torch.Tensor],
        preds: list[dict[str, torch.Tensor]],
        targets: list[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """A grid of scenes with ground truth (green) and detections (red): (3, H, W) uint8."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(dm, "category_names", None) or {}
        return draw_detections(
            images, preds, targets, names=names, threshold=self.hparams.draw_score_threshold
        )


class RCNNModule(_ProposalDetector):
    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        num_classes: int = 11,
        warp_size: int = 28,
        context: float = 16 / 227,
        classifier: Literal["softmax", "svm"] = "softmax",
        trainable_conv_stages: int | None = None,
        rois_per_image: int = 64,
        fg_fraction: float = 0.25,
        fg_iou: float = 0.5,
        bg_iou_low: float = 0.0,
        test_max_proposals: int | None = 500,
        crop_chunk: int = 1024,
        score_threshold: float = 0.05,
        nms_iou: float = 0.3,
        max_detections: int = 100,
        svm_steps: int = 0,
        svm_lr: float = 0.01,
        svm_weight_decay: float = 1e-4,
        svm_neg_iou: float = 0.3,
        svm_hard_negatives: int = 32,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: Literal["cosine", "multistep", "none"] = "cosine",
        milestones: list[int] | None = None,
        warmup_steps: int = 0,
        num_sample_images: int = 8,
        draw_score_threshold: float = 0.5,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            backbone, weights: the classifier fine-tuned on warped proposals (digits_cnn with
                runs/weights/digits_source.pt; vgg16 with DEFAULT or a file); null: random.
            num_classes: object classes + 1 (background): digits 11, VOC 21.
            warp_size: side of the warped crops (the classifier's input: 28 digits, 224 VGG; not
                `crop_size`, the data module's augmentation crop, which the CLI would merge).
            context: share of each crop side left for context around the box (16 / 227 in R-CNN).
            classifier: `softmax` (the fine-tuned K + 1 way layer scores) or `svm` (per-class
                linear SVMs on the fine-tuned features, the last `svm_steps` steps; CNN frozen).
            trainable_conv_stages: top conv stages fine-tuned (null: all).
            rois_per_image: RoIs per image per step (the paper: 128 per mini-batch: 2 x 64 here).
            fg_fraction, fg_iou, bg_iou_low: 25% RoIs with IoU >= 0.5, background below.
            test_max_proposals: the first proposals per image run at test (null: all): R-CNN pays a
                CNN pass per proposal.
            crop_chunk: crops per forward at test (bounds memory).
            score_threshold, nms_iou, max_detections: per-class NMS of the class-specific boxes.
            svm_lr, svm_weight_decay: SGD on the SVMs' hinge loss (weight decay = the L2 term).
            svm_neg_iou, svm_hard_negatives: negatives under this IoU with the class's gts; per
                step and class, this many highest-scoring margin violators count.
        """
        super().__init__()
        check_choice("classifier", classifier, CLASSIFIERS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        if classifier == "svm" and svm_steps < 1:
            raise ValueError("classifier svm needs svm_steps >= 1 (the SVM phase's steps)")
        self.save_hyperparameters()
        self.conv, fc = build_trunk(backbone=backbone, weights=weights)
        freeze_conv(self.conv, trainable_conv_stages)
        d = fc_out_features(fc, self._conv_shape())
        self.head = BoxHead(fc, in_features=d, num_classes=num_classes, svm=classifier == "svm")
        self.mean, self.std = image_stats(backbone)
        self._init_common()

    def _conv_shape(self) -> tuple[int, ...]:
        was = self.conv.training
        self.conv.eval()
        with torch.no_grad():
            shape = self.conv(
                torch.zeros(1, 3, self.hparams.warp_size, self.hparams.warp_size)
            ).shape
        self.conv.train(was)
        return tuple(shape[1:])

    def _svm_phase(self) -> bool:
        hp = self.hparams
        return hp.classifier == "svm" and self.global_step >= self._total_steps() - hp.svm_steps

    def _roi_outputs(
        self, images: list[torch.Tensor], rois: list[torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        crops = warp_crops(images, rois, size=self.hparams.warp_size, context=self.hparams.context)
        crops = crops.to(images[0].device)  # (N, 3, s, s)
        if train or len(crops) <= self.hparams.crop_chunk:
            return self.head(self.conv(crops))
        parts = [self.head(self.conv(c)) for c in crops.split(self.hparams.crop_chunk)]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _scores(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.head.svm is None:
            return logits.softmax(dim=1)
        s = self.head.svm(feats).sigmoid()  # (N, K): a monotone map of the SVM margins to (0, 1)
        return torch.cat([1 - s.amax(dim=1, keepdim=True), s], dim=1)  # (N, K+1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if not self._svm_phase():
            return super().training_step(batch, batch_idx)
        return self._svm_step(batch)

    def _svm_step(self, batch: Batch) -> torch.Tensor | None:
        """R-CNN's SVMs on frozen fine-tuned features: gt boxes positive, hard negatives mined."""
        images, targets = batch
        rois, labels, _ = self._sample(targets)
        gts = [t["boxes"].float() for t in targets]
        is_gt = torch.cat([_is_gt_box(r, g) for r, g in zip(rois, gts, strict=True)])
        iou_k = torch.cat(
            [
                _iou_per_class(r, g, t["labels"], self.hparams.num_classes - 1)
                for r, g, t in zip(rois, gts, targets, strict=True)
            ]
        )  # (R, K)
        if len(is_gt) == 0:
            return None
        self.conv.eval(), self.head.fc.eval()  # features as at test: dropout off
        with torch.no_grad():
            feats, _, _ = self._roi_outputs(self._normalise(images), rois, train=True)
        self.conv.train(), self.head.fc.train()
        loss = svm_hinge_loss(
            self.head.svm(feats), labels, is_gt, iou_k, neg_iou=self.hparams.svm_neg_iou,
            hard_negatives=self.hparams.svm_hard_negatives,
        )  # fmt: skip
        return self._log_losses({"loss_svm": loss}, len(images))

    def _param_groups(self) -> list[dict[str, Any]]:
        svm = set(self.head.svm.parameters()) if self.head.svm is not None else set()
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and p not in svm]}]
        if svm:  # its own lr: the fine-tuning schedule has decayed to 0 by the SVM phase
            groups.append(
                {
                    "params": list(svm),
                    "lr": self.hparams.svm_lr,
                    "weight_decay": self.hparams.svm_weight_decay,
                }
            )
        return groups

    def _lr_factors(self, total: int) -> list[Any]:
        if self.head.svm is None:
            return super()._lr_factors(total)
        fine = super()._lr_factors(max(1, total - self.hparams.svm_steps))
        return [*fine, lambda step: 1.0]


def _is_gt_box(rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    if len(gt) == 0 or len(rois) == 0:
        return torch.zeros(len(rois), dtype=torch.bool, device=rois.device)
    return box_iou(rois, gt).amax(dim=1) > 0.999  # (R,): sampled gt boxes


def _iou_per_class(
    rois: torch.Tensor, gt: torch.Tensor, labels: torch.Tensor, k: int
) -> torch.Tensor:
    """(R, K): each RoI's best IoU with a gt box of class 1..K (0 where the image has none)."""
    if len(gt) == 0 or len(rois) == 0:
        return rois.new_zeros(len(rois), k)
    iou = box_iou(rois, gt)  # (R, G)
    onehot = nn.functional.one_hot(labels - 1, k).to(iou.dtype)  # (G, K)
    return (iou[:, :, None] * onehot[None]).amax(dim=1)


class FastRCNNModule(_ProposalDetector):
    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        num_classes: int = 11,
        pooling: Literal["roi_pool", "roi_align", "spp"] = "roi_pool",
        roi_size: int = 7,
        spp_levels: list[int] | None = None,
        spp_hidden: int = 256,
        trainable_conv_stages: int | None = None,
        min_size: int | None = None,
        max_size: int = 1000,
        rois_per_image: int = 64,
        fg_fraction: float = 0.25,
        fg_iou: float = 0.5,
        bg_iou_low: float = 0.1,
        test_max_proposals: int | None = None,
        svd_rank: int | None = None,
        score_threshold: float = 0.05,
        nms_iou: float = 0.3,
        max_detections: int = 100,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: Literal["cosine", "multistep", "none"] = "cosine",
        milestones: list[int] | None = None,
        warmup_steps: int = 0,
        num_sample_images: int = 8,
        draw_score_threshold: float = 0.5,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            backbone, weights: the classifier whose conv stages (shared map) and hidden FC layers
                (per RoI) initialise the detector; null: random.
            pooling: `roi_pool` (Fast R-CNN), `roi_align`, `spp` (SPP-net's pyramid, `spp_levels`,
                default 4, 2, 1: its new FC layer of `spp_hidden` units replaces the classifier's,
                whose input shape the pyramid no longer matches).
            roi_size: RoI pool / align output side: the classifier's FC input (7 for digits / VGG).
            trainable_conv_stages: top conv stages fine-tuned (null: all; SPP-net: 0; Fast R-CNN
                VGG16: 3, conv3_1 and up).
            min_size, max_size: each image resized to shorter side min_size, longer at most
                max_size, before the trunk (Fast R-CNN / SPP-net: 600 / 1000); null: as given.
            rois_per_image, fg_fraction, fg_iou, bg_iou_low: 64 RoIs per image, 25% with IoU >=
                0.5, background from [0.1, 0.5) (Fast R-CNN's sampling).
            test_max_proposals: the first proposals per image used at test (null: all).
            svd_rank: at test only, the hidden FC layers compressed by truncated SVD to this rank
                (Fast R-CNN Sec. 3.1: the per-RoI FC work dominates once the conv is shared);
                null: exact. Validation (checkpoint choice) always uses the exact layers.
        """
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        self.save_hyperparameters()
        # the RoI pool replaces the last max-pool (VGG16's pool5): conv5_3 at stride 16
        self.conv, fc = build_trunk(backbone=backbone, weights=weights, keep_last_pool=False)
        freeze_conv(self.conv, trainable_conv_stages)
        stride = trunk_stride(self.conv)
        channels = trunk_channels(self.conv)
        self.pooler = build_pooler(
            pooling, output_size=roi_size, spatial_scale=1.0 / stride,
            levels=tuple(spp_levels or (4, 2, 1)),
        )  # fmt: skip
        if pooling == "spp":
            d_in = self.pooler.out_features(channels)
            fc = nn.Sequential(nn.Linear(d_in, spp_hidden), nn.ReLU(inplace=True), nn.Dropout(0.5))
        d = fc_out_features(fc, (channels, roi_size, roi_size)) if pooling != "spp" else spp_hidden
        self.head = BoxHead(fc, in_features=d, num_classes=num_classes)
        self.mean, self.std = image_stats(backbone)
        self._init_common()

    def _roi_outputs(
        self, images: list[torch.Tensor], rois: list[torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if sum(len(r) for r in rois) == 0:
            z = images[0].new_zeros(0, self.head.cls_score.in_features)
            return z, self.head.cls_score(z), self.head.bbox_pred(z)
        if self.hparams.min_size is not None:  # the papers' single scale (600 px shorter side)
            images, rois = self._rescale(images, rois)
        if len({tuple(img.shape) for img in images}) == 1:  # one conv pass for the batch
            fmap = self.conv(torch.stack(images))  # (B, C, h, w)
            return self.head(self.pooler(fmap, [r.to(fmap.dtype) for r in rois]))
        pooled = []
        for img, r in zip(images, rois, strict=True):  # one conv pass per image, any size
            if len(r):
                fmap = self.conv(img[None])  # (1, C, h, w)
                pooled.append(self.pooler(fmap, [r.to(fmap.dtype)]))  # (N_i, ...)
        return self.head(torch.cat(pooled))

    def on_test_start(self) -> None:
        if self.hparams.svd_rank is not None:  # swapped back in on_test_end
            self._exact_fc = self.head.fc
            self.head.fc = truncated_svd(self.head.fc, rank=self.hparams.svd_rank)

    def on_test_end(self) -> None:
        if self.hparams.svd_rank is not None:
            self.head.fc = self._exact_fc

    def _rescale(
        self, images: list[torch.Tensor], rois: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images resized to shorter side min_size (longer <= max_size), RoIs with them. Deltas
        are relative to the box, so they decode against the unscaled proposals unchanged."""
        hp, out_i, out_r = self.hparams, [], []
        for img, r in zip(images, rois, strict=True):
            h, w = img.shape[-2:]
            f = min(hp.min_size / min(h, w), hp.max_size / max(h, w))
            size = (round(h * f), round(w * f))
            out_i.append(F.interpolate(img[None], size=size, mode="bilinear", antialias=f < 1)[0])
            out_r.append(r * f)
        return out_i, out_r
