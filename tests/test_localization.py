"""BoxRegressor (OverFeat localization) and OverFeatDetector (dense multi-scale detection)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn

from datamodules.detection import DetectionDataModule
from datamodules.localization import (
    LocalizationDataModule,
    LocalizationWindows,
    visible_fractions,
)
from lit_modules.localization import BoxRegressor, LocalizationScores
from lit_modules.nets.convolutionalize import convolutionalize
from lit_modules.nets.localization import (
    box_loss,
    build_localization_net,
    build_trunk,
    decode_boxes,
    dense_detections,
    encode_boxes,
    greedy_merge,
    merge_detections,
)
from lit_modules.overfeat import OverFeatDetector
from lit_modules.transfer import TransferClassifier
from tests.test_cli import QUIET, train

SMALL = {"input_size": 24, "hidden": 16}  # a 3x3 map at stride 8: the cheapest digits net


def _trainer(root: Path, **kw: Any) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kw,
    )  # fmt: skip


# ----------------------------------------------------------------------------- boxes and losses


def test_box_coding_round_trips_and_always_decodes_a_valid_box() -> None:
    boxes = torch.tensor([[3.0, 4.0, 20.0, 38.0], [0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 11.0, 12.0]])
    assert torch.allclose(decode_boxes(encode_boxes(boxes, 40), 40), boxes, atol=1e-4)
    assert decode_boxes(torch.zeros(4), 40).tolist() == [10.0, 10.0, 30.0, 30.0]  # half, centred
    wild = decode_boxes(torch.cat([torch.randn(100, 2), torch.randn(100, 2) * 100], 1), 40)
    assert torch.isfinite(wild).all() and (wild[:, 2:] > wild[:, :2]).all()


@pytest.mark.parametrize("kind", ["smooth_l1", "giou"])
def test_box_loss_is_zero_at_the_target_and_learns_it(kind: str) -> None:
    target = torch.tensor([[4.0, 6.0, 14.0, 30.0], [20.0, 2.0, 38.0, 20.0]])
    assert box_loss(encode_boxes(target, 40), target, size=40, kind=kind) < 1e-4
    offsets = torch.zeros(2, 4, requires_grad=True)
    opt = torch.optim.Adam([offsets], lr=0.05)
    first = box_loss(offsets, target, size=40, kind=kind).item()
    for _ in range(150):
        loss = box_loss(offsets, target, size=40, kind=kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    empty = box_loss(offsets[:0], target[:0], size=40, kind=kind)
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="unknown box loss 'l2'"):
        box_loss(offsets, target, size=40, kind="l2")


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("box_head,outs", [("agnostic", 4), ("per_class", 44)])
def test_net_convolutionalizes_to_the_same_outputs_and_maps(box_head: str, outs: int) -> None:
    net = build_localization_net(input_size=40, hidden=16, box_head=box_head).eval()
    x = torch.randn(2, 1, 40, 40)
    logits, offsets = net(x)
    assert logits.shape == (2, 11) and offsets.shape == (2, outs)
    dense = convolutionalize(net, input_size=40)
    assert dense.stride == 8
    d_logits, d_offsets = dense(x)
    assert (d_logits.flatten(1) - logits).abs().max() <= 1e-4
    assert (d_offsets.flatten(1) - offsets).abs().max() <= 1e-4
    big_logits, big_offsets = dense(torch.randn(1, 1, 96, 80))
    assert big_logits.shape == (1, 11, 8, 6) and big_offsets.shape == (1, outs, 8, 6)
    logits.sum().backward()  # finite gradients through both heads' trunk
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_trunk_loads_a_transfer_classifier_checkpoint(tmp_path: Path) -> None:
    clf = TransferClassifier(backbone="digits_cnn", num_classes=10, mode="scratch")
    path = tmp_path / "digits_classifier.pt"
    torch.save({"state_dict": clf.state_dict()}, path)
    trunk = build_trunk(weights=str(path), pool=2)
    assert isinstance(trunk[-1], nn.MaxPool2d) and len(trunk) == 4  # 3 conv stages + pool
    conv = next(m for m in trunk.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(conv.weight, clf.net.stages[0][0].weight)
    with pytest.raises(ValueError, match="pool must be >= 1"):
        build_trunk(pool=0)


# ----------------------------------------------------------------------------- merging


def test_greedy_merge_fuses_overlapping_boxes_weighted_and_adds_scores() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    scores = torch.tensor([0.9, 0.3, 0.8])
    merged, total = greedy_merge(boxes, scores, iou_threshold=0.5)
    order = total.argsort(descending=True)
    merged, total = merged[order], total[order]
    assert total.tolist() == pytest.approx([1.2, 0.8])
    assert merged[0].tolist() == pytest.approx([0.25, 0.0, 10.25, 10.0])  # 0.9 / 0.3 weights
    assert merged[1].tolist() == [40.0, 40.0, 50.0, 50.0]
    apart, _ = greedy_merge(boxes, scores, iou_threshold=0.95)  # IoU 0.82: too little
    assert len(apart) == 3


def test_merge_keeps_classes_apart_and_offers_nms() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    parts = [
        {"boxes": box.repeat(3, 1), "labels": torch.tensor([1, 1, 2]),
         "scores": torch.tensor([0.5, 0.4, 0.3])},
        {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.6])},
    ]  # fmt: skip
    greedy = merge_detections(parts, merge="greedy")
    assert greedy["labels"].tolist() == [1, 2]
    assert greedy["scores"].tolist() == pytest.approx([1.5, 0.3])
    nms = merge_detections(parts, merge="nms")
    assert nms["labels"].tolist() == [1, 2] and nms["scores"].tolist() == pytest.approx([0.6, 0.3])
    blind = merge_detections(parts, merge="greedy", cross_class_iou=0.5)
    assert blind["labels"].tolist() == [1]
    with pytest.raises(ValueError, match="unknown merge 'vote'"):
        merge_detections(parts, merge="vote")


class _OneCell(nn.Module):
    """A stand-in dense net: at every scale, only map cell (1, 2) is a confident class 3; its
    box offsets are 0 (the window's central half), class 3's own box (per-class) is 2x wider."""

    def __init__(self, per_class: bool) -> None:
        super().__init__()
        self.per_class = per_class

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = (x.shape[-2] - 16) // 8 + 1, (x.shape[-1] - 16) // 8 + 1
        logits = torch.zeros(len(x), 4, h, w)
        logits[:, 3, 1, 2] = 10.0
        offsets = torch.zeros(len(x), 16 if self.per_class else 4, h, w)
        if self.per_class:  # softplus(t) = 2 ln 2: twice the width
            offsets[:, 3 * 4 + 2, 1, 2] = math.log(3.0)
        return logits, offsets


@pytest.mark.parametrize("per_class", [False, True])
def test_dense_detections_map_cells_back_to_image_pixels(per_class: bool) -> None:
    parts = dense_detections(
        _OneCell(per_class), torch.zeros(1, 1, 64, 64), window=16, stride=8,
        scales=[1.0, 0.5, 0.2], per_class=per_class, score_threshold=0.5,
    )[0]  # fmt: skip
    assert len(parts) == 2  # at 0.2 the image (12 px) is smaller than the window: skipped
    # cell (1, 2): window corner (16, 8) in the resized image, box = its central half
    x0, x1 = (16.0, 32.0) if per_class else (20.0, 28.0)
    assert parts[0]["boxes"][0].tolist() == pytest.approx([x0, 12.0, x1, 20.0])
    assert parts[1]["boxes"][0].tolist() == pytest.approx([2 * x0, 24.0, 2 * x1, 40.0])  # at 0.5
    assert parts[0]["labels"].tolist() == [3] and parts[0]["scores"].item() > 0.99
    with pytest.raises(ValueError, match="smaller than the net's 16x16 window"):
        dense_detections(
            _OneCell(per_class), torch.zeros(1, 1, 12, 40), window=16, stride=8, scales=[1.0],
            per_class=per_class, score_threshold=0.5,
        )  # fmt: skip


# ----------------------------------------------------------------------------- data


def test_visible_fractions_are_float32_division_exactly() -> None:
    # the window search compares these shares with thresholds as NumPy did on float32 arrays:
    # the plain-Python shares must be float32's quotients, bit for bit, and compare the same
    g = np.random.default_rng(0)
    for _ in range(300):
        xy = g.integers(0, 80, size=(3, 2))
        boxes = np.concatenate([xy, xy + g.integers(1, 40, size=(3, 2))], 1)  # (3, 4)
        x, y = g.integers(0, 60, size=2).tolist()
        window = (x, y, x + 40, y + 40)
        f = boxes.astype(np.float32)
        w = np.maximum(np.minimum(f[:, 2], window[2]) - np.maximum(f[:, 0], window[0]), 0)
        h = np.maximum(np.minimum(f[:, 3], window[3]) - np.maximum(f[:, 1], window[1]), 0)
        expected = (w * h / ((f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1]))).astype(np.float32)
        assert visible_fractions(boxes.tolist(), window) == expected.tolist()
    # 3 of 10 px visible: float32(0.3) rounds up, so it is <= float32(0.3), not <= 0.3 in float64
    (share,) = visible_fractions([[0, 0, 10, 1]], (7, 0, 47, 40))
    assert share == float(np.float32(0.3)) and share > 0.3


def test_windows_hold_one_whole_digit_or_background() -> None:
    ds = LocalizationWindows(
        "train", length=60, size=40, digit_size=(20, 36), scene_size=96, background_fraction=0.4
    )
    labels = torch.stack([ds[i][1]["labels"] for i in range(60)])
    assert 10 <= int((labels == 0).sum()) <= 40 and labels.max() <= 10
    for i in range(60):
        image, target = ds[i]
        assert image.shape == (1, 40, 40)
        if target["labels"] > 0:
            box = target["boxes"]
            assert box[:2].min() >= 0 and box[2:].max() <= 40 and (box[2:] > box[:2]).all()
            inside = image[0, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])]
            assert inside.max() > 0.5  # the digit's ink is there
    assert torch.equal(ds[7][0], ds[7][0])  # a pure function of the index
    val = LocalizationWindows("val", length=5, size=40, digit_size=(20, 36))
    assert all(val[i][1]["labels"] > 0 for i in range(5))
    with pytest.raises(ValueError, match="set scene_size"):
        LocalizationWindows(length=1, background_fraction=0.3)
    with pytest.raises(ValueError, match="min_visible"):
        LocalizationWindows(length=1, min_visible=0.2)
    with pytest.raises(ValueError, match="<= the window size 24, got \\(20, 36\\)"):
        LocalizationDataModule(canvas_size=24, digit_size=(20, 36))


# ----------------------------------------------------------------------------- modules


def test_localization_scores_follow_the_ilsvrc_criterion() -> None:
    m = LocalizationScores()
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[0.0, 0.0, 4.0, 4.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 4.0],
                         [0.0, 0.0, 1.0, 1.0]])  # fmt: skip
    m.update(pred, torch.tensor([1, 2, 1, 5]), truth, torch.tensor([1, 1, 1, 0]))  # last: bg
    out = m.compute()  # right+IoU 1 / wrong class / IoU 0.4: only the first is localized
    assert out["loc_acc"].item() == pytest.approx(1 / 3)
    assert out["acc"].item() == pytest.approx(2 / 3)
    assert out["mean_iou"].item() == pytest.approx((1 + 1 + 0.4) / 3)


def test_box_regressor_fast_dev_run_and_a_tiny_run_learns(tmp_path: Path) -> None:
    dm = LocalizationDataModule(
        canvas_size=24, digit_size=(12, 20), scene_size=48, background_fraction=0.3,
        train_length=32, eval_length=8, batch_size=16, eval_batch_size=8,
    )  # fmt: skip
    module = BoxRegressor(**SMALL, box_loss="giou", trainable_stages=1, num_sample_images=4)
    before = {k: v.clone() for k, v in module.net.features[:2].state_dict().items()}
    _trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=dm)
    after = module.net.features[:2].state_dict()  # frozen: weights AND BatchNorm statistics
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert list((tmp_path / "images").glob("val_boxes_*.png"))
    rows = module.format_predictions(_trainer(tmp_path).predict(module, datamodule=dm))
    assert len(rows) == 8 and set(rows[0]) == {"index", "label", "score", "box"}
    # one fixed batch, 30 steps: both losses fall
    torch.manual_seed(0)
    module = BoxRegressor(**SMALL, dropout=0.0, lr=0.01, scheduler="none")
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        logits, offsets = module(images)
        obj = targets["labels"] > 0
        cls = nn.functional.cross_entropy(logits, targets["labels"])
        box = box_loss(offsets[obj], targets["boxes"][obj], size=24)
        opt.zero_grad()
        (cls + box).backward()
        opt.step()
        losses.append((cls.item(), box.item()))
    assert losses[-1][0] < 0.3 * losses[0][0] and losses[-1][1] < 0.5 * losses[0][1]


def test_box_regressor_channels_last_changes_the_layout_not_the_outputs() -> None:
    torch.manual_seed(0)
    nchw = BoxRegressor(**SMALL).eval()
    nhwc = BoxRegressor(**SMALL, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    conv = next(m for m in nhwc.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(5, 1, 24, 24)
    for a, b in zip(nchw(x), nhwc(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_box_regressor_rejects_bad_settings_and_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="unknown box_loss 'l2'"):
        BoxRegressor(**SMALL, box_loss="l2")
    with pytest.raises(ValueError, match="trainable_stages must be in 0..3"):
        BoxRegressor(**SMALL, trainable_stages=5)
    with pytest.raises(ValueError, match="reads \\(B, C, 24, 24\\) windows"):
        BoxRegressor(**SMALL)(torch.zeros(1, 1, 40, 40))


def test_overfeat_loads_a_regressor_and_scores_scenes(tmp_path: Path) -> None:
    regressor = BoxRegressor(**SMALL, box_head="per_class").eval()
    path = tmp_path / "box_regressor.pt"
    torch.save({"state_dict": regressor.state_dict()}, path)
    det = OverFeatDetector(weights=str(path), **SMALL, box_head="per_class", scales=[0.5, 1.0])
    x = torch.rand(2, 1, 24, 24)
    logits, _ = det.dense(det.normalizer(x))
    assert torch.allclose(logits.flatten(1), regressor(x)[0], atol=1e-4)
    dm = DetectionDataModule(canvas_size=48, digit_size=(16, 24), eval_length=4, eval_batch_size=2)
    trainer = _trainer(tmp_path)
    trainer.test(det, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/map_50"]) <= 1.0
    with pytest.raises(ValueError, match="does not match the net"):
        OverFeatDetector(weights=str(path), **{**SMALL, "hidden": 8}, box_head="per_class")
    other = tmp_path / "classifier.pt"
    torch.save({"state_dict": TransferClassifier(mode="scratch").state_dict()}, other)
    with pytest.raises(ValueError, match="holds no BoxRegressor weights"):
        OverFeatDetector(weights=str(other), **SMALL)
    with pytest.raises(ValueError, match="smaller than the net's 24x24 window"):
        det([torch.rand(3, 20, 20)])
    with pytest.raises(ValueError, match="has 5: they must agree"):
        _trainer(tmp_path).test(OverFeatDetector(**SMALL, num_classes=5), datamodule=dm)


def test_configs_train_then_detect(tmp_path: Path) -> None:
    """The two configs fit together: the regressor's export loads into the detector's net."""
    clf = tmp_path / "digits_classifier.pt"
    torch.save({"state_dict": TransferClassifier(mode="scratch").state_dict()}, clf)
    train(
        "fit", "--config=configs/localization/digits_box_regressor.yaml",
        "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
        f"--model.weights={clf}", *QUIET,
    )  # fmt: skip
    export = tmp_path / "weights" / "digits_box_regressor.pt"
    assert export.is_file()
    cfg = yaml.safe_load(Path("configs/localization/digits_overfeat.yaml").read_text())
    args = {**cfg["model"]["init_args"], "weights": str(export)}
    det = OverFeatDetector(**args)
    data = {**cfg["data"]["init_args"], "eval_length": 2, "eval_batch_size": 2}
    trainer = _trainer(tmp_path)
    trainer.test(det, datamodule=DetectionDataModule(**data), verbose=False)
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"test/map", "test/map_50", "test/voc07_map_50", "test/images_per_s"} <= set(got)
    assert got["test/images_per_s"] > 0 and 0.0 <= got["test/map_50"] <= 1.0
