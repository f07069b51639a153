"""External proposals: selective search, sliding windows, the on-disk cache, recall / AR, the
proposal data module's batch, and the recall script."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from datamodules.detection import DIGIT_SCENES
from datamodules.digits import DigitCanvas
from datamodules.proposals import ProposalDetectionDataModule, to_hwc_uint8
from lit_modules.nets.proposals import (
    ProposalCache,
    average_recall,
    clean_boxes,
    proposal_recall,
    selective_search,
    sliding_windows,
)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    """The detection topic's first 10 test scenes (3 channels)."""
    canvas = DigitCanvas("test", length=10, channels=3, **DIGIT_SCENES)
    return [canvas[i] for i in range(10)]


# ----------------------------------------------------------------------------- selective search


def test_selective_search_boxes_lie_inside_the_image(scenes):
    image = to_hwc_uint8(scenes[0]["image"])  # (96, 96, 3) uint8
    boxes = selective_search(image, max_proposals=2000)
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 0 < len(boxes) <= 2000
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 96).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()  # min_size
    assert len(torch.unique(boxes, dim=0)) == len(boxes)  # no duplicates
    assert torch.equal(selective_search(image), boxes)  # the ranking is seeded: same order
    assert torch.equal(selective_search(image, max_proposals=3), boxes[:3])  # the first in rank


def test_selective_search_recalls_the_digits(scenes):
    """The issue's target: recall >= 0.95 at IoU 0.5 with (at most) 2000 proposals per scene."""
    boxes = [selective_search(to_hwc_uint8(s["image"])) for s in scenes]
    recall = proposal_recall(boxes, [s["boxes"] for s in scenes], counts=[2000])
    assert recall[0.5][2000] >= 0.95


def test_blank_canvas_does_not_crash():
    for image in (np.zeros((96, 96, 3), np.uint8), np.full((5, 7, 3), 200, np.uint8)):
        boxes = selective_search(image)
        assert boxes.shape[1] == 4 and len(boxes) <= 1  # SS gives the whole image, or nothing
    assert selective_search(np.zeros((3, 3, 3), np.uint8), min_size=4).shape == (0, 4)


def test_bad_input_and_mode_are_clear():
    with pytest.raises(ValueError, match="mode"):
        selective_search(np.zeros((8, 8, 3), np.uint8), mode="slow")
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        selective_search(np.zeros((8, 8), np.uint8))


def test_missing_ximgproc_names_the_wheel(monkeypatch):
    """Plain opencv-python has no cv2.ximgproc: the error must say which wheel to install."""
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # cv2 without contrib
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        selective_search(np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "cv2", None)  # no cv2 at all: `import cv2` fails
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        selective_search(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        ProposalDetectionDataModule(cache_dir=None)  # at construction, not in a worker


# ----------------------------------------------------------------------------- boxes


def test_clean_boxes_clips_drops_and_dedupes_in_order():
    boxes = torch.tensor(
        [[5, 5, 20, 20], [-3, 0, 10, 10], [5, 5, 20, 20], [0, 0, 2, 30], [1, 1, 9, 9]]
    )
    out = clean_boxes(boxes, height=16, width=16, min_size=4)
    assert out.tolist() == [[5, 5, 16, 16], [0, 0, 10, 10], [1, 1, 9, 9]]


def test_sliding_windows_cover_the_image_at_several_scales():
    boxes = sliding_windows(96, 96)
    assert boxes.dtype == torch.float32 and 1000 < len(boxes) < 4000
    assert (boxes >= 0).all() and (boxes <= 96).all()
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).unique()
    assert len(areas) >= 6
    assert [0, 0, 96, 96] in boxes.tolist()  # the largest size is clipped to the image
    assert torch.equal(sliding_windows(96, 96), boxes)  # a seeded order


# ----------------------------------------------------------------------------- cache


def _counting(fn):
    calls = []

    def compute(image):
        calls.append(1)
        return fn(image)

    return compute, calls


def test_cache_hit_returns_the_same_boxes(tmp_path, scenes):
    image = to_hwc_uint8(scenes[0]["image"])
    cache = ProposalCache(tmp_path, {"method": "selective_search", "mode": "fast"})
    compute, calls = _counting(selective_search)
    first = cache.lookup(image, compute)
    again = cache.lookup(image, compute)
    assert not first.hit and again.hit and len(calls) == 1
    assert torch.equal(first.boxes, again.boxes) and again.seconds == first.seconds > 0
    assert torch.equal(cache.get(image, compute), first.boxes) and len(calls) == 1
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic write left no temporary file


