"""Detection metrics: VOC07 11-point AP (hand-computed cases and the devkit's loop written out
plainly) and the COCO size buckets reading the annotation's `area`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_modules.detection import _metric_targets, _new_map
from lit_modules.metrics import VOC07MeanAveragePrecision, voc07_class_aps


def _pred(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _truth(boxes: list[list[float]], labels: list[int], difficult: list[bool]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor(difficult, dtype=torch.bool),
    }


def _voc07(preds: list[dict], targets: list[dict]) -> float:
    metric = VOC07MeanAveragePrecision()
    metric.update(preds, _metric_targets(targets))  # the module's path
    return metric.compute().item()


def test_voc07_map_of_a_hand_computed_case() -> None:
    box = [0.0, 0.0, 10.0, 10.0]
    targets = [
        # A: class 1, a difficult class-1 box, class 2
        _truth([box, [20, 0, 30, 10], [0, 20, 10, 30]], [1, 1, 2], [False, True, False]),
        # B: two class-1 boxes, the second one never detected (a miss)
        _truth([box, [50, 50, 60, 60]], [1, 1], [False, False]),
        # C: only a difficult class-3 box: class 3 has no positive, it is left out of the mean
        _truth([[0, 0, 5, 5]], [3], [True]),
    ]
    preds = [
        _pred(
            [box, [1, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]],
            [0.9, 0.8, 0.7, 0.4],
            [1, 1, 1, 2],
        ),
        _pred([box, box], [0.6, 0.95], [1, 2]),
        _pred([box, [0, 0, 5, 5]], [0.5, 0.99], [1, 3]),
    ]
    # class 1: npos = 3 (A's box, B's two boxes; the difficult one does not count). By score:
    #   0.9 A TP | 0.8 A duplicate of the same box (IoU 0.9) FP | 0.7 A on the difficult box:
    #   ignored | 0.6 B TP | 0.5 C, no class-1 box there, FP
    #   cum TP 1 1 1 2 2, cum FP 0 1 1 1 2 -> recall 1/3 1/3 1/3 2/3 2/3, precision 1 1/2 1/2 2/3 1/2
    #   t = 0, .1, .2, .3: max precision at recall >= t is 1 (4 points)
    #   t = .4, .5, .6: only recall 2/3 -> max(2/3, 1/2) = 2/3 (3 points); t >= .7: 0 (4 points)
    #   AP1 = (4 * 1 + 3 * 2/3) / 11 = 6/11
    # class 2: npos = 1. By score: 0.95 in B (a class-1 box is there, not class 2) FP | 0.4 A TP
    #   recall 0 1, precision 0 1/2 -> every t has max precision 1/2: AP2 = 1/2
    # class 3: only a difficult box, no positive: not in the mean (its 0.99 detection is ignored)
    # mAP = (6/11 + 1/2) / 2 = 23/44
    aps = voc07_class_aps(
        [tuple(p[k].numpy() for k in ("boxes", "scores", "labels")) for p in preds],
        [tuple(t[k].numpy() for k in ("boxes", "labels", "iscrowd")) for t in targets],
    )
    assert aps == pytest.approx({1: 6 / 11, 2: 1 / 2}, abs=1e-12)
    assert _voc07(preds, targets) == pytest.approx(23 / 44, abs=1e-6)


def test_voc07_a_detection_on_an_already_taken_best_box_is_a_duplicate() -> None:
    # The devkit gives each detection its best-IoU box; if that one is taken it is a false
    # positive, even when another free box overlaps it by >= 0.5 (COCO would take that one).
    targets = [_truth([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1], [False, False])]
    # second detection: IoU 95/105 = 0.905 with the taken box, 85/115 = 0.739 with the free one
    preds = [_pred([[0, 0, 10, 10], [0.5, 0, 10.5, 10]], [0.9, 0.8], [1, 1])]
    # npos 2: TP, FP -> recall 1/2 1/2, precision 1 1/2: t = 0 .. .5 give 1, t >= .6 give 0
    assert _voc07(preds, targets) == pytest.approx(6 / 11, abs=1e-6)


def test_voc07_iou_threshold_is_inclusive_and_without_plus_one() -> None:
    # continuous boxes: IoU of [0, 0, 10, 10] and [0, 0, 10, 5] is exactly 50 / 100 = 0.5 -> TP
    # (with the devkit's +1 on these numbers it would be 66 / 121 = 0.545; voc_eval.py's `> 0.5`
    # would reject it). One TP, npos 1: AP = 1.
    targets = [_truth([[0, 0, 10, 10]], [1], [False])]
    assert _voc07([_pred([[0, 0, 10, 5]], [0.9], [1])], targets) == 1.0
    assert _voc07([_pred([[0, 0, 10, 4.9]], [0.9], [1])], targets) == 0.0


def test_voc07_without_ground_truth_is_minus_one_and_empty_images_count() -> None:
    empty = _truth([], [], [])
    assert _voc07([_pred([[0, 0, 5, 5]], [0.5], [1])], [empty]) == -1.0
    # an image without detections and one without objects: recall 1, precision 1
    targets = [_truth([[0, 0, 10, 10]], [1], [False]), empty]
    preds = [_pred([[0, 0, 10, 10]], [0.9], [1]), _pred([], [], [])]
    assert _voc07(preds, targets) == 1.0


def _devkit_loop(dets: list, truths: list, iou_threshold: float = 0.5) -> dict[int, float]:
    """py-faster-rcnn's voc_eval.py (use_07_metric=True) per class, its loop as written there,
    with the devkit's `>=` and continuous IoU (see VOC07MeanAveragePrecision)."""
    classes = sorted({int(c) for _, labels, diff in truths for c in labels[~diff]})
    aps = {}
    for c in classes:
        gts, npos = {}, 0
        for i, (boxes, labels, diff) in enumerate(truths):
            m = labels == c
            gts[i] = {"bbox": boxes[m], "difficult": diff[m], "det": [False] * int(m.sum())}
            npos += int((~diff[m]).sum())
        image_ids, confidence, bbs = [], [], []
        for i, (boxes, scores, labels) in enumerate(dets):
            for b, s, lab in zip(boxes, scores, labels, strict=True):
                if lab == c:
                    image_ids.append(i), confidence.append(float(s)), bbs.append(b)
        order = np.argsort(-np.array(confidence), kind="stable")
        nd = len(order)
        tp, fp = np.zeros(nd), np.zeros(nd)
        for d in range(nd):
            r = gts[image_ids[order[d]]]
            bb = bbs[order[d]].astype(float)
            ovmax, bbgt = -np.inf, r["bbox"].astype(float)
            if bbgt.size > 0:
                ixmin = np.maximum(bbgt[:, 0], bb[0])
                iymin = np.maximum(bbgt[:, 1], bb[1])
                ixmax = np.minimum(bbgt[:, 2], bb[2])
                iymax = np.minimum(bbgt[:, 3], bb[3])
                inters = np.maximum(ixmax - ixmin, 0.0) * np.maximum(iymax - iymin, 0.0)
                uni = (
                    (bb[2] - bb[0]) * (bb[3] - bb[1])
                    + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1])
                    - inters
                )
                overlaps = inters / uni
                ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
            if ovmax >= iou_threshold:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[d], r["det"][jmax] = 1.0, True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        aps[c] = ap
    return aps


