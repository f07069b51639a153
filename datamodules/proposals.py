"""ProposalDetectionDataModule: detection data whose targets carry external object proposals.

R-CNN, SPP-net and Fast R-CNN classify boxes proposed outside the network. The batch is the
detection topic's, `(list[Tensor (3, H, W) float in [0, 1]], list[target])`, and each target
gains `proposals` ((N, 4) float32 xyxy in the image's pixels, in the proposer's rank order) and
`proposal_s` (the seconds they cost, the computing run's even when they come from the cache, so
`test/images_per_s` counts them).

Proposals are computed in the data set's `__getitem__`, so in the DataLoader's workers, from the
image as read (before augmentation), through a `ProposalCache` on disk: selective search runs
once per image across epochs, runs and detectors (R-CNN, SPP-net and Fast R-CNN share entries).
Augmentation moves the proposals with the gt boxes (both are `tv_tensors.BoundingBoxes` through
the same transform call); proposals a crop makes degenerate are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.detection import DIGIT_SCENES, DetectionDataModule, Target, _Detection, _plain
from lit_modules.nets.proposals import (
    SS_MODES,
    CachedProposals,
    ProposalCache,
    clean_boxes,
    opencv_segmentation,
    selective_search,
    sliding_windows,
    timed_proposals,
    warm_up,
)

METHODS = ("selective_search", "sliding", "deepmask", "none")
MODES = SS_MODES  # the name an earlier draft of this module exported


def to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8, or float in [0, 1], C = 1 or 3 -> (H, W, 3) uint8: what OpenCV reads."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    if rgb.dtype != torch.uint8:
        rgb = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).contiguous().numpy()


@dataclass
class Proposer:
    """The proposals of one image (picklable: DataLoader workers get a copy)."""

    method: str = "selective_search"
    ss_mode: str = "fast"
    max_proposals: int = 2000
    min_side: int | None = 144
    cache_dir: str | None = None
    deepmask_checkpoint: str | None = None
    _cache: ProposalCache | None = field(default=None, init=False, repr=False, compare=False)
    _deepmask: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_deepmask": None}  # a worker loads its own copy of the net

    def check_deepmask(self) -> str:
        """The DeepMask checkpoint's path, or a FileNotFoundError saying what is missing."""
        path = self.deepmask_checkpoint
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                "proposals=deepmask needs deepmask_checkpoint, a DeepMaskModule checkpoint "
                f"(train configs/deepmask/digits_deepmask.yaml); not found: {path}"
            )
        return path

    def deepmask(self) -> Any:
        """The DeepMaskModule of `deepmask_checkpoint`, loaded once per process, in eval mode."""
        if self._deepmask is None:
            from lit_modules.deepmask import DeepMaskModule

            # weights=None: the checkpoint holds the whole net; the trunk's file is not needed
            module = DeepMaskModule.load_from_checkpoint(
                self.check_deepmask(), map_location="cpu", weights=None
            )
            self._deepmask = module.eval()
        return self._deepmask

    def settings(self) -> dict[str, Any]:
        """Everything that changes the boxes: the cache key's half that is not the pixels."""
        settings: dict[str, Any] = {"method": self.method, "max_proposals": self.max_proposals}
        if self.method == "selective_search":
            cv2 = opencv_segmentation()  # the clear ImportError at setup, not in a worker
            settings.update(mode=self.ss_mode, min_size=4, min_side=self.min_side, seed=0)
            settings["opencv"] = cv2.__version__  # another build may segment differently
        return settings

    def compute(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, 4) float32 xyxy boxes of (H, W, 3) uint8 pixels."""
        if self.method == "selective_search":
            warm_up()
            return selective_search(pixels, mode=self.ss_mode, max_proposals=self.max_proposals,
                                    min_side=self.min_side)  # fmt: skip
        if self.method == "sliding":
            return sliding_windows(pixels.shape[0], pixels.shape[1])[: self.max_proposals]
        if self.method == "deepmask":  # the boxes of its best masks (issue 13), best first
            from lit_modules.deepmask import deepmask_proposals

            model = self.deepmask()
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255  # (3, H, W)
            image = image[: model.hparams.in_channels]  # gray scenes: R = G = B
            boxes, _ = deepmask_proposals(model, image, top_k=self.max_proposals)
            return boxes
        return torch.zeros(0, 4)  # "none": R-CNN then trains on the gt boxes alone

    def __call__(self, pixels: np.ndarray) -> CachedProposals:
        if self.cache_dir is None or self.method != "selective_search":  # cheap or net-made
            return timed_proposals(pixels, self.compute)
        if self._cache is None:  # made in the worker that uses it (settings() imports cv2)
            self._cache = ProposalCache(Path(self.cache_dir), self.settings())
        return self._cache.lookup(pixels, self.compute)


def _split_sanitize(transform: v2.Transform) -> tuple[v2.Transform, list[v2.Transform]]:
    """(the steps before, the SanitizeBoundingBoxes steps) of a detection transform: sanitize
    filters every BoundingBoxes in its input by the first one's mask, so it must see the gt alone."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    sanitize = [t for t in steps if isinstance(t, v2.SanitizeBoundingBoxes)]
    rest = [t for t in steps if not isinstance(t, v2.SanitizeBoundingBoxes)]
    return v2.Compose(rest), sanitize


