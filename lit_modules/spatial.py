"""SpatialClassifier: a trained classifier, convolutionalized, gives dense class maps of a scene.

The classifier (a cnnlab TransferClassifier checkpoint, a plain state dict, or torchvision
weights by name) is turned into a fully convolutional net (`lit_modules.nets.convolutionalize`):
one pass over a scene scores every training-size window at the net's total stride. Nothing is
trained here: `validate` / `test` are the entry points; `fit` skips every training batch (no
optimizer, no step) and validates at the end of each epoch, so a fit run still writes its
checkpoint and metrics.json (the configs give it a one-batch train set).

Evaluation turns the maps into point detections. The classifier has no background class, so a
window of empty canvas still gets a softmax over digits; a location counts only where its top
class probability reaches `score_threshold` (confident windows are centred digits), and only
where that class's logit is a local maximum of its map in a `peak_window` square (non-maximum
suppression on the map). A peak is a hit when it lies inside a ground-truth box of its class
not already hit by a higher-scoring peak (one-to-one, so duplicates count as false positives):
`peak_precision` = hits / peaks, `peak_recall` = boxes hit / boxes.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import Metric

from datamodules.digits import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD
from lit_modules.nets.backbones import (
    DigitsCNN,
    build_torchvision,
    is_file_path,
    load_weights_file,
    split_classifier,
)
from lit_modules.nets.convolutionalize import convolutionalize
from lit_modules.nets.transfer_net import load_stages
from lit_modules.visual import classmap_grid, log_picture

Peaks = dict[str, torch.Tensor]  # points (N, 2) xy image pixels, labels (N,), scores (N,)


# ----------------------------------------------------------------------------- the classifier


def _plain_classifier(backbone: str, num_classes: int) -> nn.Module:
    if backbone == "digits_cnn":
        return DigitsCNN(num_classes=num_classes)
    return torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)


def build_classifier(*, backbone: str = "digits_cnn", weights: str | None = None) -> nn.Module:
    """The plain classifier `backbone` (forward: image -> logits) with `weights`.

    weights: a TransferClassifier checkpoint or exported weights file (its stages and its head:
    the classes it was trained on), a plain state dict of `backbone`, a torchvision weights
    name (`DEFAULT`, `IMAGENET1K_V1`), or null (random: for tests only).
    """
    if weights is None:
        return _plain_classifier(backbone, 10 if backbone == "digits_cnn" else 1000)
    if not is_file_path(weights):
        if backbone == "digits_cnn":
            raise ValueError("digits_cnn has no named weights: give a weights file path")
        return build_torchvision(backbone, weights=weights)
    state = load_weights_file(weights)
    if "net.head.weight" not in state:  # a plain state dict of the classifier itself
        last = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2][-1]
        model = _plain_classifier(backbone, state[last].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"weights file {weights} does not match {backbone}: {err}") from err
        return model
    head_w = state["net.head.weight"]  # (K, D)
    model = _plain_classifier(backbone, head_w.shape[0])
    stages, head = split_classifier(model)  # views of `model`: loading them loads `model`
    if head.in_features != head_w.shape[1]:
        raise ValueError(
            f"{weights}: its head reads {head_w.shape[1]} features, {backbone}'s classifier "
            f"{head.in_features}; a checkpoint cut below the top (feature_stages) is no plain "
            "classifier and cannot be convolutionalized"
        )
    load_stages(stages, state, path=weights, backbone=backbone)
    head.load_state_dict({"weight": head_w, "bias": state["net.head.bias"]})
    return model


# ----------------------------------------------------------------------------- peaks


def find_peaks(
    logits: torch.Tensor,
    *,
    stride: int,
    offset: float,
    threshold: float,
    window: int,
    across_classes: bool = False,
    gate: torch.Tensor | None = None,
) -> list[Peaks]:
    """Local maxima of the class maps whose softmax probability reaches `threshold`.

    logits: (B, K, h, w); gate: optional (B, h, w) bool, the cells that may hold an object.
    Map cell (i, j) is the window centred on image pixel (offset + j * stride, offset + i * stride).
    NMS on the map: a peak is the maximum of its `window` x `window` cells, in its own class's
    map (`across_classes` False) or over every class's (one peak per neighbourhood). Log
    probabilities rank the cells: probabilities themselves saturate at 1.0 into plateaus.
    Returns one dict per image, labels 0..K-1, in descending score.
    """
    logp = logits.log_softmax(1)  # (B, K, h, w)
    ok = logp >= math.log(threshold)
    if gate is not None:
        ok &= gate[:, None]
    score = logp.masked_fill(~ok, -math.inf)
    if across_classes:
        best = score.amax(1, keepdim=True)  # (B, 1, h, w)
        local = (best == F.max_pool2d(best, window, 1, window // 2)) & (score == best)
    else:
        local = score == F.max_pool2d(score, window, 1, window // 2)
    keep = local & ok  # (B, K, h, w)
    out = []
    for b in range(len(logits)):
        k, i, j = keep[b].nonzero(as_tuple=True)
        scores = logp[b, k, i, j].exp()
        order = scores.argsort(descending=True, stable=True)
        xy = torch.stack([j, i], 1)[order].float() * stride + offset  # (N, 2) image pixels
        out.append({"points": xy, "labels": k[order], "scores": scores[order]})
    return out


def ink_gate(
    image: torch.Tensor, *, window: int, stride: int, shape: tuple[int, int], min_ink: float
) -> torch.Tensor:
    """(h, w) bool: the cells whose window's central half has mean intensity >= `min_ink`.

    image: (C, H, W) in [0, 1], ink bright on a dark canvas (the digit scenes).
    """
    q = window // 4
    gray = image.mean(0)[None, None, q:, q:]  # (1, 1, H - q, W - q)
    ink = F.avg_pool2d(gray, window // 2, stride)[0, 0]  # cell (i, j): its window's centre
    return ink[: shape[0], : shape[1]] >= min_ink


def match_peaks(peaks: Peaks, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(hits, boxes hit): peaks in score order each take one unhit box of their label."""
    hit = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for (x, y), c in zip(peaks["points"].tolist(), peaks["labels"].tolist(), strict=True):
        inside = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
        free = (inside & (labels == c) & ~hit).nonzero().flatten()
        if len(free):
            hit[free[0]] = True
    found = int(hit.sum())
    return found, found


