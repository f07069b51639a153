"""No model selection on the test set, and GAN numbers that do not move with the machine.

- Splits: the val split that chooses a checkpoint is fixed (seeded) and disjoint from the test
  split: VOC / SBD segmentation (`val_holdout`), DigitCanvas scenes, the GAN image data (CIFAR-10,
  image folders / LSUN, the digits' FID reference and floor), label-budget runs (val budgeted too).
- The GAN scores val and test on different latent vectors, with the configured sample counts,
  and logs the real-vs-real floor; its metrics are the same with 1 or 2 torch threads.
- `scripts/reproduce.py` tests the checkpoint chosen on val (best-*.ckpt), and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from PIL import Image
from scipy.io import savemat
from torchmetrics.image.fid import FrechetInceptionDistance

from datamodules.digits import DigitCanvas, DigitsDataModule, load_mnist5k
from datamodules.images import ImageDataModule
from datamodules.segmentation import SegmentationDataModule
from lit_modules.gan import DCGANModule, eval_seeds, seeded_latents
from tests.test_gan import TRAINER
from tests.test_segmentation import VOC_SIZES, write_voc

# ----------------------------------------------------------------------------- segmentation


def _write_sbd(root: Path, n: int) -> list[str]:
    names = [f"2010_{i:06d}" for i in range(n)]
    (root / "img").mkdir(parents=True)
    (root / "cls").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "img" / f"{name}.jpg")
        seg = np.full((8, 8), i % 21, np.uint8)
        savemat(root / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg}})
    (root / "train.txt").write_text("\n".join(names) + "\n")
    return names


def _ids(data) -> list[str]:
    files = data.dataset.images if hasattr(data, "indices") else data.images
    if hasattr(data, "indices"):
        files = [files[i] for i in data.indices]
    return [Path(f).stem for f in files]


def test_sbd_val_is_a_fixed_holdout_of_train_disjoint_from_seg11valid(tmp_path: Path) -> None:
    names = _write_sbd(tmp_path / "sbd", 20)
    write_voc(tmp_path / "voc", VOC_SIZES)
    listed = tmp_path / "seg11valid.txt"
    listed.write_text("2008_000001\n2008_000002\n")
    kw = {"source": "sbd", "root": str(tmp_path / "sbd"), "voc_root": str(tmp_path / "voc")}
    splits = []
    for _ in range(2):  # a second data module (another rank, a rerun) holds out the same images
        dm = SegmentationDataModule(**kw, val_list=str(listed), val_holdout=0.25)
        with pytest.warns(UserWarning, match="736"):
            dm.setup(None)
        splits.append({s: _ids(dm._sets[s]) for s in ("train", "val", "test")})
    first = splits[0]
    assert splits[1] == first
    assert len(first["val"]) == 5 and sorted(first["train"] + first["val"]) == names
    assert not set(first["val"]) & set(first["test"]) and first["test"] == [
        "2008_000001",
        "2008_000002",
    ]
    # without the option val is the test split, and a warning says so
    with pytest.warns(UserWarning, match="val is the test split"):
        SegmentationDataModule(**kw, val_list=str(listed)).setup("validate")


def test_voc_val_holdout_evaluates_without_seg_val(tmp_path: Path) -> None:
    write_voc(tmp_path, VOC_SIZES | {"2007_000039": (20, 20), "2007_000042": (20, 20)})
    dm = SegmentationDataModule(source="voc", root=str(tmp_path), val_holdout=0.3)
    dm.setup("fit")
    train, val = _ids(dm._sets["train"]), _ids(dm._sets["val"])
    assert len(val) == 1 and not set(train) & set(val)  # VOC2012 train.txt lists 2 images here
    dm.setup("test")
    assert not set(_ids(dm._sets["test"])) & set(val)


def test_digit_canvas_val_and_test_scenes_are_disjoint() -> None:
    """The digits segmentation configs choose on DigitCanvas val, report on test: different
    scenes, built from disjoint MNIST-5k digits."""
    split = load_mnist5k()
    val, test = DigitCanvas("val", length=20), DigitCanvas("test", length=20)
    assert val.digits is split["val"] and test.digits is split["test"]
    val_bytes = {img.tobytes() for img in split["val"].images}
    assert not any(img.tobytes() in val_bytes for img in split["test"].images)
    for i in range(20):
        assert not torch.equal(val[i]["image"], test[i]["image"])
    assert torch.equal(val[3]["image"], DigitCanvas("val", length=20)[3]["image"])  # fixed


# ----------------------------------------------------------------------------- GAN data


def test_cifar10_val_is_held_out_of_train_and_test_is_the_test_batch(tmp_path: Path) -> None:
    from tests.test_classification_data import write_cifar10

    write_cifar10(tmp_path)
    kw = {"dataset": "cifar10", "root": str(tmp_path), "channels": 3, "val_fraction": 0.25}
    dm = ImageDataModule(**kw)
    dm.setup(None)
    train, val = dm._sets["train"].indices, dm._sets["val"].indices
    assert len(val) == 5 and not set(train) & set(val) and len(train) + len(val) == 20
    assert dm._sets["val"].base.train and not dm._sets["test"].datasets[0].base.base.train
    other = ImageDataModule(**kw)
    other.setup("validate")
    assert other._sets["val"].indices == val  # seeded: the same on every rank and run
    # the floor's real images: as many train-batch images (not the test batch), none of val
    floor = dm._sets["test"].datasets[1].base  # Subset of the training _Subset
    cifar_ids = {floor.dataset.indices[i] for i in floor.indices}
    assert len(cifar_ids) == 6 and not cifar_ids & set(val)


def test_image_folder_holds_out_disjoint_val_and_test(tmp_path: Path) -> None:
    for i in range(40):
        Image.new("L", (8, 8), i).save(tmp_path / f"{i:02d}.png")
    kw = {"dataset": "imagefolder", "root": str(tmp_path), "val_fraction": 0.1}
    dm = ImageDataModule(**kw, test_fraction=0.2)
    dm.setup(None)
    files = {s: set(dm._folder_files(s, None)) for s in ("train", "val", "test")}
    assert [len(files[s]) for s in ("train", "val", "test")] == [28, 4, 8]
    assert not files["val"] & files["test"] and not files["train"] & (files["val"] | files["test"])
    test = dm._sets["test"]
    reference = set(test.datasets[0].base.paths)
    subset = test.datasets[1].base  # Subset of the train files
    floor = {subset.dataset.paths[i] for i in subset.indices}
    assert reference == files["test"] and len(floor) == 8 and floor <= files["train"]


def test_digits_test_reference_is_half_of_train_and_the_floor_the_other_half() -> None:
    dm = ImageDataModule(dataset="digits", test_reference="train")
    dm.setup("test")
    test = dm._sets["test"]
    reference, floor = test.datasets[0].base, test.datasets[1].base
    assert len(reference) == len(floor) == 2000
    assert not set(reference.indices) & set(floor.indices)
    item = test[0]
    assert set(item) == {"image", "floor"} and not item["floor"] and test[2000]["floor"]
    dm.setup("validate")
    assert len(dm._sets["val"]) == 500  # val (selection): the 500 val digits, not train or test


# ----------------------------------------------------------------------------- label budgets


def test_label_budget_budgets_val_too() -> None:
    def val_counts(**kw) -> list[int]:
        dm = DigitsDataModule(classes=[5, 6, 7, 8, 9], **kw)
        dm.setup("fit")
        return np.bincount(dm._sets["val"].labels.numpy()).tolist()

    assert val_counts(labels_per_class=10) == [10] * 5  # the train budget
    assert val_counts(labels_per_class=100) == [50] * 5  # capped by val's 50 per class
    assert val_counts(labels_per_class=10, val_labels_per_class=50) == [50] * 5
    assert val_counts() == [50] * 5  # no budget: all of val
    with pytest.raises(ValueError, match="val_labels_per_class"):
        DigitsDataModule(val_labels_per_class=51)


# ----------------------------------------------------------------------------- GAN metrics


def test_val_test_and_predict_draw_disjoint_latents() -> None:
    # the vectors, not only the seeds: torch's generator keeps a seed's low 32 bits only
    stages = ("val", "test", "predict")
    z = {s: seeded_latents(eval_seeds(0, s, list(range(2_000))), 4) for s in stages}
    rows = {s: {tuple(r) for r in z[s].tolist()} for s in stages}
    assert all(len(rows[s]) == 2_000 for s in stages)
    assert not rows["val"] & rows["test"] and not rows["val"] & rows["predict"]
    assert not rows["test"] & rows["predict"]
    seeds = [set(eval_seeds(7, s, list(range(50_000)))) for s in stages]
    assert not seeds[0] & seeds[1] and not seeds[0] & seeds[2] and not seeds[1] & seeds[2]
    assert max(max(s) for s in seeds) < 2**32
    assert torch.equal(seeded_latents([3], 4), seeded_latents(eval_seeds(0, "val", [3]), 4))


class _CountFID:
    """Records (real, fake) sample counts of every FID computed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: list[tuple[int, int]] = []
        compute = FrechetInceptionDistance.compute

        def spy(metric: FrechetInceptionDistance) -> torch.Tensor:
            real, fake = metric.real_features_num_samples, metric.fake_features_num_samples
            self.counts.append((int(real), int(fake)))
            return compute(metric)

        monkeypatch.setattr(FrechetInceptionDistance, "compute", spy)


