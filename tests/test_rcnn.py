"""R-CNN / SPP-net / Fast R-CNN on external proposals: parts, a tiny fit, the detection format."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_modules.nets.rcnn import (
    BoxHead,
    SpatialPyramidPool,
    build_pooler,
    expand_boxes,
    over_threads,
    postprocess,
    svm_hinge_loss,
    truncated_svd,
    warp_crops,
)
from lit_modules.rcnn import FastRCNNModule, RCNNModule
from scripts.demo import torch_threads

K1 = 11  # 10 digits + background


def _scene(seed: int, size: int = 48, n_random: int = 30) -> tuple[torch.Tensor, dict]:
    """A bright square per object on a dark canvas; proposals = jittered gt + random boxes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(3, size, size)
    boxes, labels = [], []
    for _ in range(2):
        w = int(torch.randint(12, 20, (1,), generator=g))
        x, y = (int(v) for v in torch.randint(0, size - w, (2,), generator=g))
        c = int(torch.randint(1, 3, (1,), generator=g))  # two classes: bright / dim
        img[:, y : y + w, x : x + w] = 1.0 if c == 1 else 0.5
        boxes.append([x, y, x + w, y + w])
        labels.append(c)
    gt = torch.tensor(boxes, dtype=torch.float32)
    jitter = gt.repeat(4, 1) + torch.randn(8, 4, generator=g) * 2
    xy = torch.rand(n_random, 2, generator=g) * (size - 8)
    wh = 6 + torch.rand(n_random, 2, generator=g) * 20
    rand = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
    target = {
        "boxes": gt,
        "labels": torch.tensor(labels),
        "iscrowd": torch.zeros(2, dtype=torch.bool),
        "image_id": seed,
        "proposals": torch.cat([jitter, rand]).float(),
        "proposal_s": 0.01,
    }
    return img, target


def _batches(n: int, per: int = 2) -> list:
    scenes = [_scene(i) for i in range(n * per)]
    return [
        ([s[0] for s in scenes[i : i + per]], [s[1] for s in scenes[i : i + per]])
        for i in range(0, n * per, per)
    ]


def test_warp_shapes_and_context():
    imgs = torch.rand(2, 3, 40, 50)
    boxes = [torch.tensor([[0.0, 0, 10, 20], [5, 5, 30, 35]]), torch.tensor([[1.0, 2, 3, 4]])]
    crops = warp_crops(imgs, boxes, size=28, context=4 / 28)
    assert crops.shape == (3, 3, 28, 28)
    big = expand_boxes(torch.tensor([[10.0, 10, 30, 30]]), context=0.25)
    assert torch.allclose(big, torch.tensor([[0.0, 0, 40, 40]]))
    assert warp_crops(imgs, [torch.zeros(0, 4)] * 2, size=8, context=0).shape == (0, 3, 8, 8)


def test_rois_over_threads_equal_one_call_and_keep_training_on_one() -> None:
    from torchvision.ops import roi_align, roi_pool

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 24, 24, generator=g)
    xy = torch.rand(1200, 2, generator=g) * 70
    boxes = torch.cat([xy, xy + 8 + torch.rand(1200, 2, generator=g) * 40], 1)
    per_image = [boxes[:500], boxes[500:]]
    with torch_threads(2):  # 1,200 RoIs: split in two (MIN_ROIS_PER_THREAD 256)
        with torch.no_grad():  # bitwise: each RoI's output depends on that RoI alone
            for op, kw in ((roi_pool, {}), (roi_align, {"sampling_ratio": 2, "aligned": True})):
                one = op(feats, per_image, output_size=7, spatial_scale=0.25, **kw)
                split = over_threads(op, feats, per_image, output_size=7, spatial_scale=0.25, **kw)
                assert torch.equal(one, split)
            pooled = build_pooler("roi_pool", output_size=7, spatial_scale=0.25)(feats, per_image)
            assert torch.equal(pooled, roi_pool(feats, per_image, 7, 0.25))
            assert torch.equal(over_threads(roi_pool, feats, [boxes[:0], boxes[:0]],
                                            output_size=7, spatial_scale=0.25),
                               torch.zeros(0, 8, 7, 7))  # fmt: skip
        # training: the one call, so the feature gradients sum in the same order
        a, b = feats.clone().requires_grad_(), feats.clone().requires_grad_()
        roi_pool(a, per_image, 7, 0.25).square().sum().backward()
        over_threads(
            roi_pool, b, per_image, output_size=7, spatial_scale=0.25
        ).square().sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_spp_size_independent_of_box():
    fmap = torch.rand(1, 8, 24, 24)
    spp = SpatialPyramidPool((4, 2, 1), spatial_scale=0.25)
    small = spp(fmap, [torch.tensor([[0.0, 0, 12, 12]])])
    large = spp(fmap, [torch.tensor([[0.0, 0, 96, 60]])])
    assert small.shape == large.shape == (1, 8 * 21) == (1, spp.out_features(8))
    for name in ("roi_pool", "roi_align"):
        out = build_pooler(name, output_size=7, spatial_scale=0.25)(fmap, [torch.rand(5, 4) * 40])
        assert out.shape == (5, 8, 7, 7)


