"""Detection data: equal batches per DDP rank, the val hold-out, COCO's `area`, predictions.json
merged across ranks, and two small fixes (no -0.0 in metrics.json, the SVM's label budget)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from datamodules.common import EpochShuffleSampler
from datamodules.detection import DetectionDataModule, holdout_indices
from datamodules.formats.coco import read_coco
from datamodules.formats.voc import read_voc
from datamodules.samplers import GroupedBatchSampler
from lit_modules.callbacks import MetricsJSON, PredictionsJSON, merge_rows
from lit_modules.detection import FasterRCNNModule
from scripts import gan_features_svm
from scripts.make_digit_canvases import DIGIT_CLASSES, make
from tests.test_cli import QUIET
from tests.test_ddp import DDP, launch
from tests.test_detection import _trainer

WIDE, TALL = (48, 32), (32, 48)  # (width, height)


def write_coco(root: Path, split: str, sizes: list[tuple[int, int]]) -> Path:
    """`root/<split>/` images of `sizes` (noise) and their json: two boxes per image."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    g = np.random.default_rng(len(sizes))
    images, annotations = [], []
    for k, (w, h) in enumerate(sizes):
        name = f"{k + 1:04d}.png"
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
        for j, box in enumerate(([2, 3, 14, 12], [10, 8, 16, 20])):
            annotations.append(
                {"id": 2 * k + j + 1, "image_id": k + 1, "category_id": 1 + (k + j) % 3}
                | {"bbox": box, "iscrowd": 0}
            )
    cats = [{"id": i, "name": str(i)} for i in (1, 2, 3)]
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return ann


# ----------------------------------------------------------------------------- equal batches


def _dealt(n: int, groups: list[int], world: int, batch: int, epoch: int) -> list[list[list[int]]]:
    """The batches of every rank, with the DistributedSampler Lightning injects under DDP."""
    out = []
    for rank in range(world):
        shard = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        shard.set_epoch(epoch)
        sampler = GroupedBatchSampler(shard, batch, False, groups, seed=5)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("n", [1, 7, 9, 40])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_grouped_sampler_gives_every_rank_as_many_batches(n: int, world: int) -> None:
    groups = [int(i % 3 == 0) for i in range(n)]  # mixed wide / tall, an odd count of each
    for batch in (2, 3):
        epochs = [_dealt(n, groups, world, batch, epoch) for epoch in (0, 1)]
        for ranks in epochs:
            assert len({len(r) for r in ranks}) == 1, [len(r) for r in ranks]
            seen = [i for r in ranks for b in r for i in b]
            assert set(seen) == set(range(n))  # every image at least once per epoch
            assert all(len({groups[i] for i in b}) == 1 for r in ranks for b in r)
            assert all(len(b) <= batch for r in ranks for b in r)
        assert _dealt(n, groups, world, batch, 1) == epochs[1]  # a function of (seed, epoch)
        if n >= 9:
            assert epochs[0] != epochs[1]  # another shuffle each epoch
        if world == 1:  # one process: the epoch comes from the datamodule's EpochShuffleSampler
            alone = GroupedBatchSampler(EpochShuffleSampler(range(n)), batch, False, groups, seed=5)
            alone.sampler.set_epoch(1)  # what Lightning calls before every epoch
            assert list(alone) == epochs[1][0]
    # the case: 40 images, 2 ranks, batch 2 gave 11 and 10 batches
    assert [len(r) for r in _dealt(40, [i % 2 for i in range(39)] + [0], 2, 2, 0)] == [11, 11]


