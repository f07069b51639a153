"""Box proposals from outside the detector, and how to score them.

- `selective_search`: Uijlings et al. (2013), the proposals of R-CNN, SPP-net and Fast R-CNN, by
  OpenCV's implementation (`cv2.ximgproc`, in the `opencv-contrib-python-headless` wheel).
- `sliding_windows`: dense windows at several sizes and shapes, the exhaustive baseline.
- `ProposalCache`: proposals on disk, keyed by the image's bytes and the settings that made them
  (selective search costs tens of ms per small image, seconds per VOC image).
- `proposal_recall` / `average_recall`: recall of the ground truth by the first k proposals, and
  its mean over IoU 0.5:0.95 (`test/ar_10`, `test/ar_100`, `test/ar_1000`).

Boxes are (N, 4) float32 xyxy in the image's pixels, x2 / y2 exclusive (DigitCanvas's boxes),
in the proposer's rank order. Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

OPENCV_PACKAGE = "opencv-contrib-python-headless"
SS_MODES = ("fast", "quality")
AR_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95 (COCO's)
CACHE_VERSION = 1  # bump when what a cached file holds changes: old files then recompute


# ----------------------------------------------------------------------------- selective search


def opencv_segmentation() -> ModuleType:
    """`cv2`, checked to have the contrib module `ximgproc.segmentation` (plain `opencv-python`
    lacks it), or an ImportError naming the wheel to install."""
    hint = (
        f"selective search needs OpenCV's contrib module cv2.ximgproc: pip install "
        f"{OPENCV_PACKAGE} (plain opencv-python / opencv-python-headless lack ximgproc; "
        "install only one OpenCV wheel)"
    )
    try:
        import cv2
    except ImportError as err:
        raise ImportError(hint) from err
    ximgproc = getattr(cv2, "ximgproc", None)
    if getattr(ximgproc, "segmentation", None) is None:
        raise ImportError(hint)
    return cv2


def _seed_ranking(seed: int) -> None:
    """OpenCV ranks SS regions by `level * std::rand()` (the paper's pseudo-random ranking), so
    the order depends on every earlier call in the process (a DataLoader worker's history). Seeding
    libc's rand before each run makes an image's order a function of the image alone."""
    # no libc symbols (Windows): the order may then vary between calls, the boxes do not
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))


def _rgb_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"selective_search reads an (H, W, 3) RGB uint8 array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"selective_search reads uint8 pixels, got {image.dtype}")
    return image


def selective_search(
    image: np.ndarray,
    *,
    mode: str = "fast",
    max_proposals: int = 2000,
    min_size: int = 4,
    min_side: int | None = 144,
    threads: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Selective search boxes of an (H, W, 3) uint8 RGB image: (N, 4) float32 xyxy, N <= max_proposals.

    mode: "fast" (HSV + Lab, k = 150, 300: the R-CNN / Fast R-CNN setting) or "quality" (more
        colour spaces, k and strategies: more boxes, ~4x slower).
    min_size: boxes narrower or shorter than this (pixels) are dropped.
    min_side: images whose shorter side is below it are upscaled to it first (boxes are mapped
        back): the graph segmentation's k is in pixels, set for ~500 px photographs (R-CNN ran SS
        at 500 px width); on 96 px digit scenes fast mode finds a digit at IoU >= 0.7 for 69% of
        digits at 96 px, 96% at 144 px (50 test scenes). None: the image as given.
    threads: OpenCV's thread count (a process-wide setting). 1 is fastest here: SS is mostly
        serial, and more OpenCV threads fight torch's and the DataLoader workers for the cores
        (96 px fast mode on 2 cores: 23 ms at 1 thread, 38 ms at 2).
    seed: the seed of SS's pseudo-random ranking (the order, not the set of boxes).
    A blank image gives one box (the whole image) or none once filtered; never an error.
    """
    if mode not in SS_MODES:
        raise ValueError(f"selective search mode must be one of {SS_MODES}, got {mode!r}")
    rgb = _rgb_image(image)
    cv2 = opencv_segmentation()
    cv2.setNumThreads(threads)
    h, w = rgb.shape[:2]
    bgr = np.ascontiguousarray(
        rgb[:, :, ::-1]
    )  # OpenCV's channel order: its colour spaces read BGR
    scale = max(1.0, min_side / min(h, w)) if min_side else 1.0
    if scale > 1.0:
        size = (round(w * scale), round(h * scale))  # (width, height), OpenCV's order
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_ranking(seed)
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # (N, 4) x, y, w, h
    boxes = torch.from_numpy(rects)
    boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)  # (N, 4) xyxy
    if scale > 1.0:
        hs, ws = bgr.shape[:2]
        boxes = boxes / torch.tensor([ws / w, hs / h, ws / w, hs / h])
    return clean_boxes(boxes, height=h, width=w, min_size=min_size)[:max_proposals]


_warm = False


def warm_up() -> None:
    """One throw-away selective search per process: OpenCV's first call costs 2-3x a later one
    (lazy initialisation), which a per-image time would otherwise charge to the first image."""
    global _warm
    if not _warm:
        _warm = True
        selective_search(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))


