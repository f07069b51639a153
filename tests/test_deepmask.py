"""DeepMask: net shapes, the window rule, the loss, average recall, COCO segm files, a fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from datamodules.deepmask import (
    DeepMaskDataModule,
    coco_segm_ar,
    coco_segm_gt,
    load_coco_segm_results,
    segm_rows,
    window_labels,
)
from lit_modules.deepmask import (
    DeepMaskModule,
    average_recall,
    best_iou_at,
    deepmask_masks,
    deepmask_proposals,
    mask_iou,
)
from lit_modules.nets.deepmask import (
    build_deepmask,
    mask_boxes,
    multiscale_proposals,
    paste_masks,
)

RULE = {"patch_size": 32, "canonical_size": 16.0, "pos_offset": 2.0, "neg_offset": 4.0,
        "pos_scale": 0.25, "neg_scale": 1.0}  # fmt: skip


def tiny_data(**kw: object) -> DeepMaskDataModule:
    args = {"train_scenes": 20, "train_length": 64, "val_length": 2, "test_length": 2,
            "batch_size": 32, "eval_batch_size": 2, "mask_size": 16}  # fmt: skip
    return DeepMaskDataModule(**{**args, **kw})


def tiny_module(**kw: object) -> DeepMaskModule:
    args = {"mask_size": 16, "rank": 32, "score_hidden": 32, "compare_selective_search": False,
            "top_k": 50, "num_sample_images": 0}  # fmt: skip
    return DeepMaskModule(**{**args, **kw})


# ----------------------------------------------------------------------------- net


def test_net_shapes_patch_and_dense() -> None:
    net = build_deepmask(patch_size=32, mask_size=16).eval()
    assert net.stride == 4 and net.map_size == (8, 8)
    masks, scores = net(torch.rand(3, 1, 32, 32))
    assert masks.shape == (3, 16, 16) and scores.shape == (3,)
    dense_masks, dense_scores = net.dense(torch.rand(2, 1, 96, 80))
    ny, nx = (96 - 32) // 4 + 1, (80 - 32) // 4 + 1  # one cell per window, stride 4
    assert dense_masks.shape == (2, 256, ny, nx) and dense_scores.shape == (2, ny, nx)
    assert net.upsample(masks).shape == (3, 32, 32)
    net.train()
    masks, scores = net(torch.rand(3, 1, 32, 32))
    (masks.sum() + scores.sum()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="smaller than the 32 px window"):
        net.dense(torch.rand(1, 1, 20, 20))


def test_dense_cell_is_the_window() -> None:
    """A cell of the dense map is the net on that window, up to the trunk's zero padding (a
    window's border sees padding where the whole image has black pixels: tiny differences)."""
    torch.manual_seed(0)
    net = build_deepmask(patch_size=32, mask_size=16).eval()
    x = torch.zeros(1, 1, 64, 64)
    x[..., 20:36, 20:36] = torch.rand(16, 16)
    with torch.no_grad():
        dm, ds = net.dense(x)
        pm, ps = net(x[..., 12:44, 12:44])  # the window at cell (3, 3): top-left (12, 12)
    assert torch.allclose(ds[0, 3, 3], ps[0], atol=1e-2)
    assert torch.allclose(dm[0, :, 3, 3].view(16, 16), pm[0], atol=1e-2)
    same = (dm[0, :, 3, 3].view(16, 16) - pm[0]).abs().max()
    neighbour = (dm[0, :, 2, 3].view(16, 16) - pm[0]).abs().max()  # another window
    assert neighbour > 5 * same