def _tiny_gan(judge: Path, root: Path, threads: int, mkldnn: bool = True) -> dict[str, float]:
    """fit a few steps, validate and test the digits DCGAN with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            return _fit_and_test_tiny_gan(judge, root, steps=3)
    finally:
        torch.set_num_threads(before)


def _fit_and_test_tiny_gan(judge: Path, root: Path, steps: int) -> dict[str, float]:
    seed_everything(0)
    model = DCGANModule(
        g_width=8, d_width=8, classifier_weights=str(judge), fid_samples=30, num_grid_samples=0
    )
    dm = ImageDataModule(
        dataset="digits", test_reference="train", max_eval_samples=40, batch_size=16
    )
    trainer = Trainer(
        **TRAINER,
        max_steps=2 * steps,  # G's and D's steps
        limit_train_batches=steps,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=root,  # the interpolation pictures
    )
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    trainer.test(model, datamodule=dm, verbose=False)
    metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics


def test_fid_uses_the_configured_counts_and_logs_the_floor(
    judge: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _CountFID(monkeypatch)
    metrics = _tiny_gan(judge, tmp_path, threads=1)
    # val: 40 val digits vs 30 samples; test: 40 train digits vs 30 samples; floor: 40 vs 40
    assert sorted(spy.counts) == sorted([(40, 30), (40, 30), (40, 40)])
    assert metrics["test/fid_floor"] > 0 and metrics["test/fid"] > 0
    assert metrics["test/fid"] != metrics["val/fid"]  # other reference, other latents


def test_gan_metrics_do_not_depend_on_the_thread_count(judge: Path, tmp_path: Path) -> None:
    """Bitwise equal with 1 and 2 threads once oneDNN is off. With oneDNN (PyTorch's default
    on CPU) the weight gradients of D's first conv and G's transposed convs differ in the last
    bits (its backward-weights kernels sum per-thread partial sums; neither
    `use_deterministic_algorithms` nor `--trainer.deterministic` changes that), and so do the
    FIDs after a few steps (~1e-7 relative): the demo fixes the thread count instead."""
    one = _tiny_gan(judge, tmp_path / "1", threads=1, mkldnn=False)
    assert one == _tiny_gan(judge, tmp_path / "2", threads=2, mkldnn=False)


# ----------------------------------------------------------------------------- reproduce.py


def test_reproduce_tests_the_checkpoint_chosen_on_val(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts import reproduce

    tables = tmp_path / "tables"
    tables.mkdir()
    table = {
        "title": "tiny",
        "metrics": ["test/acc"],
        "selected_on": "the 50 val digits",
        "rows": [{"name": "scratch", "config": "transfer/digits_scratch.yaml", "paper": {}}],
    }
    (tables / "tiny.yaml").write_text(yaml.safe_dump(table))
    monkeypatch.setattr(reproduce, "TABLES", tables)
    tested: list[str | None] = []
    original = Trainer.test

    def spy(self: Trainer, *args, ckpt_path: str | None = None, **kw):  # noqa: ANN202
        tested.append(ckpt_path)
        return original(self, *args, ckpt_path=ckpt_path, **kw)

    monkeypatch.setattr(Trainer, "test", spy)
    smoke = [
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--data.max_eval_samples=50",
    ]
    md = reproduce.reproduce("tiny", quick=False, out=tmp_path / "out", extra=smoke)
    result = json.loads((tmp_path / "out" / "tiny.json").read_text())
    row = result["rows"][0]
    chosen = row["selection"]
    assert len(tested) == 1 and Path(tested[0]).name == chosen["checkpoint"]
    assert chosen["checkpoint"].startswith("best-") and chosen["monitor"] == "val/acc"
    assert result["protocol"]["selected_on"] == "the 50 val digits"
    assert result["protocol"]["compared"] == ["test/acc"]
    text = md.read_text()
    assert "Checkpoint chosen on: the 50 val digits" in text and chosen["checkpoint"] in text