def clean_boxes(
    boxes: torch.Tensor, *, height: int, width: int, min_size: float = 1.0
) -> torch.Tensor:
    """(N, 4) xyxy -> (M, 4) float32: clipped to the image, boxes with a side < min_size dropped,
    exact duplicates dropped (the first kept), the order otherwise kept."""
    boxes = boxes.float().reshape(-1, 4).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh >= min_size).all(dim=1)]
    if len(boxes) < 2:
        return boxes
    _, inverse = torch.unique(boxes, dim=0, return_inverse=True)  # (M,) group of each box
    first = torch.full((int(inverse.max()) + 1,), len(boxes), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(boxes)), reduce="amin")
    return boxes[first.sort().values]


# ----------------------------------------------------------------------------- sliding windows


def sliding_windows(
    height: int,
    width: int,
    *,
    sizes: Sequence[float] = (16, 24, 32, 48, 64, 96),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    stride_fraction: float = 0.25,
    seed: int = 0,
) -> torch.Tensor:
    """Dense windows over a height x width image: (N, 4) float32 xyxy.

    Each size s (the square root of the area) and aspect ratio r (height / width) gives a window
    of w = s / sqrt(r), h = s * sqrt(r), stepped by stride_fraction of its own width / height
    (a finer grid for smaller windows, the last window flush with the far edge); windows larger
    than the image are clipped to it. Windows have no score, so their order is a seeded shuffle:
    the first k are an even sample of the grid (scan order would put them all in one corner).
    On a 96 px image the defaults give ~2,000 windows.
    """
    if not 0 < stride_fraction <= 1:
        raise ValueError(f"stride_fraction must be in (0, 1], got {stride_fraction}")
    grids = [
        _grid(height, width, s / math.sqrt(r), s * math.sqrt(r), stride_fraction)
        for s in sizes
        for r in aspect_ratios
    ]
    boxes = clean_boxes(torch.cat(grids), height=height, width=width)
    order = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))
    return boxes[order]


def _grid(height: int, width: int, w: float, h: float, stride_fraction: float) -> torch.Tensor:
    """(n_y * n_x, 4) windows of size w x h (clipped to the image) on a stride grid."""
    w, h = min(w, width), min(h, height)
    xs = _starts(width - w, max(1.0, w * stride_fraction))
    ys = _starts(height - h, max(1.0, h * stride_fraction))
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")  # (n_y, n_x) each
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).round()


def _starts(span: float, stride: float) -> torch.Tensor:
    """Window starts 0, stride, ... and `span` itself (flush with the far edge)."""
    starts = torch.arange(0.0, span + 1e-6, stride)
    return torch.unique(torch.cat([starts, torch.tensor([span])]))


# ----------------------------------------------------------------------------- cache


@dataclass
class CachedProposals:
    boxes: torch.Tensor  # (N, 4) float32 xyxy
    seconds: float  # what computing them cost (a hit costs ~0, the proposer's time is this)
    hit: bool


def _pixels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
    return np.ascontiguousarray(array)