def test_head_shapes_and_postprocess():
    head = BoxHead(torch.nn.Flatten(1), in_features=12, num_classes=K1, svm=True)
    feats, logits, deltas = head(torch.rand(6, 3, 2, 2))
    assert feats.shape == (6, 12) and logits.shape == (6, K1) and deltas.shape == (6, 4 * K1)
    assert head.svm(feats).shape == (6, K1 - 1)
    props = torch.tensor([[0.0, 0, 10, 10]] * 6)
    det = postprocess(
        logits.softmax(1), deltas, props, (20, 20), score_threshold=0.0, nms_iou=0.3,
        max_detections=5,
    )  # fmt: skip
    assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 5
    assert det["labels"].min() >= 1


def test_svm_hinge_loss_counts_positives_and_hard_negatives():
    scores = torch.tensor([[0.5, -2.0], [0.0, -0.5], [-3.0, -3.0]], requires_grad=True)
    labels = torch.tensor([1, 0, 0])
    is_gt = torch.tensor([True, False, False])
    iou = torch.tensor([[1.0, 0.0], [0.1, 0.0], [0.0, 0.0]])
    loss = svm_hinge_loss(scores, labels, is_gt, iou, hard_negatives=1)
    # positive (0, class 1): 0.5; hard negatives: row 1 for both classes (1.0, 0.5)
    assert loss.item() == pytest.approx(0.5 + (1.0 + 0.5) / 2)
    loss.backward()
    assert scores.grad[2].abs().sum() == 0  # an easy negative does not count


def _fit(model: pl.LightningModule, steps: int) -> list[float]:
    losses: list[float] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Keep()], num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    loader = DataLoader(_batches(4), batch_size=None, shuffle=False)
    trainer.fit(model, loader)
    return losses


@pytest.mark.parametrize(
    "make",
    [
        lambda: RCNNModule(num_classes=K1, lr=0.02, rois_per_image=16, test_max_proposals=20),
        lambda: FastRCNNModule(num_classes=K1, lr=0.02, pooling="roi_align"),
        lambda: FastRCNNModule(num_classes=K1, lr=0.02, pooling="spp", trainable_conv_stages=0),
    ],
    ids=["rcnn", "fast_rcnn", "sppnet"],
)
def test_tiny_fit_loss_falls_and_detects(make):
    torch.manual_seed(0)
    model = make()
    losses = _fit(model, 24)
    assert sum(losses[-4:]) < sum(losses[:4])
    model.eval()
    images, targets = _batches(1)[0]
    empty = {**targets[1], "proposals": torch.zeros(0, 4)}
    preds = model(images, [targets[0]["proposals"], empty["proposals"]])
    assert set(preds[0]) == {"boxes", "labels", "scores"}
    assert preds[0]["boxes"].shape[1] == 4 and preds[0]["labels"].dtype == torch.long
    assert len(preds[1]["boxes"]) == 0  # no proposals, no detections, no crash


def test_svm_classifier_fits_and_scores():
    torch.manual_seed(0)
    model = RCNNModule(
        num_classes=K1, lr=0.02, rois_per_image=16, classifier="svm", svm_steps=8, svm_lr=0.05
    )
    w0 = model.head.svm.weight.detach().clone()
    losses = _fit(model, 16)
    assert len(losses) == 16
    assert not torch.equal(w0, model.head.svm.weight.detach())  # the SVM phase trained it
    model.eval()
    images, targets = _batches(1)[0]
    preds = model(images, [t["proposals"] for t in targets])
    assert all(((p["scores"] >= 0) & (p["scores"] <= 1)).all() for p in preds)


def test_test_loop_logs_speed_with_and_without_proposals(tmp_path):
    model = FastRCNNModule(num_classes=K1, num_sample_images=0)
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    (out,) = trainer.test(model, DataLoader(_batches(2), batch_size=None))
    for key in ("test/map", "test/map_50", "test/voc07_map_50", "test/images_per_s"):
        assert key in out
    assert out["test/images_per_s_net"] > out["test/images_per_s"]


def test_truncated_svd_keeps_the_layer_close():
    fc = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(64, 32), torch.nn.ReLU())
    with torch.no_grad():  # a rank-4 weight: rank 4 keeps it exactly
        fc[1].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 64))
    x = torch.rand(5, 4, 4, 4)
    thin = truncated_svd(fc, rank=4)
    assert torch.allclose(thin(x), fc(x), atol=1e-4)
    assert thin[1][0].weight.shape == (4, 64) and fc[1].weight.shape == (32, 64)  # a copy


@pytest.mark.parametrize("cls", [RCNNModule, FastRCNNModule], ids=["rcnn", "fast_rcnn"])
def test_fast_dev_run_with_the_proposal_datamodule(cls, tmp_path):
    from datamodules.proposals import ProposalDetectionDataModule

    dm = ProposalDetectionDataModule(
        source="digits", canvas_size=64, num_digits=(1, 2), digit_size=(20, 28), train_length=4,
        eval_length=2, batch_size=2, proposals="sliding", max_proposals=40, cache_dir=None,
    )  # fmt: skip
    model = cls(num_classes=11, num_sample_images=0, test_max_proposals=40)
    trainer = pl.Trainer(
        fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    (out,) = trainer.test(model, datamodule=dm)
    assert "test/map_50" in out and "test/images_per_s_net" in out
