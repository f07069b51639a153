"""GANs: nets, one manual-optimisation step, quality metrics, ImageDataModule, the CLI and DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.digits import DIGITS_MEAN, DIGITS_STD
from datamodules.images import ImageDataModule
from lit_modules.gan import ClassEntropy, DCGANModule, frozen
from lit_modules.nets.gan_nets import DigitsJudge, build_discriminator, build_generator
from lit_modules.transfer import TransferClassifier
from tests.test_cli import QUIET, train

TINY = {"g_width": 8, "d_width": 8, "latent_dim": 16, "mlp_g_hidden": (32,), "mlp_d_hidden": (16,)}
TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def _classifier_ckpt(path: Path, num_classes: int = 10) -> Path:
    """A (random) TransferClassifier checkpoint in ExportWeights' format."""
    module = TransferClassifier(backbone="digits_cnn", num_classes=num_classes, mode="scratch")
    torch.save({"state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _classifier_ckpt(tmp_path_factory.mktemp("judge") / "digits_classifier.pt")


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
@pytest.mark.parametrize("size,channels", [(32, 1), (64, 3)])
def test_nets_shapes_and_gradients(arch: str, size: int, channels: int) -> None:
    kw = {"arch": arch, "channels": channels, "image_size": size}
    g = build_generator(**kw, latent_dim=16, width=8, mlp_hidden=(32,))
    d = build_discriminator(**kw, width=8, mlp_hidden=(16,))
    x = g(torch.randn(4, 16))
    assert x.shape == (4, channels, size, size) and x.abs().max() <= 1.0  # tanh range
    logits = d(x)
    assert logits.shape == (4,)
    logits.sum().backward()
    grads = [p.grad for p in [*g.parameters(), *d.parameters()]]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    feats = d.features(x)
    if arch == "dcgan":  # one tensor per stride-2 layer, halving down to 4x4
        assert [f.shape[-1] for f in feats] == [size // 2**i for i in range(1, len(feats) + 1)]
        assert feats[-1].shape[-1] == 4
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.blocks[0])  # D's input
        assert isinstance(g.net[-1], torch.nn.Tanh) and isinstance(
            g.net[-2], torch.nn.ConvTranspose2d
        )


def test_dcgan_init_is_normal_002() -> None:
    d = build_discriminator(arch="dcgan", width=64)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


def test_bad_net_config() -> None:
    with pytest.raises(ValueError, match="image_size must be one of"):
        build_generator(image_size=48)
    with pytest.raises(ValueError, match="unknown arch 'vae'"):
        DCGANModule(arch="vae", fid_features="none")
    with pytest.raises(ValueError, match="channels: 1"):
        DCGANModule(channels=3, fid_features="digits")


# ----------------------------------------------------------------------------- one step


class _StepSpy(Callback):
    """Snapshots G's and D's weights around each optimizer's step (the real torch optimizers)."""

    def __init__(self) -> None:
        self.changed: list[tuple[str, bool, bool]] = []  # (optimizer, G changed, D changed)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, opt in zip(("G", "D"), trainer.optimizers, strict=True):
            step = opt.step

            def spy(*args, _step=step, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
                before = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]
                out = _step(*args, **kwargs)
                after = [p.detach() for p in pl_module.parameters() if p.requires_grad]
                n_g = len(list(pl_module.generator.parameters()))
                diff = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
                self.changed.append((_name, any(diff[:n_g]), any(diff[n_g:])))
                return out

            opt.step = spy


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
@pytest.mark.parametrize("g_loss", ["non_saturating", "minimax"])
def test_one_step_updates_d_then_g_and_only_them(arch: str, g_loss: str) -> None:
    torch.manual_seed(0)
    model = DCGANModule(arch=arch, g_loss=g_loss, fid_features="none", **TINY)
    spy = _StepSpy()
    data = DataLoader(torch.rand(8, 1, 32, 32) * 2 - 1, batch_size=8)
    g0 = [p.detach().clone() for p in model.generator.parameters()]
    d0 = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer = Trainer(max_steps=2, limit_val_batches=0, callbacks=[spy], **TRAINER)
    trainer.fit(model, train_dataloaders=data)
    assert spy.changed == [("D", False, True), ("G", True, False)]  # D's step first, then G's
    assert any(not torch.equal(a, b) for a, b in zip(g0, model.generator.parameters(), strict=True))
    assert any(
        not torch.equal(a, b) for a, b in zip(d0, model.discriminator.parameters(), strict=True)
    )
    assert {
        "train/d_loss",
        "train/g_loss",
        "train/d_real",
        "train/d_fake",
    } <= trainer.callback_metrics.keys()


def test_frozen_d_gives_g_the_same_gradients_and_d_none() -> None:
    """G's step through a frozen D: G's gradients bitwise those through a trainable D, no weight
    gradient computed for D, and D trainable again afterwards."""
    torch.manual_seed(0)
    model = DCGANModule(fid_features="none", **TINY)
    g, d = list(model.generator.parameters()), list(model.discriminator.parameters())
    fake = model.generator(torch.randn(4, 16))
    expected = torch.autograd.grad(model._g_loss(fake), g, retain_graph=True)
    with frozen(model.discriminator):
        loss = model._g_loss(fake)
    assert all(p.requires_grad for p in d)
    loss.backward()
    for want, p in zip(expected, g, strict=True):
        assert torch.equal(want, p.grad)
    assert all(p.grad is None for p in d)


def test_ema_generator_follows_g_and_samples() -> None:
    torch.manual_seed(0)
    model = DCGANModule(fid_features="none", ema_decay=0.9, **TINY)
    g, ema = model.generator, model.generator_ema
    assert not any(p.requires_grad for p in ema.parameters())
    start = [p.detach().clone() for p in ema.parameters()]  # G's initial weights
    data = DataLoader(torch.rand(8, 1, 32, 32) * 2 - 1, batch_size=8)
    Trainer(max_steps=2, limit_val_batches=0, **TRAINER).fit(model, train_dataloaders=data)
    # one G step (max_steps counts both optimisers' steps): ema = 0.9 G_0 + 0.1 G_1
    for p0, e, p in zip(start, ema.parameters(), g.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * p0 + 0.1 * p)
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), g.buffers(), strict=True))
    model.eval()
    z = torch.randn(3, 16)
    assert torch.equal(model(z), ema(z)) and not torch.equal(model(z), g(z))
    assert any(k.startswith("generator_ema.") for k in model.state_dict())
    with pytest.raises(ValueError, match="ema_decay"):
        DCGANModule(fid_features="none", ema_decay=1.0, **TINY)