class ProposalCache:
    """Proposals on disk, one file per (image, settings).

    The file name is a hash of the image's pixel bytes, shape and dtype AND of `settings` (the
    proposer and every option that changes its boxes), so a changed image or setting computes
    anew. The file also records what it was computed from; a file whose record differs from what
    is asked (a collision, a hand-copied file) or that does not load (a crash mid-write by an older
    version, a truncated copy) is recomputed and rewritten, never used. Writes go to a unique
    temporary file then `os.replace`: DataLoader workers (or ranks) writing the same entry at once
    each leave a whole file, and a reader never sees half of one.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.settings = dict(settings)
        # compared as text: a dict read back from disk has lists where the caller gave tuples
        self._settings = json.dumps(self.settings, sort_keys=True, default=str)

    def source(self, image: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """What an entry is computed from: the pixels' digest, their layout, the settings."""
        pixels = _pixels(image)
        return {
            "image_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "shape": list(pixels.shape),
            "dtype": str(pixels.dtype),
            "settings": self._settings,
            "version": CACHE_VERSION,
        }

    def path(self, source: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.pt"  # 256 folders: no directory of 10^5 files

    def lookup(
        self, image: np.ndarray | torch.Tensor, compute_fn: Callable[[Any], torch.Tensor]
    ) -> CachedProposals:
        """The cached boxes of `image`, else `compute_fn(image)` timed, stored and returned."""
        source = self.source(image)
        path = self.path(source)
        cached = self._read(path, source)
        if cached is not None:
            return cached
        found = timed_proposals(image, compute_fn)
        self._write(path, {"source": source, "boxes": found.boxes, "seconds": found.seconds})
        return found

    def get(
        self, image: np.ndarray | torch.Tensor, compute_fn: Callable[[Any], torch.Tensor]
    ) -> torch.Tensor:
        """(N, 4) boxes of `image`: from disk if computed before with these settings."""
        return self.lookup(image, compute_fn).boxes

    def _read(self, path: Path, source: dict[str, Any]) -> CachedProposals | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            boxes, seconds = entry["boxes"], float(entry["seconds"])
            ok = entry["source"] == source and boxes.ndim == 2 and boxes.shape[1] == 4
        except Exception as err:  # any unreadable file is a miss: recompute, then overwrite it
            warnings.warn(
                f"proposal cache: {path} does not load ({err!r}); recomputing", stacklevel=3
            )
            return None
        if not ok:
            warnings.warn(
                f"proposal cache: {path} was computed from other pixels or settings; recomputing",
                stacklevel=3,
            )
            return None
        return CachedProposals(boxes.float(), seconds, hit=True)

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, whole
        finally:
            tmp.unlink(missing_ok=True)


def timed_proposals(
    image: np.ndarray | torch.Tensor, compute_fn: Callable[[Any], torch.Tensor]
) -> CachedProposals:
    """`compute_fn(image)` as (N, 4) float32 boxes, with the seconds it took (no cache)."""
    start = time.perf_counter()
    boxes = compute_fn(image).detach().cpu().float().reshape(-1, 4)
    return CachedProposals(boxes, time.perf_counter() - start, hit=False)


# ----------------------------------------------------------------------------- recall


def _best_ious(
    proposals: torch.Tensor,
    gt: torch.Tensor,
    counts: Sequence[int],
    iou_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(len(counts), G): each gt's best IoU with the first k proposals, for each k."""
    best = torch.zeros(len(counts), len(gt))
    if len(gt) == 0 or len(proposals) == 0:
        return best
    top = max(counts)
    iou = iou_fn(gt.float(), proposals[:top].float())  # (G, min(N, top))
    for i, k in enumerate(counts):
        if k > 0:
            best[i] = iou[:, :k].max(dim=1).values
    return best


def proposal_recall(
    proposals: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    counts: Sequence[int],
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    *,
    iou_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = box_iou,
) -> dict[float, dict[int, float]]:
    """Recall of the ground truth by the first k proposals of each image: {iou: {k: recall}}.

    proposals[i]: (N_i, 4) in rank order; gt_boxes[i]: (G_i, 4). Recall = the share of all gt
    objects (pooled over images, as Hosang et al. and COCO count) whose best IoU with one of their
    image's first k proposals is >= the threshold. An image with fewer than k proposals uses all
    of them. `iou_fn` (gt, proposals) -> (G, N) lets mask proposals use mask IoU. NaN if no gt.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"{len(proposals)} proposal sets for {len(gt_boxes)} images")
    counts = [int(k) for k in counts]
    per_image = [_best_ious(p, g, counts, iou_fn) for p, g in zip(proposals, gt_boxes, strict=True)]
    best = torch.cat(per_image, dim=1) if per_image else torch.zeros(len(counts), 0)  # (K, G)
    total = best.shape[1]
    out: dict[float, dict[int, float]] = {}
    for t in iou_thresholds:
        hits = (best >= t).sum(dim=1).tolist()  # (K,)
        out[float(t)] = {
            k: (h / total if total else float("nan")) for k, h in zip(counts, hits, strict=True)
        }
    return out


def average_recall(
    proposals: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    counts: Sequence[int] = (10, 100, 1000),
    *,
    iou_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = box_iou,
) -> dict[int, float]:
    """{k: AR@k}: recall at k proposals averaged over IoU 0.5, 0.55, ..., 0.95 (COCO's AR; the
    `test/ar_10`, `test/ar_100`, `test/ar_1000` metrics)."""
    recall = proposal_recall(proposals, gt_boxes, counts, AR_IOUS, iou_fn=iou_fn)
    return {int(k): sum(recall[t][k] for t in AR_IOUS) / len(AR_IOUS) for k in counts}