def test_changed_image_or_setting_recomputes(tmp_path, scenes):
    image = to_hwc_uint8(scenes[0]["image"])
    compute, calls = _counting(
        lambda img: torch.tensor([[0.0, 0.0, float(img.sum() % 50 + 5), 9.0]])
    )
    ProposalCache(tmp_path, {"mode": "fast"}).get(image, compute)
    changed = image.copy()
    changed[0, 0, 0] ^= 1  # one bit of one pixel
    ProposalCache(tmp_path, {"mode": "fast"}).get(changed, compute)
    ProposalCache(tmp_path, {"mode": "quality"}).get(image, compute)
    ProposalCache(tmp_path, {"mode": "fast"}).get(image[:, :-1], compute)  # another shape
    assert len(calls) == 4
    ProposalCache(tmp_path, {"mode": "fast"}).get(changed, compute)
    assert len(calls) == 4  # each of them is now cached


def test_corrupt_or_mismatched_cache_file_recomputes(tmp_path, scenes):
    image = to_hwc_uint8(scenes[0]["image"])
    cache = ProposalCache(tmp_path, {"mode": "fast"})
    compute, calls = _counting(lambda img: torch.tensor([[1.0, 2.0, 30.0, 40.0]]))
    boxes = cache.get(image, compute)
    path = cache.path(cache.source(image))
    path.write_bytes(b"not a torch file")  # a truncated / foreign file
    with pytest.warns(UserWarning, match="does not load"):
        assert torch.equal(cache.get(image, compute), boxes)
    assert len(calls) == 2
    entry = torch.load(path, weights_only=True)  # rewritten whole by the recompute
    entry["source"] = {**entry["source"], "image_sha256": "0" * 64}  # computed from other pixels
    entry["boxes"] = torch.zeros(1, 4)
    torch.save(entry, path)
    with pytest.warns(UserWarning, match="other pixels or settings"):
        assert torch.equal(cache.get(image, compute), boxes)  # the stale boxes are not used
    assert len(calls) == 3
    assert cache.lookup(image, compute).hit


# ----------------------------------------------------------------------------- recall


def test_recall_and_average_recall_on_known_boxes():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    proposals = [
        torch.tensor(
            [
                [50.0, 50.0, 60.0, 60.0],  # rank 1: misses both
                [0.0, 0.0, 10.0, 6.0],  # rank 2: IoU 0.6 with gt 0
                [20.0, 20.0, 30.0, 30.0],  # rank 3: IoU 1.0 with gt 1
                [0.0, 0.0, 10.0, 9.0],  # rank 4: IoU 0.9 with gt 0
            ]
        ),
        torch.tensor([[0.0, 0.0, 5.0, 5.0]]),  # an image without objects counts no gt
    ]
    r = proposal_recall(proposals, gt, counts=[1, 2, 3, 4, 100], iou_thresholds=(0.5, 0.7))
    assert r[0.5] == {1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0, 100: 1.0}
    assert r[0.7] == {1: 0.0, 2: 0.0, 3: 0.5, 4: 1.0, 100: 1.0}
    ar = average_recall(proposals, gt, counts=[2, 3, 4])
    # IoU thresholds 0.5, 0.55, ..., 0.95: gt 0 at 0.6 is recalled at 3 of 10, at 0.9 at 9 of 10
    assert ar[2] == pytest.approx((3 / 10) / 2)
    assert ar[3] == pytest.approx((3 / 10 + 1.0) / 2)
    assert ar[4] == pytest.approx((9 / 10 + 1.0) / 2)
    assert np.isnan(proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)], [5])[0.5][5])
    assert proposal_recall([torch.zeros(0, 4)], [gt[0]], [5])[0.5][5] == 0.0


# ----------------------------------------------------------------------------- data module