def test_scores_are_float32_under_bf16_mixed(classifier: Path) -> None:
    """bf16-mixed autocasts validation_step: the judge's features of the real images, and so
    every score, must still be float32 ones, equal to a float32 run's."""
    torch.manual_seed(0)
    model = DCGANModule(
        classifier_weights=str(classifier),
        fid_samples=16,
        num_grid_samples=0,
        interpolation_rows=0,
        **TINY,
    )
    dm = ImageDataModule(dataset="digits", batch_size=16, max_eval_samples=32)
    scores = [
        Trainer(precision=precision, **TRAINER).validate(model, datamodule=dm, verbose=False)[0]
        for precision in ("32-true", "bf16-mixed")
    ]
    assert scores[0] == scores[1] and math.isfinite(scores[0]["val/fid"])


# ----------------------------------------------------------------------------- metrics


def test_judge_and_metrics_on_real_digits(classifier: Path, tmp_path: Path) -> None:
    judge = DigitsJudge(classifier, mean=DIGITS_MEAN, std=DIGITS_STD)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    assert judge(x).shape == (6, judge.num_features)
    assert torch.allclose(judge.probs(x).sum(1), torch.ones(6))
    judge.train()
    assert not judge.training  # a measuring instrument stays in eval mode
    ent = ClassEntropy(10)
    ent.update(torch.arange(10).repeat(3))
    assert ent.compute().item() == pytest.approx(math.log(10), abs=1e-5)
    ent.reset()
    ent.update(torch.full((20,), 3))
    assert ent.compute().item() == 0.0


def test_checkpoint_leaves_out_the_judge(classifier: Path) -> None:
    model = DCGANModule(classifier_weights=str(classifier), **TINY)
    state = model.state_dict()
    assert not any(k.startswith(("judge.", "val_fid.", "test_fid.")) for k in state)
    assert any(k.startswith("generator.") for k in state) and "fixed_z" in state
    other = DCGANModule(classifier_weights=str(classifier), **TINY)
    other.load_state_dict(state)  # strict: the judge keeps its own weights
    assert torch.equal(other.generator.net[0].weight, model.generator.net[0].weight)


