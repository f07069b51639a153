"""Detection: COCO / VOC readers and writers, DetectionDataModule, the detectors, FasterRCNNModule."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from datamodules.detection import DIGIT_SCENES, DetectionDataModule, GroupedBatchSampler, collate
from datamodules.digits import DigitCanvas
from datamodules.formats.coco import read_coco
from datamodules.formats.voc import read_voc, voc_xml
from lit_modules.callbacks import PredictionsJSON
from lit_modules.detection import FasterRCNNModule
from lit_modules.nets.detectors import ARCHS, build_faster_rcnn, rpn_proposals
from lit_modules.transfer import TransferClassifier
from scripts.make_digit_canvases import DIGIT_CLASSES, make
from scripts.make_digit_canvases import main as make_main
from tests.test_cli import QUIET, train

SMALL = {  # a tiny, fast detector for tests (random weights)
    "arch": "transfer",
    "num_classes": 11,
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [[16, 24], [32, 48]],
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 32,
    "num_sample_images": 2,
}


def test_channels_last_changes_the_layout_not_the_features() -> None:
    torch.manual_seed(0)
    nchw = FasterRCNNModule(**SMALL).eval()
    nhwc = FasterRCNNModule(**SMALL, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(2, 3, 64, 64)
    a, b = nchw.net.backbone(x), nhwc.net.backbone(x)  # {level: (B, C, h, w)}: what feeds RPN, RoIs
    assert any(f.is_contiguous(memory_format=torch.channels_last) for f in b.values())
    for level in a:
        torch.testing.assert_close(a[level], b[level], atol=1e-5, rtol=1e-5)
    nhwc.train()
    losses = nhwc.net(
        list(x), [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([3])}] * 2
    )
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def _scene_kwargs() -> dict[str, Any]:
    return {"size": 64, "num_digits": (1, 3), "digit_size": (16, 28)}


def _coco_fixture(root: Path, n: int = 4, split: str = "val") -> Path:
    return make("coco", root, n, split, **_scene_kwargs())


def _canvas(split: str, n: int) -> DigitCanvas:
    return DigitCanvas(split, length=n, channels=3, seed=0, **_scene_kwargs())


def _trainer(root: Path, **kw: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )


# ----------------------------------------------------------------------------- formats


def test_coco_round_trip_same_boxes(tmp_path: Path) -> None:
    ann = _coco_fixture(tmp_path, n=5)
    records, cats = read_coco(ann, tmp_path / "val")
    canvas = _canvas("val", 5)
    assert cats == {d + 1: str(d) for d in range(10)} and len(records) == 5
    for i, r in enumerate(records):
        s = canvas[i]
        assert r.image_id == i + 1 and r.file.is_file() and (r.width, r.height) == (64, 64)
        np.testing.assert_allclose(r.boxes, s["boxes"].numpy())
        np.testing.assert_array_equal(r.labels, s["labels"].numpy())


def test_voc_round_trip_same_boxes_and_difficult(tmp_path: Path) -> None:
    make_main(
        ["--format", "voc", "--out", str(tmp_path), "--n", "4", "--split", "val", "--size", "64"]
    )
    records = read_voc(tmp_path, "2007", "val", classes=DIGIT_CLASSES)
    canvas = DigitCanvas("val", length=4, channels=3, **{**DIGIT_SCENES, "size": 64})
    for i, r in enumerate(records):
        assert r.file.suffix == ".jpg" and r.file.is_file() and r.image_id == i + 1
        np.testing.assert_allclose(r.boxes, canvas[i]["boxes"].numpy())
        np.testing.assert_array_equal(r.labels, canvas[i]["labels"].numpy())
    # the difficult flag survives a write / read
    r = records[0]
    r.iscrowd = np.ones(len(r.labels), bool)
    xml = tmp_path / "VOC2007" / "Annotations" / f"{r.file.stem}.xml"
    xml.write_text(voc_xml(r, DIGIT_CLASSES))
    assert read_voc(tmp_path, "2007", "val", classes=DIGIT_CLASSES)[0].iscrowd.all()


# Bad COCO / VOC inputs (malformed files, degenerate boxes, unknown ids...): tests/test_bad_inputs.py


# ----------------------------------------------------------------------------- data


def test_training_batch_with_an_image_without_objects(tmp_path: Path) -> None:
    """COCO fixture where one image has no annotation: it is loaded, batched and trained on."""
    ann = _coco_fixture(tmp_path, n=3, split="train")
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    ann.write_text(json.dumps(data))
    dm = DetectionDataModule(
        source="coco", root=str(tmp_path), train_split="train", val_split="train", batch_size=3
    )
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert dm.num_classes == 11 and sorted(t["image_id"] for t in targets) == [1, 2, 3]
    empty = next(t for t in targets if t["image_id"] == 2)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    module = FasterRCNNModule(**SMALL)
    module.train()
    loss = module.net(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    total = sum(loss.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def _eval_only(source: str, root: Path, **kw: Any) -> DetectionDataModule:
    """COCO / VOC files holding only one split, and a DataModule configured with only that."""
    if source == "coco":
        _coco_fixture(root, n=3, split="test")
        return DetectionDataModule(source="coco", root=str(root), batch_size=2, **kw)
    make("voc", root, 3, "test", **_scene_kwargs())
    return DetectionDataModule(
        source="voc", root=str(root), classes=DIGIT_CLASSES, batch_size=2, **kw
    )


@pytest.mark.parametrize("source", ["coco", "voc"])
def test_evaluate_with_only_the_evaluated_split(tmp_path: Path, source: str) -> None:
    split = "test" if source == "coco" else "2007/test"
    for stage, option in (
        ("test", "test_split"),
        ("predict", "test_split"),
        ("validate", "val_split"),
    ):
        dm = _eval_only(source, tmp_path, **{option: split})
        dm.setup(stage)
        loader = {"test": dm.test_dataloader, "predict": dm.predict_dataloader}.get(
            stage, dm.val_dataloader
        )()
        images, targets = next(iter(loader))
        assert len(images) == 2 and sorted(t["image_id"] for t in targets) == [1, 2], stage
        assert dm.num_classes == 11
    dm = _eval_only(source, tmp_path, test_split=split)
    with pytest.raises(
        ValueError, match=r"stage 'fit' reads the train split, but `train_split` is not set"
    ):
        dm.setup("fit")
    dm = _eval_only(source, tmp_path, val_split=split)  # test falls back to val_split
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 3
    with pytest.raises(ValueError, match=r"stage 'validate' reads the val split, but `val_split`"):
        _eval_only(source, tmp_path, test_split=split).setup("validate")
    with pytest.raises(
        ValueError, match=r"stage 'test' reads the test split, but `root` is not set"
    ):
        DetectionDataModule(source=source, test_split=split).setup("test")


def test_trainer_tests_a_coco_test_set_alone(tmp_path: Path) -> None:
    """What `train.py test --ckpt_path ...` does, with nothing on disk but the test split."""
    dm = _eval_only("coco", tmp_path / "data", test_split="test")
    metrics = _trainer(tmp_path).test(FasterRCNNModule(**SMALL), datamodule=dm, verbose=False)[0]
    assert {"test/map", "test/map_50", "test/voc07_map_50"} <= set(metrics)


def test_augmentation_moves_boxes_with_the_image(tmp_path: Path) -> None:
    _coco_fixture(tmp_path, n=2)
    plain = DetectionDataModule(
        source="coco", root=str(tmp_path), train_split="val", val_split="val"
    )
    flip = DetectionDataModule(
        source="coco", root=str(tmp_path), train_split="val", val_split="val", hflip_prob=1.0
    )
    plain.setup("fit"), flip.setup("fit")
    (x0, t0), (x1, t1) = plain._sets["val"][0], flip._sets["train"][0]
    torch.testing.assert_close(x1, x0.flip(-1))
    w = x0.shape[-1]
    torch.testing.assert_close(t1["boxes"][:, [2, 0]], w - t0["boxes"][:, [0, 2]])
    jitter = DetectionDataModule(
        source="digits", canvas_size=64, scale_jitter=(0.5, 1.5), train_length=8
    )
    jitter.setup("fit")
    for x, t in (jitter._sets["train"][i] for i in range(8)):
        assert x.shape == (3, 64, 64) and len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"])
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 64).all()


def test_grouped_batches_share_an_aspect_ratio_group() -> None:
    groups = [i % 2 for i in range(11)]
    sampler = GroupedBatchSampler(torch.utils.data.SequentialSampler(range(11)), 2, False, groups)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and sorted(i for b in batches for i in b) == list(
        range(11)
    )
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert collate([(1, {"a": 1}), (2, {"a": 2})]) == ([1, 2], [{"a": 1}, {"a": 2}])


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("arch", ARCHS)
def test_every_detector_trains_and_detects(arch: str) -> None:
    net = build_faster_rcnn(arch=arch, num_classes=4, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    net.train()
    loss = sum(net(images, targets).values())
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        out = net(images)
    assert out[0]["boxes"].shape[1] == 4 and net.roi_heads.box_predictor.cls_score.out_features == 4


def test_transfer_backbone_loads_the_classifier_checkpoint(tmp_path: Path) -> None:
    clf = TransferClassifier(backbone="digits_cnn", num_classes=5, mode="scratch")
    path = tmp_path / "source.pt"
    torch.save({"state_dict": clf.state_dict()}, path)
    net = build_faster_rcnn(
        arch="transfer", num_classes=11, weights_backbone=str(path), trainable_backbone_layers=1
    )
    first = net.backbone.body["0"][0]  # the first conv, widened from gray to RGB
    torch.testing.assert_close(first.weight.sum(1, keepdim=True), clf.net.stages[0][0].weight)
    assert not any(p.requires_grad for p in net.backbone.body["0"].parameters())
    assert all(p.requires_grad for p in net.backbone.body["2"].parameters())
    with pytest.raises(ValueError, match="not a cnnlab"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.pt")
        build_faster_rcnn(
            arch="transfer", num_classes=11, weights_backbone=str(tmp_path / "bad.pt")
        )


# ----------------------------------------------------------------------------- module


class _Replay(nn.Module):
    """Stands in for the detector: returns fixed, imperfect detections in loader order."""

    def __init__(self, canvas: DigitCanvas) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.preds = []
        for i in range(len(canvas)):
            s = canvas[i]
            n = len(s["boxes"])
            boxes = s["boxes"] + torch.randn(n, 4, generator=g) * 1.0  # near misses at high IoU
            labels = s["labels"].clone()
            labels[torch.rand(n, generator=g) < 0.2] = 3  # some wrong classes
            fp = torch.rand(2, 2, generator=g) * 40
            boxes = torch.cat([boxes, torch.cat([fp, fp + 15], 1)])  # false positives
            labels = torch.cat([labels, torch.randint(1, 11, (2,), generator=g)])
            self.preds.append(
                {"boxes": boxes, "labels": labels, "scores": torch.rand(n + 2, generator=g)}
            )
        self.cursor = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.preds[self.cursor : self.cursor + len(images)]
        self.cursor += len(images)
        return out


def test_module_map_equals_cocoeval_on_its_predictions_json(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n = 30
    gt_file = make("coco", tmp_path / "gt", n, "test", **_scene_kwargs())
    dm = DetectionDataModule(
        source="digits",
        eval_length=n,
        canvas_size=64,
        num_digits=(1, 3),
        digit_size=(16, 28),
        batch_size=7,
    )
    module = FasterRCNNModule(**SMALL)
    module.net = _Replay(_canvas("test", n))
    trainer = _trainer(tmp_path, callbacks=[PredictionsJSON()])
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    module.net.cursor = 0
    trainer.predict(module, datamodule=dm)
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert set(rows[0]) == {"image_id", "category_id", "bbox", "score"}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(rows), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.1 < ev.stats[0] < 0.95  # a non-trivial mAP
    for key, k in (("test/map", 0), ("test/map_50", 1), ("test/map_75", 2)):
        assert metrics[key] == pytest.approx(ev.stats[k], abs=1e-4), key
    assert metrics["test/images_per_s"] > 0
    assert list((tmp_path / "images").glob("predict_detections_*.png"))


def test_num_classes_mismatch_is_explained(tmp_path: Path) -> None:
    dm = DetectionDataModule(source="digits", eval_length=2, canvas_size=64, digit_size=(16, 28))
    module = FasterRCNNModule(**{**SMALL, "num_classes": 5})
    with pytest.raises(ValueError, match="num_classes 11"):
        _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)


def test_fast_dev_run_of_the_digits_config(tmp_path: Path) -> None:
    clf = TransferClassifier(backbone="digits_cnn", num_classes=5, mode="scratch")
    weights = tmp_path / "digits_source.pt"
    torch.save({"state_dict": clf.state_dict()}, weights)
    train(
        "fit",
        "--config=configs/detection/digits_faster_rcnn.yaml",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.weights_backbone={weights}",
        *QUIET,
    )
    assert list((tmp_path / "images").glob("val_detections_*.png"))


def test_rpn_proposals_in_image_pixels_and_the_caps_restored() -> None:
    torch.manual_seed(0)
    net = build_faster_rcnn(
        arch="transfer", backbone="digits_cnn", num_classes=11, weights_backbone=None,
        min_size=96, max_size=96, anchor_sizes=[[16, 24], [32, 48]], aspect_ratios=[1.0, 2.0],
        rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=10,
    )  # fmt: skip
    net.train()
    wide = torch.rand(3, 96, 192)  # resized to 48 x 96 inside: boxes must come back x2
    (boxes,) = rpn_proposals(net, [wide], top_n=500)
    assert 10 < len(boxes) <= 500 and boxes[:, 2].max() > 96  # beyond the resized width
    assert (boxes[:, 2] <= 192 + 1e-3).all() and (boxes[:, 3] <= 96 + 1e-3).all()
    assert net.training and net.rpn._post_nms_top_n["testing"] == 10  # left as it was


def test_cpu_batches_stay_as_they_come_and_other_devices_still_move() -> None:
    """DetectionScoring skips Lightning's per-tensor move on a CPU run, nothing else."""
    module = FasterRCNNModule(**SMALL)
    batch = ([torch.rand(3, 8, 8)], [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1)}])
    assert module.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    images, targets = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert images[0].device.type == "meta" and targets[0]["boxes"].device.type == "meta"