def test_datamodule_batch_follows_the_contract(tmp_path):
    dm = ProposalDetectionDataModule(  # proposals computed (and cached) in a worker process
        eval_length=4,
        eval_batch_size=4,
        max_proposals=50,
        num_workers=1,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("test")
    images, targets = next(iter(dm.test_dataloader()))
    assert len(images) == len(targets) == 4 and dm.num_classes == 11
    for i, (image, t) in enumerate(zip(images, targets, strict=True)):
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == t["boxes"].shape[:1]
        assert ((t["labels"] >= 1) & (t["labels"] <= 10)).all() and t["image_id"] == i + 1
        p = t["proposals"]
        assert type(p) is torch.Tensor and p.dtype == torch.float32 and p.shape[1] == 4
        assert 0 < len(p) <= 50 and (p >= 0).all() and (p <= 96).all()
        assert t["proposal_s"] > 0
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 4  # one entry per scene
    again = ProposalDetectionDataModule(
        eval_length=4, eval_batch_size=4, max_proposals=50, cache_dir=str(tmp_path / "cache")
    ).test_dataloader()  # a fresh module (another run): same scenes, cached proposals
    _, cached = next(iter(again))
    for a, b in zip(targets, cached, strict=True):
        assert torch.equal(a["proposals"], b["proposals"]) and torch.equal(a["boxes"], b["boxes"])


def test_fill_cache_shards_fill_what_the_loaders_read(tmp_path):
    kw = {"train_length": 3, "eval_length": 2, "max_proposals": 40, "hflip_prob": 1.0}
    dm = ProposalDetectionDataModule(cache_dir=str(tmp_path / "cache"), **kw)
    parts = [dm.fill_cache(k, 2) for k in range(2)]  # two shards: 2 + 1 train, 1 + 1 val, test
    assert [p[0] for p in parts] == [4, 3] and [p[1] for p in parts] == [4, 3]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 7
    assert dm.fill_cache(0, 1) == (7, 0)  # all there now: nothing computed
    # the loaders then read those entries (a flipped train scene too: looked up before the flip)
    fresh = ProposalDetectionDataModule(cache_dir=None, **kw)
    fresh.setup(None)
    dm.setup(None)
    for name in ("train", "val", "test"):
        for i in range(len(dm._sets[name])):
            _, cached = dm._sets[name][i]
            _, computed = fresh._sets[name][i]
            assert torch.equal(cached["proposals"], computed["proposals"])
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 7  # no entry added by the reads


def test_datamodule_moves_proposals_with_a_flip(tmp_path):
    dm = ProposalDetectionDataModule(
        train_length=2, hflip_prob=1.0, proposals="sliding", max_proposals=30, cache_dir=None
    )
    dm.setup("fit")
    plain = ProposalDetectionDataModule(train_length=2, proposals="sliding", max_proposals=30,
                                        cache_dir=None)  # fmt: skip
    plain.setup("fit")
    _, flipped = dm._sets["train"][0]
    _, kept = plain._sets["train"][0]
    mirror = kept["proposals"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [96, 0, 96, 0]
    )
    assert torch.allclose(flipped["proposals"], mirror)
    assert len(flipped["boxes"]) == len(kept["boxes"])  # sanitize saw the gt alone


def test_datamodule_rejects_unknown_choices():
    with pytest.raises(ValueError, match="proposals"):
        ProposalDetectionDataModule(proposals="edge_boxes", cache_dir=None)
    with pytest.raises(ValueError, match="ss_mode"):
        ProposalDetectionDataModule(ss_mode="slow", cache_dir=None)


# ----------------------------------------------------------------------------- recall script


def _tiny_faster_rcnn_ckpt(path: Path) -> Path:
    from lit_modules.detection import FasterRCNNModule

    module = FasterRCNNModule(
        arch="transfer", num_classes=11, min_size=64, max_size=64,
        anchor_sizes=[[16, 24], [32, 48]], num_sample_images=0,
    )  # fmt: skip
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


def test_recall_script_writes_json_and_figure(tmp_path):
    from scripts.proposal_recall import main

    ckpt = _tiny_faster_rcnn_ckpt(tmp_path / "faster.ckpt")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--scenes", "3", "--methods", "ss_fast", "sliding"]
    curves = main([*argv, "--counts", "1", "10", "300", "--rpn_ckpt", str(ckpt)])
    assert set(curves) == {"selective search (fast)", "sliding windows", "Faster R-CNN RPN"}
    saved = json.loads((out / "proposal_recall.json").read_text())["curves"]
    assert saved == json.loads(json.dumps(curves))
    assert (out / "proposal_recall.png").stat().st_size > 0
    for c in curves.values():
        assert set(c["recall"]) == {"0.5", "0.7"} and list(c["recall"]["0.5"]) == ["1", "10", "300"]
        r = list(c["recall"]["0.5"].values())
        assert r == sorted(r)  # more proposals never lose recall
        assert c["ms_per_image"] > 0
    assert curves["Faster R-CNN RPN"]["proposals_per_image"] <= 300
