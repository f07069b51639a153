"""DeepMaskModule: learned mask proposals (Pinheiro, Collobert, Dollar, NIPS 2015).

Training (windows, `datamodules.deepmask`): the paper's loss (§3.2), for window k with label
y_k = +-1, mask logits f^ij over the m x m output and score logit s_k:

    L = sum_k [ (1 + y_k) / (2 m^2) sum_ij BCE(f^ij, mask^ij)  +  lambda * BCE(s_k, (1 + y_k) / 2) ]

(BCE with logits is log(1 + exp(-t f)) with t = +-1), i.e. the per-pixel logistic mask loss on
positives only, the logistic score loss on every window, lambda = 1/32 (`score_weight`, the
paper's value), averaged over the batch.

Evaluation (whole scenes): the net runs densely at `scales`, the top_k windows by score give
masks pasted at image resolution (`lit_modules.nets.deepmask`). Average recall (AR) at k
proposals: for each ground-truth object, the best mask IoU among an image's top k proposals;
recall at IoU t = share of objects whose best IoU >= t; AR = mean recall over t in 0.5:0.05:0.95
(COCO's ten thresholds; Hosang et al.'s "best overlap" matching, no one-to-one assignment).
Logged: `val/ar_100` (chooses the checkpoint), `test/ar_10`, `test/ar_100`, `test/ar_1000`, and
beside them selective search's boxes scored by box IoU, `test/ss_ar_10/100/1000`, the boxes of
DeepMask's masks scored the same way, `test/box_ar_10/100/1000` (like for like), plus
`test/ms_per_image` / `test/ss_ms_per_image`. Test also writes `proposal_recall.json` (AR at
1..1000 proposals for both) in the run directory.

`predict` returns COCO segm results rows (RLE); `datamodules.deepmask` writes the scenes' ground
truth as COCO json, loads and validates a results file, and scores it with pycocotools' COCOeval
(iouType segm, class-agnostic). `deepmask_proposals(model, image)` gives
boxes + scores for a detector that takes external proposals (Fast R-CNN).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import Metric
from torchvision.ops import box_iou, nms
from torchvision.utils import draw_segmentation_masks, make_grid

from datamodules.deepmask import segm_rows
from lit_modules.callbacks import check_choice, log_train_terms, make_optimizer, one_cycle
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.metrics import ShardedListStates
from lit_modules.nets.deepmask import (
    DeepMask,
    build_deepmask,
    mask_boxes,
    multiscale_proposals,
    paste_masks,
)
from lit_modules.visual import GAP, TRUTH, draw_boxes, log_picture, run_dir, upscale

AR_KS = (10, 100, 1000)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # the recall curve's numbers of proposals
IOU_THRESHOLDS = torch.arange(10, dtype=torch.float64) * 0.05 + 0.5  # 0.5, 0.55, ..., 0.95
COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (200, 64, 255), (0, 220, 200)]


# ----------------------------------------------------------------------------- average recall


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(K, H, W) and (N, H, W) bool masks -> (K, N) IoU (0 where the union is empty)."""
    p, t = pred.flatten(1).float(), truth.flatten(1).float()  # (K, HW), (N, HW)
    inter = p @ t.T  # (K, N)
    union = p.sum(1, keepdim=True) + t.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def best_iou_at(iou: torch.Tensor, ks: Sequence[int] = CURVE_KS) -> torch.Tensor:
    """(K, N) IoU of proposals ranked best first -> (N, len(ks)): each object's best IoU among
    the first k proposals (0 when there are none)."""
    k_all, n = iou.shape
    if k_all == 0:
        return torch.zeros(n, len(ks), dtype=torch.float64)
    running = iou.double().cummax(0).values  # (K, N): best among the first r+1
    rows = torch.tensor([min(k, k_all) - 1 for k in ks])
    return running[rows].T  # (N, len(ks))