def _random_scenes(seed: int, n: int = 15) -> tuple[list[dict], list[dict]]:
    """Truths with difficult boxes and empty images; detections near them (duplicates included),
    stray ones, and scores rounded to 0.1 so that ties happen."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n):
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 30, (m, 2))], 1)
        labels = rng.integers(1, 4, m)
        targets.append(_truth(boxes.tolist(), labels.tolist(), (rng.random(m) < 0.2).tolist()))
        copies = rng.integers(0, 3, m)  # 0, 1 or 2 detections per box
        near = np.repeat(boxes, copies, 0) + rng.normal(0, 3, (int(copies.sum()), 4))
        near_labels = np.repeat(labels, copies)
        near_labels[rng.random(len(near_labels)) < 0.1] = 1  # some with a wrong class
        xy = rng.uniform(0, 80, (int(rng.integers(0, 3)), 2))
        stray = np.concatenate([xy, xy + 15], 1)
        det = np.concatenate([near, stray])
        det_labels = np.concatenate([near_labels, rng.integers(1, 4, len(stray))])
        scores = np.round(rng.random(len(det)), 1)
        preds.append(_pred(det.tolist(), scores.tolist(), det_labels.tolist()))
    return preds, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc07_equals_the_devkit_loop_on_random_scenes(seed: int) -> None:
    preds, targets = _random_scenes(seed)
    dets = [tuple(p[k].numpy() for k in ("boxes", "scores", "labels")) for p in preds]
    truths = [tuple(t[k].numpy() for k in ("boxes", "labels", "iscrowd")) for t in targets]
    expected = _devkit_loop(dets, truths)
    assert expected and voc07_class_aps(dets, truths) == pytest.approx(expected, abs=1e-12)
    metric = VOC07MeanAveragePrecision()
    for i in range(0, len(preds), 4):  # batched updates: the same images, the same order
        metric.update(preds[i : i + 4], _metric_targets(targets[i : i + 4]))
    assert metric.compute().item() == pytest.approx(np.mean(list(expected.values())), abs=1e-6)


def test_coco_size_buckets_use_the_annotation_area() -> None:
    # a 10x10 box (box area 100: small) whose annotation area is 100x100 (large), found exactly
    target = _truth([[0, 0, 10, 10]], [1], [False])
    pred = _pred([[0, 0, 10, 10]], [0.9], [1])
    by_box, by_area = _new_map(), _new_map()
    by_box.update([pred], _metric_targets([target]))
    by_area.update([pred], _metric_targets([{**target, "area": torch.tensor([1e4])}]))
    box, area = by_box.compute(), by_area.compute()
    assert (box["map_small"].item(), box["map_large"].item()) == (1.0, -1.0)
    assert (area["map_small"].item(), area["map_large"].item()) == (-1.0, 1.0)
    assert area["map"].item() == box["map"].item() == 1.0