@pytest.mark.parametrize("mask_size", [16, 32])
def test_refinement_corrects_the_coarse_mask_from_the_window(mask_size: int) -> None:
    """refine_channels adds a small CNN over the window's pixels (at mask resolution) and the
    coarse logits; it trains with the rest, and 0 leaves the paper's DeepMask untouched."""
    torch.manual_seed(0)
    plain = build_deepmask(patch_size=32, mask_size=mask_size)
    torch.manual_seed(0)
    net = build_deepmask(patch_size=32, mask_size=mask_size, refine_channels=4)
    assert plain.refine is None and net.refine is not None
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        masks, scores = net.eval()(x)
        coarse, same_scores = plain.eval()(x)  # same seed, same trunk and branches
    assert masks.shape == coarse.shape == (3, mask_size, mask_size)
    assert torch.equal(scores, same_scores) and not torch.allclose(masks, coarse)
    assert torch.allclose(masks, net.refined(x, coarse))
    net.train()(x)[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.refine.parameters())


def test_only_the_top_windows_are_refined_each_on_its_own_pixels() -> None:
    torch.manual_seed(0)
    net = build_deepmask(patch_size=32, mask_size=16, refine_channels=4).eval()
    image = torch.zeros(1, 80, 72)
    image[:, 20:50, 24:44] = torch.rand(30, 20)
    with torch.no_grad():
        props = multiscale_proposals(net, image, scales=(1.0, 0.5), top_k=12, refine_top=5)
        refine, net.refine = net.refine, None
        coarse = multiscale_proposals(net, image, scales=(1.0, 0.5), top_k=12)
        net.refine = refine
        assert torch.equal(props.windows, coarse.windows)
        assert torch.equal(props.masks[5:], coarse.masks[5:])  # past refine_top: coarse
        for k in range(5):  # the window's own pixels, cut by hand from the resized image
            side = props.windows[k, 2] - props.windows[k, 0]
            s = 32 / float(side)
            small = F.interpolate(image[None], scale_factor=s, mode="bilinear", antialias=s < 1)
            padded = F.pad(small, (16, 16, 16, 16))
            x0, y0 = (props.windows[k, :2] * s).round().long().tolist()
            crop = padded[..., y0 + 16 : y0 + 48, x0 + 16 : x0 + 48]
            want = net.refined(crop, coarse.masks[k : k + 1])[0]
            assert torch.allclose(props.masks[k], want, atol=1e-5)
        blank = multiscale_proposals(net, torch.zeros(1, 40, 40), scales=(1.0,), top_k=8)
    assert blank.masks.shape == (8, 16, 16) and torch.isfinite(blank.masks).all()  # no object


def test_resnet_trunk_stride_16() -> None:
    net = build_deepmask(backbone="resnet18", in_channels=3, patch_size=64, mask_size=8,
                         normalize="imagenet")  # fmt: skip
    assert net.stride == 16 and net.map_size == (4, 4)
    masks, scores = net.eval()(torch.rand(1, 3, 64, 64))
    assert masks.shape == (1, 8, 8) and torch.isfinite(scores).all()


def test_paste_and_boxes() -> None:
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, 1:3, 1:3] = 5.0  # the window's middle half
    windows = torch.tensor([[10.0, 20.0, 18.0, 28.0], [-100.0, -100.0, -92.0, -92.0]])
    masks = paste_masks(logits, windows, (40, 40))
    assert masks.shape == (2, 40, 40) and not masks[1].any()  # outside the image: empty
    boxes = mask_boxes(masks)
    assert boxes[0].tolist() == [12.0, 22.0, 16.0, 26.0] and boxes[1].tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- data


def test_window_rule_by_hand() -> None:
    box = torch.tensor([[40.0, 40.0, 56.0, 52.0]])  # larger side 16, centre (48, 46)
    label = lambda cx, cy, side: int(window_labels((cx, cy, side), box, **RULE)[0])  # noqa: E731
    assert label(48, 46, 32) == 1  # centred, canonical scale
    assert label(49.5, 44.5, 32) == 1  # 1.5 px off on both axes
    assert label(51, 46, 32) == 0  # 3 px: between the rules, never drawn
    assert label(53, 46, 32) == -1  # 5 px off-centre
    assert label(48, 46, 32 * 2**0.2) == 1  # within 2**1/4
    assert label(48, 46, 32 * 2**0.5) == 0
    assert label(48, 46, 64) == -1 and label(48, 46, 15) == -1  # 2x off-scale either way
    assert window_labels((0, 0, 32), torch.zeros(0, 4), **RULE).numel() == 0