class WithProposals(Dataset):
    """A detection data set (DigitScenes, RecordDataset) whose targets carry `proposals` and
    `proposal_s`; its own transform (with the proposals riding along) is applied here."""

    def __init__(self, inner: _Detection, proposer: Proposer) -> None:
        self.inner, self.proposer = inner, proposer
        self.transform, self.sanitize = _split_sanitize(inner.transform)

    def __len__(self) -> int:
        return len(self.inner)

    def aspect_ratios(self) -> list[float]:
        return self.inner.aspect_ratios()  # type: ignore[attr-defined]

    def lookup(self, index: int) -> tuple[torch.Tensor, dict, Any, CachedProposals]:
        """Sample `index` before its transform, and its proposals (from the cache, or computed
        and cached): `(image (3, H, W) uint8 or float [0, 1], objects, image_id, found)`."""
        image, objects, image_id = self.inner._sample(index)
        return image, objects, image_id, self.proposer(to_hwc_uint8(image))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, objects, image_id, found = self.lookup(index)
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(objects["boxes"], format="XYXY", canvas_size=(h, w))
        proposals = tv_tensors.BoundingBoxes(found.boxes, format="XYXY", canvas_size=(h, w))
        target = {**objects, "boxes": boxes, "image_id": image_id}
        # one call: a random flip / crop draws its parameters once for image, gt and proposals
        image, target, proposals = self.transform(tv_tensors.Image(image), target, proposals)
        for step in self.sanitize:
            image, target = step(image, target)
        image, target = _plain(image, target)
        h, w = image.shape[-2:]
        kept = clean_boxes(proposals.as_subclass(torch.Tensor), height=h, width=w)  # (N', 4)
        return image, {**target, "proposals": kept, "proposal_s": found.seconds}