def average_recall(best: torch.Tensor) -> torch.Tensor:
    """(N, ...) best IoUs of N objects -> (...) mean over IoU 0.5:0.05:0.95 of the recall."""
    hits = best[None] >= IOU_THRESHOLDS.view(-1, *([1] * best.ndim)).to(best)  # (T, N, ...)
    return hits.double().mean(1).mean(0)


class ProposalRecall(ShardedListStates, Metric):
    """AR at CURVE_KS proposals over every object seen (DDP: per-object rows gathered)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("best", default=[], dist_reduce_fx="cat")

    def update(self, best: torch.Tensor) -> None:  # (N, len(CURVE_KS))
        if len(best):
            self.best.append(best.double())

    def compute(self) -> dict[int, float] | None:
        if not self.best:
            return None  # no object in the whole set: AR is undefined
        ar = average_recall(torch.cat(self.best))  # (len(CURVE_KS),)
        return {k: float(v) for k, v in zip(CURVE_KS, ar.tolist(), strict=True)}


def selective_search_boxes(image: torch.Tensor, mode: str, max_proposals: int) -> torch.Tensor:
    """Selective search (lit_modules.nets.proposals) on a (C, H, W) [0, 1] image: (N, 4) xyxy."""
    from lit_modules.nets.proposals import selective_search  # imported here: test stage only

    rgb = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    rgb = rgb.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()  # (H, W, 3) uint8
    return torch.as_tensor(selective_search(rgb, mode=mode, max_proposals=max_proposals)).float()


# ----------------------------------------------------------------------------- proposals


def _inference(
    model: DeepMask | LightningModule,
) -> tuple[DeepMask, tuple[float, ...], int | None, float]:
    """The net, its scales, refine_top and mask threshold (a probability): a DeepMaskModule's
    hyperparameters, or a bare net's defaults (one scale, all top windows refined, 0.5)."""
    if isinstance(model, DeepMaskModule):
        hp = model.hparams
        return model.net, tuple(hp.scales), hp.refine_top, hp.mask_threshold
    return model, (1.0,), None, 0.5  # type: ignore[return-value]


def deepmask_masks(
    model: DeepMask | LightningModule,
    image: torch.Tensor,
    *,
    scales: Sequence[float] | None = None,
    top_k: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) image in [0, 1] -> masks (K, H, W) bool and scores (K,), best first."""
    net, own_scales, refine_top, p = _inference(model)
    was = net.training
    net.eval()
    try:
        props = multiscale_proposals(
            net,
            image.to(net.mean.device),
            scales=own_scales if scales is None else scales,
            top_k=top_k,
            refine_top=refine_top,
        )
    finally:
        net.train(was)
    size = tuple(image.shape[-2:])
    return paste_masks(props.masks, props.windows, size, math.log(p / (1 - p))), props.scores.cpu()


def deepmask_proposals(
    model: DeepMask | LightningModule,
    image: torch.Tensor,
    *,
    scales: Sequence[float] | None = None,
    top_k: int = 1000,
    nms_iou: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box proposals for a detector (Fast R-CNN's external proposals): the boxes of DeepMask's
    masks (N, 4) xyxy image pixels and their scores (N,), best first; empty masks dropped.

    nms_iou: drop a box that overlaps a better one by more than this (the dense windows give
    near-duplicates); None keeps them all (DeepMask's own ranking).
    """
    masks, scores = deepmask_masks(model, image, scales=scales, top_k=top_k)
    boxes = mask_boxes(masks)
    keep = masks.flatten(1).any(1)
    boxes, scores = boxes[keep], scores[keep]
    if nms_iou is not None:
        order = nms(boxes, scores, nms_iou)
        boxes, scores = boxes[order], scores[order]
    return boxes, scores