def test_feature_extractor_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    five = _classifier_ckpt(tmp_path / "five.pt", num_classes=5)
    with pytest.raises(ValueError, match="5-class classifier"):
        DCGANModule(classifier_weights=str(five), **TINY)
    gan = tmp_path / "gan.pt"
    torch.save({"state_dict": DCGANModule(fid_features="none", **TINY).state_dict()}, gan)
    with pytest.raises(ValueError, match="not a digits classifier checkpoint"):
        DCGANModule(classifier_weights=str(gan), **TINY)
    state = torch.load(_classifier_ckpt(tmp_path / "ok.pt"), weights_only=True)["state_dict"]
    state["net.stages.0.0.weight"] = torch.zeros(8, 1, 3, 3)  # a narrower first conv
    torch.save({"state_dict": state}, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="does not match"):
        DCGANModule(classifier_weights=str(tmp_path / "narrow.pt"), **TINY)
    with pytest.warns(UserWarning, match="not found"):  # missing: warn, metrics NaN
        assert DCGANModule(classifier_weights=str(tmp_path / "missing.pt"), **TINY).judge is None


# ----------------------------------------------------------------------------- data


def test_digits_datamodule_range_and_shapes() -> None:
    dm = ImageDataModule(dataset="digits", batch_size=50)
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 32, 32) and x.min() == -1.0 and x.max() <= 1.0
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # padding is black
    assert len(dm.val_dataloader().dataset) == 500
    idx = next(iter(dm.predict_dataloader()))
    assert idx.tolist() == list(range(50))


def _img(path: Path, mode: str, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size + 6)).save(path)


# Image modes (converted with one counted warning, or refused) and unreadable files: the
# catalogue in tests/test_bad_inputs.py.


def test_imagefolder_missing_or_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageDataModule(dataset="imagefolder", root=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(FileNotFoundError, match="LMDB"):
        ImageDataModule(dataset="lsun", root=str(tmp_path / "nowhere")).setup("fit")
    with pytest.raises(ValueError, match="unknown dataset"):
        ImageDataModule(dataset="mnist")


def test_cifar10_fixture(tmp_path: Path) -> None:
    from tests.test_classification_data import write_cifar10

    write_cifar10(tmp_path)
    dm = ImageDataModule(
        dataset="cifar10", root=str(tmp_path), channels=3, batch_size=4, val_fraction=0.25
    )
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))
    # val: 5 of the 20 train images, held out of training; test: the test batch (6)
    assert x.shape == (4, 3, 32, 32) and len(dm.val_dataloader().dataset) == 5
    assert len(dm.train_dataloader().dataset) == 15
    # every fixture image is the constant 10 * label + 5 (0..255): in [-1, 1] that is v / 127.5 - 1
    allowed = torch.tensor([(10 * k + 5) / 127.5 - 1 for k in range(10)])
    assert (x - x[:, :1, :1, :1]).abs().max() < 1e-6  # constant images stay constant
    assert ((x[:, 0, 0, 0, None] - allowed).abs().min(1).values < 1e-5).all()


def test_imagefolder_evaluates_with_only_val(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / "val" / f"{i}.png", "RGB")
    dm = ImageDataModule(dataset="imagefolder", root=str(tmp_path), channels=3, batch_size=2)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader())).shape == (2, 3, 32, 32)
    # no test/: val/ chooses the checkpoint, so it is not the test (tests/test_protocol.py)
    with pytest.raises(FileNotFoundError, match=r"stage 'test' reads the test split.*cannot"):
        ImageDataModule(dataset="imagefolder", root=str(tmp_path), fid_floor=False).setup("test")
    with pytest.raises(FileNotFoundError, match=r"stage 'fit' reads the train split.*train"):
        dm.setup("fit")
    # predict reads no images at all: the GAN's own seeded latents, indices 0..n-1
    nowhere = ImageDataModule(dataset="imagefolder", root=str(tmp_path / "none"), num_samples=3)
    nowhere.setup("predict")
    assert next(iter(nowhere.predict_dataloader())).tolist() == [0, 1, 2]


