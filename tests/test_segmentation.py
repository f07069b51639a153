"""FCN segmentation: the paper's four scores, the nets, VOC / SBD readers, bad input, CLI and DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import savemat
from torchmetrics.classification import MulticlassConfusionMatrix

from datamodules.segmentation import SegmentationDataModule, voc_palette
from lit_modules.metrics import fcn_scores
from lit_modules.nets.fcn import FCN, Upsample, build_fcn, load_coarser
from tests.test_cli import QUIET, train

# The digits configs' fast_dev_run is tests/test_cli.py's (every configs/*/digits_*.yaml).
SMALL = ["--data.train_length=16", "--data.eval_length=21", "--data.batch_size=4"]


# ----------------------------------------------------------------------------- metrics


def numpy_scores(hist: np.ndarray) -> dict[str, float]:
    """Paper §5 as written, in NumPy (classes with no pixels and no predictions left out)."""
    n_ii, t = np.diag(hist), hist.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = n_ii / t
        iu = n_ii / (t + hist.sum(0) - n_ii)
    present = ~np.isnan(iu)
    return {
        "pixel_acc": n_ii.sum() / t.sum(),
        "mean_acc": np.nanmean(acc),
        "miou": iu[present].sum() / present.sum(),
        "fwiou": (t[present] * iu[present]).sum() / t.sum(),
    }


@pytest.mark.parametrize("seed", range(5))
def test_fcn_scores_equal_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 22))
    hist = rng.integers(0, 1000, (k, k)) * (rng.random((k, k)) < 0.7)
    hist[rng.integers(k)] = 0  # a class absent from the ground truth (predicted or not)
    hist[:, rng.integers(k)] *= int(seed % 2)
    ours = fcn_scores(torch.from_numpy(hist))
    for key, value in numpy_scores(hist.astype(np.float64)).items():
        assert float(ours[key]) == pytest.approx(value, rel=1e-12), key


def test_fcn_scores_with_every_class_present_use_all_classes() -> None:
    hist = np.array([[50, 2, 3], [4, 30, 1], [0, 5, 5]], dtype=np.float64)
    t, n = hist.sum(1), np.diag(hist)
    iu = n / (t + hist.sum(0) - n)
    s = fcn_scores(torch.from_numpy(hist))
    assert float(s["pixel_acc"]) == pytest.approx(85 / 100)
    assert float(s["mean_acc"]) == pytest.approx((n / t).sum() / 3)
    assert float(s["miou"]) == pytest.approx(iu.sum() / 3)
    assert float(s["fwiou"]) == pytest.approx((t * iu).sum() / 100)
    with pytest.raises(ValueError, match="square"):
        fcn_scores(torch.zeros(3, 2))


def test_torchmetrics_confusion_ignores_255() -> None:
    target = torch.tensor([[0, 1, 255], [2, 2, 255]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 0]])
    cm = MulticlassConfusionMatrix(3, ignore_index=255)(pred, target)
    assert cm.sum() == 4 and cm[0, 0] == 1 and cm[1, 2] == 1 and cm[2, 2] == 1 and cm[2, 1] == 1


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (5, 3)])
def test_fcn_output_is_input_sized(variant: str, size: tuple[int, int]) -> None:
    net = build_fcn(arch="digits", variant=variant, num_classes=11)
    for p in net.parameters():  # the score layers start at zero: give the skips something to add
        torch.nn.init.normal_(p, std=0.1) if p.ndim > 1 else None
    x = torch.randn(2, 1, *size, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 11, *size) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ["resnet18", "fcn_resnet50", "deeplabv3_resnet50"])
def test_other_archs_give_input_sized_scores(arch: str) -> None:
    variant = None if arch.endswith("resnet50") else "8s"
    net = build_fcn(arch=arch, variant=variant, num_classes=21, in_channels=3).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 45, 70)).shape == (1, 21, 45, 70)
    with pytest.raises(ValueError, match="variant: null"):
        build_fcn(arch="fcn_resnet50", variant="8s", num_classes=21, in_channels=3)


def test_vgg16_fcn8s_taps_and_shapes() -> None:
    net = build_fcn(arch="vgg16", variant="8s", num_classes=21, in_channels=3).eval()
    assert isinstance(net, FCN) and net.score_pool3.in_channels == 256
    assert net.score_pool4.in_channels == 512 and net.score_fr.in_channels == 4096
    with torch.no_grad():
        assert net(torch.randn(1, 3, 70, 41)).shape == (1, 21, 70, 41)


def test_upsampling_starts_bilinear_and_score_layers_at_zero() -> None:
    up = Upsample(4, 8)
    x = torch.randn(2, 4, 5, 6)
    ref = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    assert up(x).shape == ref.shape
    assert torch.allclose(up(x)[..., 8:-8, 8:-8], ref[..., 8:-8, 8:-8], atol=1e-5)
    assert up.weight.requires_grad and not Upsample(4, 2, learnable=False).weight.requires_grad
    fixed = Upsample(4, 8, learnable=False)  # interpolation, borders included, same as the conv
    assert torch.allclose(fixed(x), up(x), atol=1e-5)
    assert fixed(x).shape == up(x).shape
    net = build_fcn(arch="digits", variant="8s", num_classes=11).eval()
    for layer in (net.score_fr, net.score_pool4, net.score_pool3):
        assert not layer.weight.any() and not layer.bias.any()
    assert not net(torch.randn(1, 1, 32, 32)).any()  # zero scores everywhere at the start


def test_staged_init_copies_the_coarser_net(tmp_path: Path) -> None:
    coarse = build_fcn(arch="digits", variant="32s", num_classes=11)
    with torch.no_grad():
        for p in coarse.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "fcn32s.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in coarse.state_dict().items()}}, path)
    fine = build_fcn(arch="digits", variant="16s", num_classes=11, init_from=str(path))
    for name, value in coarse.state_dict().items():
        if not name.startswith("upscore_final"):  # the x32 upsampling has no x16 counterpart
            assert torch.equal(fine.state_dict()[name], value), name
    assert not fine.score_pool4.weight.any()  # the new skip starts at zero
    other = tmp_path / "resnet.pt"
    torch.save(build_fcn(arch="resnet18", variant="32s", in_channels=3).state_dict(), other)
    with pytest.raises(ValueError, match="not an FCN checkpoint of this arch"):
        load_coarser(fine, other)


def test_fixed_variant_trains_only_the_score_layer() -> None:
    from lit_modules.segmentation import FCNModule

    module = FCNModule(arch="digits", variant="32s", trainable="score").train()
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable == {"score_fr.weight", "score_fr.bias", "upscore_final.weight"}
    bns = [m for m in module.net.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # frozen BatchNorm statistics too


def test_onecycle_warms_up_to_lr_and_channels_last_keeps_the_scores() -> None:
    from types import SimpleNamespace

    from lit_modules.segmentation import FCNModule

    torch.manual_seed(0)
    module = FCNModule(variant="8s", lr=0.03, scheduler="onecycle", warmup_pct=0.25)
    module.trainer = SimpleNamespace(estimated_stepping_batches=8)  # type: ignore[assignment]
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.03) and 0 < lrs.index(max(lrs)) < 4  # warm-up, then peak
    assert lrs[0] < 0.03 / 10 and lrs[-1] < lrs[4] < lrs[3]  # starts low, anneals
    with pytest.raises(ValueError, match="warmup_pct"):
        FCNModule(scheduler="onecycle", warmup_pct=1.0)
    for name, p in module.net.named_parameters():  # score layers start at zero: make them speak
        if name.startswith("score_"):
            torch.nn.init.normal_(p.data)
    nhwc = FCNModule(variant="8s", channels_last=True).eval()
    nhwc.load_state_dict(module.state_dict())
    x = torch.randn(2, 1, 40, 56)
    with torch.no_grad():
        assert torch.allclose(nhwc(x), module.eval()(x), atol=1e-5)


# ----------------------------------------------------------------------------- VOC / SBD files

PALETTE = [c for rgb in voc_palette() for c in rgb]


def _save_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    im.save(path)


def _mask(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 1, 15, 255]), size=(h, w)).astype(np.uint8)


def write_voc(root: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """A VOC2012 tree: JPEGImages, palette PNGs in SegmentationClass, train / val lists."""
    voc = root / "VOCdevkit" / "VOC2012"
    masks = {}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        masks[name] = _mask(h, w, i)
        _save_palette_png(voc / "SegmentationClass" / f"{name}.png", masks[name])
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    names = list(sizes)
    (lists / "train.txt").write_text("\n".join(names[:2]) + "\n")
    (lists / "val.txt").write_text("\n".join(names[2:]) + "\n")
    return masks


VOC_SIZES = {"2007_000032": (30, 40), "2007_000033": (41, 23), "2008_000001": (20, 33)}
VOC_SIZES |= {"2008_000002": (25, 25)}


def _voc_dm(root: Path, **kw) -> SegmentationDataModule:
    kw = {"crop_size": 32, "batch_size": 2, **kw}
    return SegmentationDataModule(source="voc", root=str(root), **kw)


def test_voc_fixture_reads_palette_indices(tmp_path: Path) -> None:
    masks = write_voc(tmp_path, VOC_SIZES)
    dm = _voc_dm(tmp_path)
    dm.setup("fit")
    assert dm.num_classes == 21 and dm.class_names[15] == "person"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 15, 255}
    assert (y == 255).float().mean() > 0.3  # crops larger than the images: padded with 255
    x, y = next(iter(dm.val_dataloader()))  # eval: whole images, padded to the largest
    assert x.shape == (2, 3, 25, 33)
    assert torch.equal(y[0, :20, :33], torch.from_numpy(masks["2008_000001"]).long())
    assert (y[0, 20:] == 255).all() and (y[1, :, 25:] == 255).all()


def test_sbd_fixture_trains_on_mat_masks_and_validates_on_a_list(tmp_path: Path) -> None:
    write_voc(tmp_path / "voc", VOC_SIZES)
    sbd = tmp_path / "sbd"
    for name in ("2009_000001", "2009_000002"):
        (sbd / "img").mkdir(parents=True, exist_ok=True)
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(sbd / "img" / f"{name}.jpg")
        seg = np.full((12, 16), 7, np.uint8)
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg}})
    (sbd / "train.txt").write_text("2009_000001\n2009_000002\n")
    listed = tmp_path / "seg11valid.txt"
    listed.write_text("2008_000001\n2008_000002\n2007_000033\n")
    dm = SegmentationDataModule(
        source="sbd", root=str(sbd), voc_root=str(tmp_path / "voc"), val_list=str(listed),
        crop_size=None, flip=False, batch_size=2,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="736"):
        dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 12, 16) and (y == 7).all()
    assert len(dm.val_dataloader().dataset) == 3


def _drop_train_split(root: Path) -> None:
    """Leave only what evaluation reads: the val list and its images and masks."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
    for name in list(VOC_SIZES)[:2]:
        (voc / "JPEGImages" / f"{name}.jpg").unlink()
        (voc / "SegmentationClass" / f"{name}.png").unlink()


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_voc_evaluates_with_only_the_val_split(tmp_path: Path, stage: str) -> None:
    masks = write_voc(tmp_path, VOC_SIZES)
    _drop_train_split(tmp_path)
    dm = _voc_dm(tmp_path)
    dm.setup(stage)
    loader = {"validate": dm.val_dataloader, "test": dm.test_dataloader}.get(
        stage, dm.predict_dataloader
    )()
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 25, 33)
    assert torch.equal(y[0, :20, :33], torch.from_numpy(masks["2008_000001"]).long())
    with pytest.raises(
        FileNotFoundError, match=r"stage 'fit' reads the train split, but list file"
    ):
        _voc_dm(tmp_path).setup("fit")