def time_proposals(
    model: DeepMask | LightningModule,
    image: torch.Tensor,
    *,
    repeats: int = 20,
    threads: int = 2,
    top_k: int = 1000,
) -> dict[str, float]:
    """Median ms of dense multi-scale inference on one image (net + top-k), and with the top-k
    masks pasted at image resolution, with `threads` torch threads; the load average beside."""
    import os

    (net, scales, refine_top, _), before = _inference(model), torch.get_num_threads()
    torch.set_num_threads(threads)
    net.eval()
    dense, full = [], []
    try:
        for _ in range(repeats + 2):  # 2 warm-up runs (oneDNN primitives, allocator)
            t0 = time.perf_counter()
            props = multiscale_proposals(
                net, image, scales=scales, top_k=top_k, refine_top=refine_top
            )
            t1 = time.perf_counter()
            paste_masks(props.masks, props.windows, tuple(image.shape[-2:]))
            dense.append(t1 - t0)
            full.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {
        "dense_ms": 1000 * float(np.median(dense[2:])),
        "with_paste_ms": 1000 * float(np.median(full[2:])),
        "repeats": repeats,
        "threads": threads,
        "load_average_1min": os.getloadavg()[0],
    }


# ----------------------------------------------------------------------------- pictures


def proposal_picture(
    images: list[torch.Tensor], masks: list[torch.Tensor], targets: list[dict[str, Any]] | None,
    *, per_image: int = 3, side: int = 192,
) -> torch.Tensor:  # fmt: skip
    """(3, H', W') uint8 grid: per scene its best `per_image` distinct masks (coloured, each
    overlapping no better one by box IoU > 0.5), ground-truth boxes in green."""
    tiles = []
    for n, (img, ms) in enumerate(zip(images, masks, strict=True)):
        x, scale = upscale((img.float().cpu().clamp(0, 1).expand(3, -1, -1) * 255).round(), side)
        picked: list[int] = []
        boxes = mask_boxes(ms)
        for k in range(len(ms)):
            if len(picked) == per_image:
                break
            if ms[k].any() and (not picked or box_iou(boxes[k : k + 1], boxes[picked]).max() < 0.5):
                picked.append(k)
        if picked:
            big = F.interpolate(ms[picked, None].float(), size=x.shape[-2:], mode="nearest")
            x = draw_segmentation_masks(x, big[:, 0] > 0, alpha=0.55, colors=COLOURS[: len(picked)])
        if targets is not None and len(targets[n]["boxes"]):
            x = draw_boxes(x, targets[n]["boxes"] * scale, colour=TRUTH, width=1)
        tiles.append(x)
    return make_grid(torch.stack(tiles), nrow=len(tiles), padding=2, pad_value=GAP)


# ----------------------------------------------------------------------------- the module

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


