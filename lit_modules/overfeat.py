"""OverFeatDetector: a trained BoxRegressor, convolutionalized, slid over a scene at several scales.

OverFeat's "most naive" detector (Sermanet et al. 2013): the localization net's two FC heads
become convolutions (`lit_modules.nets.convolutionalize`), so one pass over an image at scale s
gives, for every window of the regressor's input size (at the trunk's stride), a class
distribution (background + objects) and a box. Windows whose best object class reaches
`score_threshold` become candidate boxes, mapped back to image pixels; the candidates of all
scales are merged per class by OverFeat's greedy merge (`merge: greedy`: fuse the most
overlapping pair until no pair overlaps by `iou_threshold`; scores add up) or by NMS.

Nothing is trained here (the BoxRegressor was: configs/localization/digits_box_regressor.yaml):
`test` / `validate` are the entry points; `fit` runs no training step and validates once, so it
still writes a checkpoint and metrics.json. Scoring is the detection topic's: COCO mAP
(`test/map`, `test/map_50`, `test/map_75`, ...) and VOC07 11-point AP (`test/voc07_map_50`) from
the same metric objects as FasterRCNNModule, and `test/images_per_s` (scales, dense pass and
merge included; data loading excluded), so its row sits beside Faster R-CNN's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from lit_modules.callbacks import check_choice
from lit_modules.detection import DetectionScoring
from lit_modules.localization import Normalizer
from lit_modules.nets.backbones import load_weights_file
from lit_modules.nets.convolutionalize import convolutionalize
from lit_modules.nets.localization import (
    BOX_HEADS,
    MERGES,
    Detections,
    build_localization_net,
    dense_detections,
    merge_detections,
)
from lit_modules.visual import draw_detections

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def load_regressor_state(path: str) -> dict[str, torch.Tensor]:
    """The LocalizationNet weights (`net.*`) of a BoxRegressor checkpoint or exported file."""
    state = load_weights_file(path)
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if not any(k.startswith(("cls_head.", "box_head.")) for k in net):
        raise ValueError(
            f"{path} holds no BoxRegressor weights (no net.cls_head / net.box_head): train one "
            "with configs/localization/digits_box_regressor.yaml and pass its exported weights"
        )
    return net


class OverFeatDetector(DetectionScoring, LightningModule):
    monitor = ("val/map", "max")

    def __init__(
        self,
        weights: str | None = None,
        backbone: str = "digits_cnn",
        input_size: int = 40,
        num_classes: int = 11,
        pool: int = 2,
        hidden: int = 128,
        box_head: Literal["agnostic", "per_class"] = "agnostic",
        normalize: Literal["digits", "imagenet"] = "digits",
        scales: list[float] | None = None,
        score_threshold: float = 0.3,
        merge: Literal["greedy", "nms"] = "greedy",
        iou_threshold: float = 0.5,
        max_candidates: int = 400,
        max_detections: int = 100,
        cross_class_iou: float | None = None,
        num_sample_images: int = 8,
        draw_score_threshold: float = 1.0,
    ) -> None:
        """
        Args:
            weights: the trained BoxRegressor: its exported weights file (ExportWeights, e.g.
                runs/weights/digits_box_regressor.pt) or a checkpoint; null: random (tests only).
            backbone, input_size, num_classes, pool, hidden, box_head, normalize: the
                BoxRegressor's (they rebuild its net; a mismatch is an error naming the layer).
            scales: image scales the net slides over (OverFeat used 6); default 0.8, 1.0, 1.2.
            score_threshold: least probability of a window's best object class to be a candidate.
            merge: `greedy` (OverFeat's merge, scores summed) or `nms` (scores kept).
            iou_threshold: the overlap at which two boxes of a class merge (greedy) or the lower
                one is suppressed (nms).
            max_candidates: the best windows per image that go into the merge.
            cross_class_iou: after the per-class merge, a class-blind NMS at this IoU (not in
                OverFeat; null: off): one object that windows read as two classes keeps one.
            draw_score_threshold: least score of a drawn detection (greedy scores are sums).
        """
        super().__init__()
        check_choice("box_head", box_head, BOX_HEADS)
        check_choice("merge", merge, MERGES)
        scales = [0.8, 1.0, 1.2] if scales is None else list(scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {scales}")
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.save_hyperparameters()
        net = build_localization_net(
            backbone=backbone, input_size=input_size, num_classes=num_classes, pool=pool,
            hidden=hidden, box_head=box_head,
        )  # fmt: skip
        if weights is not None:
            try:
                net.load_state_dict(load_regressor_state(weights))
            except RuntimeError as err:
                raise ValueError(
                    f"{weights} does not match the net these options build (backbone {backbone}, "
                    f"input_size {input_size}, pool {pool}, hidden {hidden}, box_head {box_head}, "
                    f"num_classes {num_classes}): use the BoxRegressor's own options. {err}"
                ) from err
        self.per_class = net.per_class
        self.dense = convolutionalize(net.eval(), input_size=input_size).eval()
        self.dense.requires_grad_(False)
        self.stride = int(self.dense.stride)
        if input_size % self.stride:
            raise ValueError(
                f"input_size {input_size} is not a multiple of the trunk's stride {self.stride}: "
                "map cells would not fall on whole windows"
            )
        self.normalizer = Normalizer(in_channels=net.in_channels, normalize=normalize)
        self._init_scoring()

    def train(self, mode: bool = True) -> OverFeatDetector:
        super().train(mode)
        self.dense.eval()  # a trained net: dropout off, BatchNorm statistics fixed, always
        return self

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"the data has {data_classes - 1} classes + background but the BoxRegressor "
                f"(model.num_classes) has {self.hparams.num_classes}: they must agree"
            )

    # ------------------------------------------------------------------ detection

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> list[Detections]:
        """[{boxes (N, 4) xyxy, labels (N,), scores (N,)}] per (C, H, W) image in [0, 1]."""
        hp = self.hparams
        out: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):  # same-size images go through the net together
            groups.setdefault(tuple(img.shape), []).append(i)
        for idx in groups.values():
            x = self.normalizer(torch.stack([images[i] for i in idx]))  # (B, C, H, W)
            parts = dense_detections(
                self.dense, x, window=hp.input_size, stride=self.stride, scales=hp.scales,
                per_class=self.per_class, score_threshold=hp.score_threshold,
            )  # fmt: skip
            for i, p in zip(idx, parts, strict=True):
                out[i] = merge_detections(
                    p, merge=hp.merge, iou_threshold=hp.iou_threshold,
                    max_candidates=hp.max_candidates, max_detections=hp.max_detections,
                    cross_class_iou=hp.cross_class_iou,
                )  # fmt: skip
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ no training

    def configure_optimizers(self) -> None:
        return None  # nothing learns: the BoxRegressor is already trained

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        return None  # a skipped step: `fit` only validates

    def draw(
        self,
        images: list[torch.Tensor],
        preds: list[Detections],
        targets: list[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """A grid of scenes with ground truth (green) and merged detections (red): (3, H, W) uint8."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = getattr(dm, "category_names", None) or {}
        return draw_detections(
            images, preds, targets, names=names, threshold=self.hparams.draw_score_threshold
        )