def test_sbd_tests_with_only_seg11valid(tmp_path: Path) -> None:
    write_voc(tmp_path / "voc", VOC_SIZES)
    listed = tmp_path / "seg11valid.txt"
    listed.write_text("2008_000001\n2007_000033\n")
    kw = {"source": "sbd", "root": str(tmp_path / "no_sbd"), "val_list": str(listed)}
    dm = SegmentationDataModule(**kw, voc_root=str(tmp_path / "voc"), batch_size=2)
    with pytest.warns(UserWarning, match="736"):
        dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 3, 41, 33) and y.shape == (2, 41, 33)
    with pytest.raises(FileNotFoundError, match=r"stage 'fit' reads the train split.*no_sbd"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"stage 'test' reads the test split, but `voc_root`"):
        SegmentationDataModule(**kw).setup("test")


# Bad VOC / SBD inputs (mask values, sizes, modes, missing files): tests/test_bad_inputs.py


# ----------------------------------------------------------------------------- CLI, DDP


@pytest.mark.slow  # fit + predict through the CLI: `make test` runs it in its own step
def test_fit_then_predict_writes_overlays(tmp_path: Path) -> None:
    """Overlays every validation epoch and per-image predict overlays (DDP parity of the scores:
    tests/test_ddp.py)."""
    common = ["--config=configs/segmentation/digits_fcn8s.yaml", *SMALL,
              f"--trainer.default_root_dir={tmp_path}", *QUIET]  # fmt: skip
    train("fit", *common, "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=2",
          "--name=fit")  # fmt: skip
    run = tmp_path / "fit" / "version_0"
    assert list((run / "images").glob("val_overlays_epoch*.png")), "no overlay picture"
    ckpt = run / "checkpoints" / "last.ckpt"
    train("predict", *common, f"--ckpt_path={ckpt}", "--name=pred")
    pred = tmp_path / "pred" / "version_0"
    rows = json.loads((pred / "predictions.json").read_text())
    assert len(rows) == 21 and all((pred / r["overlay"]).is_file() for r in rows)
    picture = Image.open(pred / rows[0]["overlay"])
    assert picture.size == (2 * 96, 96) and picture.mode == "RGB"