def test_cifar10_tests_with_only_the_test_batch(tmp_path: Path) -> None:
    from tests.test_classification_data import write_cifar10

    write_cifar10(tmp_path)
    for i in range(1, 6):
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    kw = {"dataset": "cifar10", "root": str(tmp_path), "channels": 3, "batch_size": 4}
    dm = ImageDataModule(**kw, fid_floor=False)
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 6
    with pytest.raises(FileNotFoundError, match=r"stage 'validate' reads the val split"):
        dm.setup("validate")  # val is held out of the train batches
    with pytest.raises(FileNotFoundError, match=r"fid_floor: false"):
        ImageDataModule(**kw).setup("test")  # the floor's real images come from train


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("config", ["digits_dcgan", "digits_gan_mlp"])
def test_fast_dev_run_digits_configs(config: str, classifier: Path, tmp_path: Path) -> None:
    train(
        "fit",
        f"--config=configs/gan/{config}.yaml",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.classifier_weights={classifier}",
        *QUIET,
    )


def test_fit_predict_writes_grids_and_pngs(classifier: Path, tmp_path: Path) -> None:
    common = [
        "--config=configs/gan/digits_dcgan.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.classifier_weights={classifier}",
        "--model.g_width=8",
        "--model.d_width=8",
        "--data.max_eval_samples=64",
        *QUIET,
    ]
    train("fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--name=fit")
    run = tmp_path / "fit" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/fid"] > 0 and 0 < metrics["val/digit_confidence"] <= 1
    assert 0 <= metrics["val/class_entropy"] <= math.log(10) + 1e-6
    assert (run / "images" / "val_samples_epoch000.png").is_file()
    assert (run / "images" / "val_interpolation_epoch000.png").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    train("predict", *common, f"--ckpt_path={ckpt}", "--data.num_samples=10", "--name=pred")
    pred = tmp_path / "pred" / "version_0"
    rows = json.loads((pred / "predictions.json").read_text())
    assert [r["index"] for r in rows] == list(range(10))
    png = np.asarray(Image.open(pred / rows[3]["file"]))
    assert png.shape == (32, 32)
    assert list((pred / "images").glob("predict_samples_*.png"))


def write_celeba(root: Path, partitions: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2)) -> None:
    """torchvision's CelebA layout: aligned 178x218 JPEGs and the five list files."""
    base = root / "celeba"
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for i, name in enumerate(names):
        (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (178, 218), (40 * i, 100, 200)).save(base / "img_align_celeba" / name)
    rows = lambda values: "".join(f"{n} {v}\n" for n, v in zip(names, values, strict=True))  # noqa: E731
    (base / "list_eval_partition.txt").write_text(rows(partitions))
    (base / "identity_CelebA.txt").write_text(rows(range(len(names))))
    for file, cols in [
        ("list_bbox_celeba.txt", "x_1 y_1 width height"),
        ("list_landmarks_align_celeba.txt", "lefteye_x lefteye_y"),
        ("list_attr_celeba.txt", "Smiling Young"),
    ]:
        k = len(cols.split())
        (base / file).write_text(
            f"{len(names)}\n{cols}\n" + rows([" ".join(["1"] * k)] * len(names))
        )


def test_celeba_fixture_64_centre_crop(tmp_path: Path) -> None:
    write_celeba(tmp_path)
    dm = ImageDataModule(
        dataset="celeba", root=str(tmp_path), image_size=64, channels=3, batch_size=2
    )
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert len(dm.val_dataloader().dataset) == 2
    test = dm.test_dataloader().dataset  # the 2 test images + 2 train images for the FID floor
    assert [bool(test[i]["floor"]) for i in range(len(test))] == [False, False, True, True]
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        ImageDataModule(dataset="celeba", root=str(tmp_path / "none")).setup("fit")


def test_inception_fid_without_torch_fidelity_warns_and_trains(tmp_path: Path) -> None:
    """Real-data FID needs torch-fidelity and its weights: without them a warning and NaN."""
    for i in range(6):
        Image.new("RGB", (40, 48), (30 * i, 90, 160)).save(tmp_path / f"{i}.png")
    with pytest.warns(UserWarning, match="torch-fidelity is not installed|Inception weights"):
        model = DCGANModule(channels=3, fid_features="inception", classifier_weights=None, **TINY)
    assert model.val_fid is None
    dm = ImageDataModule(
        dataset="imagefolder", root=str(tmp_path), channels=3, batch_size=4, val_fraction=0.3
    )
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path / "run", **TRAINER)
    trainer.fit(model, datamodule=dm)
    assert (tmp_path / "run" / "images" / "val_samples_epoch000.png").is_file()
    assert math.isnan(trainer.callback_metrics["val/fid"].item())
    assert trainer.global_step == 2  # 4 train images, batch 4: one D step + one G step