class ProposalDetectionDataModule(DetectionDataModule):
    """DetectionDataModule (digits, coco or voc) whose targets carry each image's proposals.

    Args (the others are DetectionDataModule's):
        proposals: `selective_search` (OpenCV contrib, `pip install opencv-contrib-python-headless`),
            `sliding` windows (the exhaustive baseline), `deepmask` (the boxes of a trained
            DeepMask's top masks, dense multi-scale inference per image) or `none` (gt boxes only).
        deepmask_checkpoint: proposals=deepmask: the DeepMaskModule checkpoint (.ckpt).
        ss_mode: selective search's `fast` (R-CNN's setting) or `quality`.
        max_proposals: the first N in the proposer's ranking (2,000 in R-CNN / Fast R-CNN).
        ss_min_side: images whose shorter side is below it are upscaled for selective search
            (boxes mapped back); its k is in pixels, set for ~500 px photographs. null: as read.
        cache_dir: the on-disk proposal cache, keyed by each image's pixels and these settings
            (safe to share between runs, detectors and data sets); null: no cache, recompute.
    """

    def __init__(
        self,
        source: Literal["digits", "coco", "voc"] = "digits",
        root: str | None = None,
        train_split: str | list[str] | None = None,
        val_split: str | list[str] | None = None,
        test_split: str | list[str] | None = None,
        classes: list[str] | None = None,
        canvas_size: int = DIGIT_SCENES["size"],
        num_digits: tuple[int, int] = DIGIT_SCENES["num_digits"],
        digit_size: tuple[int, int] = DIGIT_SCENES["digit_size"],
        background: Literal["black", "noise", "gradient"] = "black",
        clutter: int = 0,
        train_length: int = 16000,
        eval_length: int = 500,
        hflip_prob: float = 0.0,
        photometric: bool = False,
        scale_jitter: tuple[float, float] | None = None,
        crop_size: int | None = None,
        group_aspect_ratio: bool = False,
        val_holdout: int | float | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        proposals: Literal["selective_search", "sliding", "deepmask", "none"] = "selective_search",
        ss_mode: Literal["fast", "quality"] = "fast",
        max_proposals: int = 2000,
        ss_min_side: int | None = 144,
        cache_dir: str | None = "runs/proposals_cache",
        deepmask_checkpoint: str | None = None,
    ) -> None:
        if proposals not in METHODS:
            raise ValueError(f"unknown proposals {proposals!r}; valid: {', '.join(METHODS)}")
        if ss_mode not in SS_MODES:
            raise ValueError(f"unknown ss_mode {ss_mode!r}; valid: {', '.join(SS_MODES)}")
        if max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
        super().__init__(
            source=source, root=root, train_split=train_split, val_split=val_split,
            test_split=test_split, classes=classes, canvas_size=canvas_size,
            num_digits=num_digits, digit_size=digit_size, background=background, clutter=clutter,
            train_length=train_length, eval_length=eval_length, hflip_prob=hflip_prob,
            photometric=photometric, scale_jitter=scale_jitter, crop_size=crop_size,
            group_aspect_ratio=group_aspect_ratio, val_holdout=val_holdout,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            seed=seed,
        )  # fmt: skip
        self.save_hyperparameters()  # the parent's call recorded its own arguments only
        self.proposer = Proposer(
            proposals, ss_mode, max_proposals, ss_min_side, cache_dir, deepmask_checkpoint
        )
        self.proposer.settings()  # a missing cv2.ximgproc fails here, with the pip hint
        if proposals == "deepmask":
            # checked here, loaded at first use: a LightningModule built inside this __init__
            # would record the CLI's hyperparameters of this DataModule as its own
            self.proposer.check_deepmask()

    def fill_cache(self, shard: int = 0, shards: int = 1) -> tuple[int, int]:
        """Look up (computing what is missing) the proposals of every `shards`-th train, val and
        test image from `shard` on: what the loaders' first pass does, image by image, so that
        several processes can share a cold cache's selective search (one thread each).
        Returns (images looked up, images computed)."""
        self.setup(None)
        seen = computed = 0
        for name in ("train", "val", "test"):
            ds = self._sets[name]
            for part in ds.datasets if isinstance(ds, ConcatDataset) else [ds]:
                for i in range(shard, len(part), shards):
                    computed += not part.lookup(i)[3].hit
                    seen += 1
        return seen, computed

    def _build(self, name: str, stage: str | None) -> Dataset:
        ds = super()._build(name, stage)
        if isinstance(ds, ConcatDataset):  # several coco / voc splits
            return ConcatDataset([WithProposals(p, self.proposer) for p in ds.datasets])
        return WithProposals(ds, self.proposer)  # type: ignore[arg-type]