def _lightning_ddp_loaders(dm: DetectionDataModule, world: int) -> list[DataLoader]:
    """The training loader of every rank as Lightning rebuilds it under DDP."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook: init arguments recorded
    out = []
    for rank in range(world):
        sampler = _get_distributed_sampler(
            loader, shuffle=True, overfit_batches=0, num_replicas=world, rank=rank
        )
        out.append(_update_dataloader(loader, sampler))
    return out


@pytest.mark.parametrize("grouped", [True, False])
def test_training_loaders_have_equal_lengths_after_lightnings_ddp_swap(
    tmp_path: Path, grouped: bool
) -> None:
    """Grouped (sampler injected into GroupedBatchSampler) and plain (EpochShuffleSampler
    replaced by a DistributedSampler, which pads): every rank, the same number of batches."""
    write_coco(tmp_path, "train", [WIDE] * 3 + [TALL] * 4)
    dm = DetectionDataModule(
        source="coco",
        root=str(tmp_path),
        train_split="train",
        val_split="train",
        group_aspect_ratio=grouped,
        batch_size=2,
    )
    dm.setup("fit")
    for world in (2, 3):
        loaders = _lightning_ddp_loaders(dm, world)
        batches = [list(dl.batch_sampler) for dl in loaders]
        assert len({len(b) for b in batches}) == 1 and len(loaders[0]) == len(batches[0])
        assert {i for b in batches for batch in b for i in batch} == set(range(7))
        if grouped:
            assert all(isinstance(dl.batch_sampler, GroupedBatchSampler) for dl in loaders)


class StepsPerRank(Callback):
    """Writes `rank<R>.json` into `out`: optimizer steps, batches per epoch and images seen."""

    def __init__(self, out: str) -> None:
        self.out, self.batches, self.images = Path(out), {}, {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        epoch = str(trainer.current_epoch)
        self.batches[epoch] = self.batches.get(epoch, 0) + 1
        self.images.setdefault(epoch, []).extend(t["image_id"] for t in batch[1])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {"steps": trainer.global_step, "batches": self.batches, "images": self.images}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow  # multi-process: `make test` runs it in its own step
def test_2_process_grouped_fit_finishes_with_equal_steps_and_predict_merges(
    tmp_path: Path,
) -> None:
    """8 training images, 3 wide and 5 tall, batch 2, 2 ranks: the old sampler gave one rank 3
    batches and the other 2 in every epoch (the wide counts of the two shards differ in parity),
    so DDP's gradient all-reduces did not pair up. Then a 2-process predict of the checkpoint on 5
    test images (3 + 2 per rank) writes ONE predictions.json equal to the 1-process one."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    train_pos, _ = holdout_indices(10, 2, 0)  # the 8 images the val hold-out leaves for training
    write_coco(data, "train", [WIDE if k in train_pos[:3] else TALL for k in range(10)])
    write_coco(data, "test", [WIDE, TALL, TALL, WIDE, TALL])
    runs.mkdir()
    common = [
        "--config=configs/detection/digits_faster_rcnn.yaml",
        "--model.weights_backbone=null",
        "--model.num_classes=4",
        "--model.min_size=48",
        "--model.max_size=48",
        "--model.num_sample_images=0",
        "--data.source=coco",
        "--data.scale_jitter=null",  # COCO-format images: no fixed square to crop to
        f"--data.root={data}",
        "--data.test_split=test",
        "--data.batch_size=2",
        "--data.eval_batch_size=2",
        *DDP,
        f"--trainer.default_root_dir={runs}",
        *QUIET,
    ]
    steps = json.dumps(
        [{"class_path": f"{__name__}.StepsPerRank", "init_args": {"out": str(runs)}}]
    )
    fit = [
        "fit",
        *common,
        "--data.train_split=train",
        "--data.val_holdout=2",
        "--data.group_aspect_ratio=true",
        "--data.photometric=false",
        "--trainer.max_epochs=2",
        "--trainer.max_steps=-1",
        "--trainer.val_check_interval=1.0",
        f"--trainer.callbacks={steps}",
        "--name=fit",
    ]
    ckpt = runs / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    predict = ["predict", *common, f"--ckpt_path={ckpt}", "--name=predict"]
    assert launch([fit, predict], tmp_path / "results.json", world_size=2) == ["ok", "ok"]

    ranks = [json.loads((runs / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6  # 5 grouped batches, padded to 6: 3 each
    assert ranks[0]["batches"] == ranks[1]["batches"] == {"0": 3, "1": 3}
    for epoch in ("0", "1"):
        seen = set(ranks[0]["images"][epoch]) | set(ranks[1]["images"][epoch])
        assert seen == {k + 1 for k in train_pos}  # every training image, no held-out one

    folder = runs / "predict" / "version_0"
    assert [p.name for p in folder.glob("predictions*.json")] == ["predictions.json"]
    merged = json.loads((folder / "predictions.json").read_text())
    module = FasterRCNNModule.load_from_checkpoint(ckpt, map_location="cpu")
    dm = DetectionDataModule(source="coco", root=str(data), test_split="test", batch_size=2)
    one = tmp_path / "one"
    _trainer(one, callbacks=[PredictionsJSON()]).predict(module, datamodule=dm)
    single = json.loads((one / "predictions.json").read_text())
    ids = [r["image_id"] for r in merged]
    assert ids == [r["image_id"] for r in single] and set(ids) == {1, 2, 3, 4, 5}
    assert ids == sorted(ids)  # each image once, its rows together, in data-set order
    for a, b in zip(merged, single, strict=True):
        assert a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_merge_rows_orders_by_image_and_keeps_each_images_rows() -> None:
    rank0 = [{"image_id": 1, "s": 0.9}, {"image_id": 1, "s": 0.2}, {"image_id": 3, "s": 0.5}]
    rank1 = [{"image_id": 2, "s": 0.7}, {"image_id": 4, "s": 0.1}]
    assert [(r["image_id"], r["s"]) for r in merge_rows([rank0, rank1])] == [
        (1, 0.9), (1, 0.2), (2, 0.7), (3, 0.5), (4, 0.1)
    ]  # fmt: skip
    assert merge_rows([[{"index": 2}], [{"index": 1}]]) == [{"index": 1}, {"index": 2}]
    assert merge_rows([[], []]) == []


# ----------------------------------------------------------------------------- val hold-out


def test_val_holdout_is_a_fixed_seeded_disjoint_part_of_train(tmp_path: Path) -> None:
    write_coco(tmp_path, "train", [WIDE, TALL] * 5)

    def ids(holdout: Any, seed: int = 0, stage: str = "fit") -> dict[str, list[int]]:
        dm = DetectionDataModule(
            source="coco", root=str(tmp_path), train_split="train", val_holdout=holdout, seed=seed
        )
        dm.setup(stage)
        return {k: sorted(r.image_id for r in ds.records) for k, ds in dm._sets.items()}

    split = ids(3)
    assert len(split["train"]) == 7 and len(split["val"]) == 3
    assert sorted(split["train"] + split["val"]) == list(range(1, 11))  # disjoint, nothing lost
    assert ids(3) == split and ids(3, stage="validate")["val"] == split["val"]  # fixed
    assert ids(3, seed=1) != split  # seeded
    assert len(ids(0.2)["val"]) == 2
    dm = DetectionDataModule(source="coco", root=str(tmp_path), train_split="train", val_holdout=3)
    dm.setup("fit")
    assert not dm._sets["val"].transform.transforms[1:]  # val is evaluated: no augmentation
    for bad, match in (
        ({"val_holdout": 10}, "holds out 10 of the 10"),
        ({"val_holdout": 0}, "number of images >= 1"),
        ({"val_holdout": 1.5}, "number of images >= 1"),
        ({"val_holdout": 2, "val_split": "train"}, "not both"),
    ):
        with pytest.raises(ValueError, match=match):
            DetectionDataModule(
                source="coco", root=str(tmp_path), train_split="train", **bad
            ).setup("fit")
    with pytest.raises(ValueError, match="val_holdout is for coco / voc"):
        DetectionDataModule(val_holdout=2)
    with pytest.raises(ValueError, match=r"reads the train split, but `train_split \(val_holdout"):
        DetectionDataModule(source="coco", root=str(tmp_path), val_holdout=2).setup("validate")


def test_val_holdout_spans_every_train_split_of_voc(tmp_path: Path) -> None:
    """07+12: the hold-out is drawn from both lists, disjoint from what trains."""
    kw = {"size": 64, "num_digits": (1, 2), "digit_size": (16, 28)}
    make("voc", tmp_path, 6, "train", **kw)  # VOC2007, ids 1..6
    records = read_voc(tmp_path, "2007", "train", classes=DIGIT_CLASSES)
    base = tmp_path / "VOC2007" / "ImageSets" / "Main"
    (base / "first.txt").write_text("".join(f"{r.file.stem}\n" for r in records[:4]))
    (base / "second.txt").write_text("".join(f"{r.file.stem}\n" for r in records[4:]))
    dm = DetectionDataModule(
        source="voc",
        root=str(tmp_path),
        classes=DIGIT_CLASSES,
        train_split=["2007/first", "2007/second"],
        val_holdout=2,
    )
    dm.setup("fit")
    train = {r.image_id for r in dm._sets["train"].records}
    val = {r.image_id for r in dm._sets["val"].records}
    assert len(train) == 4 and len(val) == 2 and train | val == {r.image_id for r in records}


# ----------------------------------------------------------------------------- area


def test_target_area_is_cocos_annotation_area_else_the_box_area(tmp_path: Path) -> None:
    ann = write_coco(tmp_path, "val", [WIDE])
    data = json.loads(ann.read_text())
    data["annotations"][0]["area"] = 57.5  # a segment's area, not the box's 12 x 9
    data["annotations"].insert(  # degenerate: dropped, and its area with it
        1, {"id": 9, "image_id": 1, "category_id": 1, "bbox": [60, 1, 5, 5], "area": 3.0}
    )
    data["annotations"][2]["bbox"] = [40, 8, 16, 20]  # clipped to the image: x2 = 48
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="clipped 1 box"):
        records, _ = read_coco(ann, tmp_path / "val")
    assert records[0].area.dtype == np.float32
    np.testing.assert_allclose(records[0].area, [57.5, 8 * 20])
    dm = DetectionDataModule(source="coco", root=str(tmp_path), val_split="val")
    with pytest.warns(UserWarning):
        dm.setup("validate")
    _, target = dm._sets["val"][0]
    assert target["area"].dtype == torch.float32
    torch.testing.assert_close(target["area"], torch.tensor([57.5, 160.0]))
    assert len(target["area"]) == len(target["boxes"]) == len(target["iscrowd"])
    data["annotations"][0]["area"] = "big"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotation id 1: area must be a number"):
        read_coco(ann, tmp_path / "val")


def test_target_area_of_voc_and_digits_is_the_box_area_and_follows_augmentation(
    tmp_path: Path,
) -> None:
    make("voc", tmp_path, 2, "val", size=64, num_digits=(1, 3), digit_size=(16, 28))
    dm = DetectionDataModule(
        source="voc", root=str(tmp_path), classes=DIGIT_CLASSES, val_split="2007/val"
    )
    dm.setup("validate")
    _, t = dm._sets["val"][0]
    b = t["boxes"]
    torch.testing.assert_close(t["area"], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    jitter = DetectionDataModule(
        source="digits", canvas_size=64, scale_jitter=(0.3, 2.0), train_length=12
    )
    jitter.setup("fit")
    for _, t in (jitter._sets["train"][i] for i in range(12)):  # boxes cropped away go
        assert t["area"].dtype == torch.float32 and len(t["area"]) == len(t["boxes"])


# ----------------------------------------------------------------------------- small fixes


def test_metrics_json_writes_no_negative_zero(tmp_path: Path) -> None:
    trainer = SimpleNamespace(
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        is_global_zero=True,
        state=SimpleNamespace(fn=TrainerFn.VALIDATING),
        ckpt_path=None,
        callback_metrics={"val/class_entropy": torch.tensor(-0.0), "val/x": -0.0, "val/y": -1.5},
    )
    MetricsJSON()._write(trainer)  # type: ignore[arg-type]
    text = (tmp_path / "metrics.json").read_text()
    assert "-0.0" not in text
    assert json.loads(text) == {"val/class_entropy": 0.0, "val/x": 0.0, "val/y": -1.5}


def test_svm_label_budget_below_the_cross_validation_minimum_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        gan_features_svm.main(["--ckpt", "none.ckpt", "--labels-per-class", "1", "10"])
    err = capsys.readouterr().err
    assert "--labels-per-class 1 10" in err and "2..400" in err and "minimum" in err
    x, y = np.zeros((3, 4)), np.array([0, 1, 1])
    with pytest.raises(ValueError, match=r"1 labelled example\(s\) per class .* minimum .* is 2"):
        gan_features_svm.svm_accuracy(x, y, x, y)


def test_svm_baselines_need_no_checkpoint_and_match_the_configs_d() -> None:
    """The demo runs the random-D and pixel baselines while DCGAN trains: from the config's
    hyper-parameters, which must give the D a DCGANModule of that config builds."""
    from lit_modules.gan import DCGANModule
    from scripts.demo_gan import config_hparams

    hp = config_hparams("gan/digits_dcgan.yaml")
    args = yaml.safe_load(Path("configs/gan/digits_dcgan.yaml").read_text())["model"]["init_args"]
    module = DCGANModule(**args)
    assert gan_features_svm._d_kwargs(hp) == gan_features_svm._d_kwargs(dict(module.hparams))
    with pytest.raises(ValueError, match="needs the GAN checkpoint"):
        gan_features_svm.run_svm(None, sets=("trained_d",), hp=hp)
    with pytest.raises(ValueError, match="unknown feature sets"):
        gan_features_svm.run_svm(None, sets=("sift",), hp=hp)