@pytest.mark.parametrize("total,pct", [(5, 0.2), (10, 0.1), (4, 0.25), (700, 0.3)])
def test_one_cycle_survives_a_one_step_warmup(total: int, pct: float) -> None:
    """torch's OneCycleLR divides by zero on its first step where pct_start x total_steps == 1
    (DeepMask's 0.2 warm-up at 5 steps); one_cycle gives torch's rates to 1e-6 instead, and
    exactly torch's schedule elsewhere."""
    from lit_modules.callbacks import one_cycle

    def rates(make) -> list[float]:  # noqa: ANN001
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        sched, out = make(opt), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step() if len(out) < total else None
        return out

    ours = rates(lambda opt: one_cycle(opt, 0.1, total, pct))
    assert all(0 < r <= 0.1 + 1e-12 for r in ours)
    if pct * total != 1:
        torch_rates = rates(
            lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=0.1, total_steps=total, pct_start=pct
            )
        )
        assert ours == torch_rates
        return
    with pytest.raises(ZeroDivisionError):  # the torch behaviour one_cycle works around
        rates(
            lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=0.1, total_steps=total, pct_start=pct
            )
        )
    nudged = rates(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=total, pct_start=1.001 / total
        )
    )
    assert ours == pytest.approx(nudged, rel=1e-2)