class PeakMatches(Metric):
    """Peak precision / recall / F1 over a data set; the counts sum over DDP ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("hits", "peaks", "found", "objects"):
            self.add_state(name, torch.tensor(0), dist_reduce_fx="sum")

    def update(self, peaks: list[Peaks], targets: list[dict[str, torch.Tensor]]) -> None:
        for p, t in zip(peaks, targets, strict=True):
            hits, found = match_peaks(p, t["boxes"], t["labels"])
            self.hits += hits
            self.found += found
            self.peaks += len(p["labels"])
            self.objects += len(t["labels"])

    def compute(self) -> dict[str, torch.Tensor]:
        precision = self.hits / self.peaks.clamp_min(1)
        recall = self.found / self.objects.clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"peak_precision": precision, "peak_recall": recall, "peak_f1": f1}


# ----------------------------------------------------------------------------- the module


class SpatialClassifier(LightningModule):
    monitor = ("val/peak_f1", "max")

    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        input_size: int | None = 28,
        normalize: Literal["digits", "imagenet"] = "digits",
        label_offset: int = 1,
        score_threshold: float = 0.9,
        peak_window: int = 5,
        nms: Literal["per_class", "across_classes"] = "per_class",
        min_ink: float | None = None,
        num_sample_images: int = 4,
    ) -> None:
        """
        Args:
            backbone: `digits_cnn` or a torchvision classifier (vgg16, resnet50, ...).
            weights: see `build_classifier` (a digits classifier exported by an earlier run).
            input_size: the size the classifier was trained at: one map cell is one window of
                it. null for a global-pool net gives a per-location (CAM-style) map instead.
            normalize: the classifier's input normalisation (images arrive in [0, 1]).
            label_offset: data label of class k is k + label_offset (scenes: digit + 1).
            score_threshold: the least softmax probability of a peak (no background class).
            peak_window: the side, in map cells, of the square a peak is the maximum of.
            nms: `per_class`: a peak is the maximum of its own class's map; `across_classes`:
                of every class's, so one digit gives one peak, not one per class it resembles.
            min_ink: digit scenes only: the least mean intensity (in [0, 1]) of a window's
                central half for its cell to hold an object (null: no gate). The classifier has
                no background class and calls an empty window a confident "1"; this input-side
                gate is the background class it lacks.
        """
        super().__init__()
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        if peak_window < 1 or peak_window % 2 == 0:
            raise ValueError(f"peak_window must be an odd number >= 1, got {peak_window}")
        if nms not in ("per_class", "across_classes"):
            raise ValueError(f"nms must be per_class or across_classes, got {nms!r}")
        if normalize not in ("digits", "imagenet"):
            raise ValueError(f"normalize must be digits or imagenet, got {normalize!r}")
        self.save_hyperparameters()
        classifier = build_classifier(backbone=backbone, weights=weights).eval()
        self.net = convolutionalize(classifier, input_size=input_size).eval()
        self.net.requires_grad_(False)
        self.in_channels = next(
            m for m in classifier.modules() if isinstance(m, nn.Conv2d)
        ).in_channels
        self.num_classes = next(
            m for m in reversed(list(classifier.modules())) if isinstance(m, nn.Linear)
        ).out_features
        self.stride = self.net.stride
        if min_ink is not None and self.net.training_size is None:
            raise ValueError("min_ink needs input_size: the window a map cell looks at")
        self.window = (self.net.training_size or (self.stride, self.stride))[0]
        self.offset = self.window / 2  # centre of map cell (0, 0), in image pixels
        mean, std = (DIGITS_MEAN,), (DIGITS_STD,)
        if normalize == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        c = self.in_channels
        self.register_buffer("mean", torch.tensor(mean * (c // len(mean) or 1))[:c, None, None])
        self.register_buffer("std", torch.tensor(std * (c // len(std) or 1))[:c, None, None])
        self.val_peaks, self.test_peaks = PeakMatches(), PeakMatches()

    def train(self, mode: bool = True) -> SpatialClassifier:
        super().train(mode)
        self.net.eval()  # a trained classifier: dropout off, BatchNorm statistics fixed, always
        return self

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H, W) in [0, 1] -> (1, in_channels, H, W) normalised as the classifier expects."""
        if image.shape[0] != self.in_channels:
            image = image.mean(0, keepdim=True).expand(self.in_channels, -1, -1)
        return ((image - self.mean) / self.std)[None]

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Class-map logits, one (K, h, w) per image (images may differ in size)."""
        return [self.net(self.preprocess(img))[0] for img in images]

    def gate(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """(h, w) bool: the cells that may hold an object (`min_ink`), or None (no gate)."""
        if self.hparams.min_ink is None:
            return None
        return ink_gate(
            image, window=self.window, stride=self.stride, shape=tuple(logits.shape[-2:]),
            min_ink=self.hparams.min_ink,
        )  # fmt: skip

    def peaks(self, images: list[torch.Tensor], logits: list[torch.Tensor]) -> list[Peaks]:
        """Point detections of each image from its (K, h, w) class-map logits; data labels."""
        hp = self.hparams
        out = []
        for img, lg in zip(images, logits, strict=True):
            gate = self.gate(img, lg)
            (p,) = find_peaks(
                lg[None], stride=self.stride, offset=self.offset, threshold=hp.score_threshold,
                window=hp.peak_window, across_classes=hp.nms == "across_classes",
                gate=None if gate is None else gate[None],
            )  # fmt: skip
            out.append({**p, "labels": p["labels"] + hp.label_offset})
        return out

    # ------------------------------------------------------------------ no training

    def configure_optimizers(self) -> None:
        return None  # nothing learns: the classifier is already trained

    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None  # a skipped step: `fit` only validates, at the end of each epoch

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, batch: tuple[list, list], metric: PeakMatches, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        peaks = self.peaks(images, logits)
        metric.update(peaks, targets)
        n = self.hparams.num_sample_images
        if batch_idx == 0 and n > 0:  # val and test: a test-only run has its picture too
            picture = classmap_grid(images[:n], logits[:n], peaks[:n], targets[:n], module=self)
            stage = "val" if metric is self.val_peaks else "test"
            log_picture(self, f"{stage}/classmaps", picture)

    def validation_step(self, batch: tuple[list, list], batch_idx: int) -> None:
        self._evaluate(batch, self.val_peaks, batch_idx)

    def test_step(self, batch: tuple[list, list], batch_idx: int) -> None:
        self._evaluate(batch, self.test_peaks, batch_idx)

    def _log_epoch(self, stage: str, metric: PeakMatches) -> None:
        for name, value in metric.compute().items():
            self.log(f"{stage}/{name}", value)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_peaks)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_peaks)

    def predict_step(self, batch: tuple[list, list], batch_idx: int) -> list[Peaks]:
        return self.peaks(batch[0], self(batch[0]))


# ----------------------------------------------------------------------------- pictures


# ----------------------------------------------------------------------------- dense vs sliding


def _median_seconds(fns: list[Any], repeats: int) -> list[float]:
    """Median wall seconds of each of `fns`, timed in turn (interleaved: a load spike on the
    machine hits both, not one)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def dense_vs_sliding(
    net: nn.Module,
    image: torch.Tensor,
    *,
    crop: int | None = None,
    stride: int | None = None,
    repeats: int = 5,
    batch_size: int = 256,
) -> dict[str, Any]:
    """The classifier `net` on every crop of a sliding window vs its convolutionalized self.

    image: (C, H, W), as `net` takes it (normalised). crop / stride default to the net's
    training size and total stride, where each map cell is one crop's window: the scores are
    identical when the net has no zero padding (see `padded_layers`, listed in the result).
    Both are timed side by side in this process, `repeats` times each, interleaved (medians);
    crops go through `net` in batches of `batch_size`. Returns the times, their ratio, the
    number of windows and the largest absolute score difference between the two.
    """
    net = net.eval()
    dense = convolutionalize(net, input_size=crop)
    crop = crop or dense.training_size[0]
    stride = stride or dense.stride
    x = image[None]  # (1, C, H, W)
    windows = x.unfold(2, crop, stride).unfold(3, crop, stride)  # (1, C, h, w, crop, crop)
    h, w = windows.shape[2:4]
    crops = windows[0].permute(1, 2, 0, 3, 4).reshape(h * w, x.shape[1], crop, crop)

    def sliding() -> torch.Tensor:
        return torch.cat([net(c) for c in crops.split(batch_size)])  # (h*w, K)

    scores_dense = dense(x)[0]  # (K, h', w')
    scores_crops = sliding().T.reshape(-1, h, w)  # (K, h, w)
    if scores_dense.shape != scores_crops.shape:
        raise ValueError(
            f"crop {crop} / stride {stride} give a {h}x{w} grid, the dense map is "
            f"{tuple(scores_dense.shape[1:])}: use the net's training size and stride"
        )
    dense_s, sliding_s = _median_seconds([lambda: dense(x), sliding], repeats)
    return {
        "dense_s": dense_s,
        "sliding_s": sliding_s,
        "speedup": sliding_s / dense_s,
        "windows": h * w,
        "map": [h, w],
        "crop": crop,
        "stride": stride,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "max_abs_diff": float((scores_dense - scores_crops).abs().max()),
        "argmax_agreement": float(
            (scores_dense.argmax(0) == scores_crops.argmax(0)).float().mean()
        ),
        "padded_layers": padded_layers(net),
    }


def padded_layers(net: nn.Module) -> list[str]:
    """Convs / pools that zero-pad: where a crop's edge and the whole image's interior differ.

    A padded layer sees zeros at a crop's border but real neighbours in the whole image, so the
    dense map equals the crop-by-crop scores exactly only for a net without any (OverFeat's
    argument assumes valid convolutions); with them the two agree away from the padding's reach.
    """
    pads = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    return [
        name for name, m in net.named_modules()
        if isinstance(m, pads) and any(_pair_any(m.padding))
    ]  # fmt: skip


def _pair_any(p: int | tuple[int, ...] | str) -> tuple[int, ...]:
    if isinstance(p, str):  # "same" / "valid"
        return (int(p == "same"),)
    return (p,) if isinstance(p, int) else tuple(p)