class DeepMaskModule(LightningModule):
    monitor = ("val/ar_100", "max")  # what the best checkpoint tracks

    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        in_channels: int = 1,
        normalize: Literal["digits", "imagenet"] = "digits",
        patch_size: int = 32,
        mask_size: int = 16,
        reduce_channels: int = 32,
        rank: int = 64,
        score_hidden: int = 128,
        dropout: float = 0.3,
        refine_channels: int = 0,
        refine_top: int | None = None,
        score_weight: float = 1 / 32,
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["onecycle", "cosine", "none"] = "onecycle",
        warmup_pct: float = 0.2,
        scales: tuple[float, ...] = (0.5, 0.71, 1.0),
        top_k: int = 1000,
        mask_threshold: float = 0.5,
        predict_top_k: int = 100,
        compare_selective_search: bool = True,
        ss_mode: str = "fast",
        ss_max_proposals: int = 2000,
        num_sample_images: int = 4,
        channels_last: bool = False,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            backbone, weights: the trunk (`build_trunk`): digits_cnn with a digits classifier
                checkpoint (runs/weights/digits_classifier.pt), or vgg16 / resnet50 with a
                torchvision weights name.
            patch_size, mask_size: the window P and the mask branch's m x m output.
            reduce_channels, rank, score_hidden, dropout: the branches (lit_modules/nets/deepmask.py).
            refine_channels: width of the optional SharpMask-style refinement of each mask from
                the window's pixels (0: none, the paper's DeepMask).
            refine_top: inference refines the masks of this many best windows per image (None:
                all top_k); the others keep their coarse masks.
            score_weight: lambda, the score term's weight (the paper's 1/32).
            scales: image scales of dense inference (each covers objects whose larger side is
                within 2**+-1/4 of canonical / scale: the data's `canonical_size`).
            top_k: proposals kept per image for evaluation (AR@1000 needs 1000).
            mask_threshold: a pixel is in a proposal's mask when its probability is above this
                (the paper: 0.5; thin digit strokes score better a little higher, on val).
            predict_top_k: proposals per image written by `predict`.
            compare_selective_search: test also scores selective search's boxes (test/ss_ar_*).
            channels_last: NHWC weights and activations: oneDNN's CPU convolutions run faster in
                that layout (digits training step 1.3x measured, bf16-mixed, 2 threads); dense
                inference follows the weights' layout.
        """
        super().__init__()
        check_choice("optimizer", optimizer, ("sgd", "adamw"))
        check_choice("scheduler", scheduler, ("onecycle", "cosine", "none"))
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {scales}")
        self.save_hyperparameters()
        self.net = build_deepmask(
            backbone=backbone, weights=weights, in_channels=in_channels, patch_size=patch_size,
            mask_size=mask_size, reduce_channels=reduce_channels, rank=rank,
            score_hidden=score_hidden, dropout=dropout, refine_channels=refine_channels,
            normalize=normalize,
        )  # fmt: skip
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.val_ar, self.test_ar = ProposalRecall(), ProposalRecall()
        self.test_box_ar, self.test_ss_ar = ProposalRecall(), ProposalRecall()
        self._seconds = {"dm": 0.0, "ss": 0.0, "images": 0}
        self._samples: tuple[list, list, list] | None = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        data = getattr(dm, "hparams", {})
        if stage == "test" and self.hparams.compare_selective_search:
            try:
                from lit_modules.nets.proposals import selective_search  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    f"compare_selective_search needs lit_modules.nets.proposals ({err}); "
                    "set --model.compare_selective_search=false to test DeepMask alone"
                ) from err
        for key in ("patch_size", "mask_size"):  # the windows must be what the net reads
            if key in data and data[key] != self.hparams[key]:
                raise ValueError(
                    f"data.{key} is {data[key]} but model.{key} is {self.hparams[key]}: set both"
                )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.channels_last:  # same (B, C, P, P) shape, NHWC strides
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)  # (B, m, m) mask logits, (B,) score logits

    # ------------------------------------------------------------------ training

    def losses(
        self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The paper's two terms for windows x (B, C, P, P), masks (B, m, m), labels y (B,) +-1."""
        masks, scores = self(x)
        pos = (y > 0).float()  # (B,) the (1 + y) / 2 factor: mask loss on positives only
        per_pixel = F.binary_cross_entropy_with_logits(masks.float(), target, reduction="none")
        mask_loss = (per_pixel.mean((1, 2)) * pos).mean()
        score_loss = F.binary_cross_entropy_with_logits(scores.float(), pos)
        return {
            "loss": mask_loss + self.hparams.score_weight * score_loss,
            "mask_loss": mask_loss,
            "score_loss": score_loss,
        }

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> Any:
        terms = self.losses(*batch)
        if not finite_loss(self, terms, self.hparams.nonfinite_loss):
            return None
        log_train_terms(self, terms)
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation

    def _proposals(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return deepmask_masks(self, image, top_k=self.hparams.top_k)  # this module's settings

    def _evaluate(self, batch: Batch, metric: ProposalRecall) -> list[torch.Tensor]:
        images, targets = batch
        out = []
        for image, target in zip(images, targets, strict=True):
            t0 = time.perf_counter()
            masks, _ = self._proposals(image)  # (K, H, W) bool, best first
            self._seconds["dm"] += time.perf_counter() - t0
            metric.update(best_iou_at(mask_iou(masks, target["masks"].cpu())))
            out.append(masks)
        return out

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        masks = self._evaluate(batch, self.val_ar)
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            self._samples = (batch[0][:k], masks[:k], batch[1][:k])

    def _log_ar(self, metric: ProposalRecall, stage: str, prefix: str = "") -> dict[int, float]:
        ar = metric.compute()
        metric.reset()
        if ar is not None:
            self.log_dict({f"{stage}/{prefix}ar_{k}": ar[k] for k in AR_KS}, prog_bar=True)
        return ar or {}

    def on_validation_epoch_end(self) -> None:
        self._log_ar(self.val_ar, "val")
        if self._samples is not None:
            picture = proposal_picture(*self._samples)
            self._samples = None
            log_picture(
                self, "val/proposals", picture, caption="best 3 distinct masks; green: truth"
            )

    def on_test_epoch_start(self) -> None:
        self._seconds = {"dm": 0.0, "ss": 0.0, "images": 0}

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        masks = self._evaluate(batch, self.test_ar)
        self._seconds["images"] += len(batch[0])
        for m, target in zip(masks, batch[1], strict=True):  # the boxes of DeepMask's masks
            self.test_box_ar.update(best_iou_at(box_iou(mask_boxes(m), target["boxes"].cpu())))
        if not self.hparams.compare_selective_search:
            return
        hp = self.hparams
        for image, target in zip(*batch, strict=True):
            t0 = time.perf_counter()
            boxes = selective_search_boxes(image, hp.ss_mode, hp.ss_max_proposals)[: hp.top_k]
            self._seconds["ss"] += time.perf_counter() - t0
            iou = box_iou(boxes, target["boxes"].cpu().float())  # (K, N)
            self.test_ss_ar.update(best_iou_at(iou))

    def on_test_epoch_end(self) -> None:
        curves = {
            "deepmask_mask_ar": self._log_ar(self.test_ar, "test"),
            "deepmask_box_ar": self._log_ar(self.test_box_ar, "test", "box_"),
        }
        if self.hparams.compare_selective_search:
            curves["selective_search_box_ar"] = self._log_ar(self.test_ss_ar, "test", "ss_")
        n = max(1, self._seconds["images"])
        self.log("test/ms_per_image", 1000 * self._seconds["dm"] / n, sync_dist=True)
        if self.hparams.compare_selective_search:
            self.log("test/ss_ms_per_image", 1000 * self._seconds["ss"] / n, sync_dist=True)
        folder = run_dir(self)  # every rank: a collective under DDP
        if self.trainer.is_global_zero:
            rows = {
                "ks": list(CURVE_KS),
                **{k: [v.get(c) for c in CURVE_KS] for k, v in curves.items()},
            }
            (folder / "proposal_recall.json").write_text(json.dumps(rows, indent=1) + "\n")

    # ------------------------------------------------------------------ predict

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, list[dict[str, Any]]]:
        """COCO segm results rows (RLE masks, class-agnostic), predict_top_k per image."""
        images, targets = batch[0], batch[1] if len(batch) > 1 else None
        rows = []
        for n, image in enumerate(images):
            masks, scores = self._proposals(image)
            k = self.hparams.predict_top_k
            image_id = targets[n]["image_id"] if targets else batch_idx * len(images) + n + 1
            rows += segm_rows(masks[:k], scores[:k], image_id)
        return {"rows": rows}  # a dict: a list per batch would read as one list per loader

    def format_predictions(self, outputs: list[dict[str, list[dict]]]) -> list[dict[str, Any]]:
        return [row for out in outputs for row in out["rows"]]

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = make_optimizer(params, hp)  # the paper: SGD, momentum 0.9, weight decay 5e-4, lr 1e-3
        if hp.scheduler == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            sched: Any = one_cycle(opt, hp.lr, total, hp.warmup_pct)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