def test_sampled_windows_follow_the_rule() -> None:
    dm = tiny_data(train_length=200)
    dm.setup("fit")
    windows = dm.train_dataloader().dataset
    labels = []
    for i in range(200):
        scene, window, k = windows.sample(i)
        per_digit = window_labels(window, scene["boxes"], **windows.rule)
        if k is None:
            assert (per_digit == -1).all()
        else:
            assert per_digit[k] == 1
        labels.append(k is not None)
    assert 0.35 < sum(labels) / len(labels) < 0.65  # pos_fraction 0.5
    x, mask, y = windows[0]
    assert x.shape == (1, 32, 32) and mask.shape == (16, 16) and y.item() in (-1.0, 1.0)
    positives = [windows[i] for i in range(40) if windows[i][2] > 0]
    assert all(p[1].max() > 0.5 for p in positives)  # the digit's mask is in the target
    again = tiny_data(train_length=200)
    again.setup("fit")
    assert torch.equal(again.train_dataloader().dataset[7][0], windows[7][0])  # fixed seeds
    batch = windows.__getitems__(list(range(20, 52)))  # what the DataLoader calls: one cut
    for got, want in zip(batch, (windows[i] for i in range(20, 52)), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(IndexError, match="out of range"):
        windows.__getitems__([0, 200])


def test_eval_scenes_hold_instance_masks() -> None:
    images, targets = next(iter(tiny_data().val_dataloader()))
    assert len(images) == 2 and images[0].shape == (1, 96, 96)
    t = targets[0]
    assert t["masks"].dtype == torch.bool and t["masks"].shape[1:] == (96, 96)
    assert len(t["masks"]) == len(t["boxes"]) >= 1 and t["image_id"] == 1


# ----------------------------------------------------------------------------- average recall


def test_average_recall_known_answer() -> None:
    truth = torch.zeros(2, 20, 20, dtype=torch.bool)
    truth[0, 0:10, 0:10] = True  # 100 px
    truth[1, 10:20, 10:20] = True
    pred = torch.zeros(3, 20, 20, dtype=torch.bool)
    pred[0, 0:10, 0:6] = True  # IoU 0.6 with object 0
    pred[1, 10:20, 10:20] = True  # IoU 1 with object 1, ranked second
    pred[2, 0:10, 0:10] = True  # IoU 1 with object 0, ranked third
    iou = mask_iou(pred, truth)
    assert torch.allclose(iou[0], torch.tensor([0.6, 0.0]))
    best = best_iou_at(iou, (1, 2, 3))  # (2 objects, 3 ks)
    assert torch.allclose(best, torch.tensor([[0.6, 0.6, 1.0], [0.0, 1.0, 1.0]], dtype=best.dtype))
    ar = average_recall(best)
    # k=1: object 0 found at IoU 0.5, 0.55, 0.6 (3 of 10 thresholds), object 1 never
    assert ar.tolist() == pytest.approx([0.15, 0.65, 1.0])
    assert best_iou_at(torch.zeros(0, 2), (1, 10)).shape == (2, 2)  # no proposal: recall 0


# ----------------------------------------------------------------------------- the module


def test_loss_falls_on_a_tiny_fit() -> None:
    seed_everything(0)
    dm = tiny_data()
    dm.setup("fit")
    x, mask, y = next(iter(dm.train_dataloader()))
    model = tiny_module(lr=3e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.losses(x, mask, y)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    terms = {k: v.item() for k, v in model.losses(x, mask, y).items()}
    assert terms["loss"] == pytest.approx(terms["mask_loss"] + terms["score_loss"] / 32, rel=1e-5)


def test_empty_scene_no_crash_and_low_scores() -> None:
    seed_everything(0)
    dm = tiny_data(pos_fraction=0.5)
    dm.setup("fit")
    model = tiny_module(lr=3e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, mask, y = next(iter(dm.train_dataloader()))
    for _ in range(40):
        loss = model.losses(x, mask, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    empty = torch.zeros(1, 96, 96)
    masks, scores = deepmask_masks(model, empty, top_k=20)
    assert masks.shape == (20, 96, 96) and torch.isfinite(scores).all()
    scene = dm.scenes("val")[0][0]
    assert scores.max() < deepmask_masks(model, scene, top_k=20)[1].max()
    assert scores.max() < 0.5
    boxes, s = deepmask_proposals(model, empty, top_k=20)
    assert boxes.shape[1] == 4 and len(boxes) == len(s)
    # a scene with no object adds nothing to the recall: the metric stays undefined, no error
    model.val_ar.update(best_iou_at(mask_iou(masks, torch.zeros(0, 96, 96, dtype=torch.bool))))
    assert model.val_ar.compute() is None


def test_channels_last_changes_the_layout_not_the_outputs() -> None:
    seed_everything(0)
    nchw = tiny_module(refine_channels=8).eval()
    nhwc = tiny_module(refine_channels=8, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    conv = next(m for m in nhwc.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 32, 32)
    for a, b in zip(nchw(x), nhwc(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    scene = torch.rand(1, 96, 96)
    (masks_a, scores_a), (masks_b, scores_b) = (
        deepmask_masks(m, scene, top_k=20) for m in (nchw, nhwc)
    )
    torch.testing.assert_close(scores_a, scores_b, atol=1e-4, rtol=1e-4)
    # thresholded masks: a pixel within float rounding of the threshold may flip, no more
    assert (masks_a != masks_b).float().mean() < 1e-3


def test_fast_dev_run_fit_and_test(tmp_path) -> None:
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = tiny_module()
    trainer.fit(model, datamodule=tiny_data())
    assert "val/ar_100" in trainer.callback_metrics


def test_mismatched_mask_size_is_a_clear_error(tmp_path) -> None:
    trainer = Trainer(fast_dev_run=True, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="data.mask_size is 32 but model.mask_size is 16"):
        trainer.fit(tiny_module(), datamodule=tiny_data(mask_size=32))


# ----------------------------------------------------------------------------- COCO segm


def _scenes() -> list:
    dm = tiny_data()
    return [dm.scenes("test")[i] for i in range(2)]


def test_predict_writes_coco_segm_that_pycocotools_scores(tmp_path) -> None:
    scenes = _scenes()
    gt = coco_segm_gt(scenes)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    outputs = trainer.predict(tiny_module(predict_top_k=10), datamodule=tiny_data())
    rows = [r for o in outputs for r in o["rows"]]
    assert len(rows) == 20 and {r["image_id"] for r in rows} == {1, 2}
    path = tmp_path / "segm.json"
    path.write_text(json.dumps(rows))
    scores = coco_segm_ar(gt, load_coco_segm_results(path, gt))
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    # the ground truth itself as results: perfect recall
    perfect = [r for img, t in scenes for r in segm_rows(t["masks"], torch.ones(len(t["masks"])),
                                                         t["image_id"])]  # fmt: skip
    assert coco_segm_ar(gt, perfect)["ar_100"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("score"), "lacks field"),
        (lambda r: r["segmentation"].pop("counts"), "lacks field"),
        (lambda r: r["segmentation"].update(size=[50, 96]), r"mask size \[50, 96\]"),
        (lambda r: r.update(score=1.5), "score 1.5"),
        (lambda r: r.update(image_id=99), "image_id 99"),
        (lambda r: r["segmentation"].update(counts=[1, -2]), "non-negative"),
    ],
)
def test_segm_loader_names_file_and_annotation(tmp_path, change, message) -> None:
    scenes = _scenes()
    gt = coco_segm_gt(scenes)
    img, t = scenes[0]
    rows = segm_rows(t["masks"][:1].repeat(3, 1, 1), torch.tensor([0.9, 0.8, 0.7]), 1)
    change(rows[2])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=rf"bad\.json: annotation 2.*{message}"):
        load_coco_segm_results(path, gt)


def test_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="mask_threshold"):
        tiny_module(mask_threshold=1.0)
    assert math.isclose(tiny_module().hparams.score_weight, 1 / 32)


# ----------------------------------------------------------------------------- for a detector


def test_deepmask_boxes_are_a_detectors_proposals(tmp_path) -> None:
    """proposals=deepmask: each target carries the boxes of the checkpoint's best masks (what
    deepmask_proposals gives on the same pixels) and their seconds; no checkpoint, clear error."""
    from datamodules.proposals import ProposalDetectionDataModule

    seed_everything(0)
    model = tiny_module()
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=tiny_data())
    ckpt = tmp_path / "deepmask.ckpt"
    trainer.save_checkpoint(ckpt)
    dm = ProposalDetectionDataModule(proposals="deepmask", deepmask_checkpoint=str(ckpt),
                                     max_proposals=30, eval_length=2, cache_dir=None)  # fmt: skip
    dm.setup("test")
    image, target = dm.test_dataloader().dataset[0]
    expected, _ = deepmask_proposals(model.eval(), image[:1], top_k=30)
    assert target["proposals"].shape[1] == 4 and 0 < len(target["proposals"]) <= 30
    torch.testing.assert_close(target["proposals"], expected)
    assert target["proposal_s"] > 0
    with pytest.raises(FileNotFoundError, match="deepmask_checkpoint"):
        ProposalDetectionDataModule(
            proposals="deepmask", deepmask_checkpoint=str(tmp_path / "no.ckpt")
        )


def test_the_cli_schema_lists_every_proposal_method() -> None:
    """The `__init__` signature is the CLI's schema: each method the code knows is a choice."""
    import typing

    from datamodules.proposals import METHODS, ProposalDetectionDataModule

    hints = typing.get_type_hints(ProposalDetectionDataModule.__init__)
    assert set(typing.get_args(hints["proposals"])) == set(METHODS)


def test_fast_rcnn_tests_on_deepmask_proposals_through_the_cli(tmp_path) -> None:
    """The demo's lineage row: `train.py test` of Fast R-CNN with --data.proposals=deepmask. The
    net is loaded outside the CLI's instantiation, so it keeps its own hyperparameters."""
    from scripts.train import main

    seed_everything(0)
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(tiny_module(), datamodule=tiny_data())
    trainer.save_checkpoint(tmp_path / "deepmask.ckpt")
    cli = main(["test", "--config=configs/rcnn/digits_fast_rcnn.yaml", "--model.weights=null",
                "--data.proposals=deepmask", f"--data.deepmask_checkpoint={tmp_path / 'deepmask.ckpt'}",
                "--data.eval_length=4", "--data.eval_batch_size=2", "--data.cache_dir=null",
                f"--trainer.default_root_dir={tmp_path}", "--wandb=disabled",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test/map_50"] <= 1.0 and metrics["test/images_per_s"] > 0


def test_ceiling_of_perfect_masks_bounds_and_falls_with_resolution() -> None:
    """scripts/deepmask_ceiling.py: perfect targets on the inference grid recall most digits at
    full window resolution, fewer at a quarter of it, more when every window may answer."""
    from scripts.deepmask_ceiling import ceiling

    full = ceiling(tiny_data(mask_size=32, test_length=6), [0.5, 0.71, 1.0], 4, any_window=False)
    coarse = ceiling(tiny_data(mask_size=8, test_length=6), [0.5, 0.71, 1.0], 4, any_window=False)
    every = ceiling(tiny_data(mask_size=32, test_length=6), [0.5, 0.71, 1.0], 4, any_window=True)
    assert full["objects"] == coarse["objects"] > 0
    assert 0.5 < full["ar"] <= every["ar"] <= 1.0
    assert coarse["ar"] < full["ar"]
