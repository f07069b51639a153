"""TransferClassifier without the CLI: bad input, the three modes, source head, linear-probe paths."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from datamodules.digits import DigitsDataModule
from lit_modules.nets.backbones import BACKBONES
from lit_modules.transfer import HEADS, MODES, TransferClassifier

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def _trainer(root: Path, **kw: Any) -> Trainer:
    kw = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        **kw,
    }
    return Trainer(**kw)


def _dm(**kw: Any) -> DigitsDataModule:
    return DigitsDataModule(**{"classes": TARGET, "batch_size": 32, "max_eval_samples": 32, **kw})


def _stage_groups(module: TransferClassifier) -> list[set[int]]:
    return [{id(p) for p in s.parameters()} for s in module.net.stages]


def _group_ids(opt: torch.optim.Optimizer) -> list[set[int]]:
    return [{id(p) for p in g["params"]} for g in opt.param_groups]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "valid"),
    [
        ({"backbone": "alexnet9000"}, BACKBONES),
        ({"mode": "distill"}, MODES),
        ({"head": "knn"}, HEADS),
    ],
)
def test_unknown_choices_list_the_valid_ones(kw: dict, valid: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        TransferClassifier(**kw)
    message = str(err.value)
    assert repr(next(iter(kw.values()))) in message
    assert all(choice in message for choice in valid), message


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "source.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        TransferClassifier(weights=str(path), num_classes=5)


def test_corrupt_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TransferClassifier(weights=str(path), num_classes=5)


def test_weights_file_without_tensors_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "numbers.pt"
    # loads under weights_only=True, but holds no tensors
    torch.save({"state_dict": {"w": 3, "b": [1, 2]}}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TransferClassifier(weights=str(path), num_classes=5)


def _write_marker(path: str) -> None:
    Path(path).write_text("code from a weights file ran")


class _Payload:
    """Unpickling this object calls `_write_marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _write_marker, (str(self.marker),)


@pytest.mark.parametrize("nested", [True, False])
def test_pickled_code_is_refused_and_never_run(tmp_path: Path, nested: bool) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    payload = _Payload(marker)
    obj = {"state_dict": {"w": torch.zeros(2), "evil": payload}} if nested else payload
    torch.save(obj, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TransferClassifier(weights=str(path), num_classes=5)
    assert not marker.exists(), "loading the weights file executed its code"
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would run it
    assert marker.exists()


def test_scratch_with_weights_raises(source_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="scratch"):
        TransferClassifier(weights=str(source_ckpt), num_classes=5, mode="scratch")


@pytest.mark.parametrize("k", [-1, 5])
def test_trainable_stages_out_of_range(source_ckpt: Path, k: int) -> None:
    # digits_cnn has 4 stages: 0..4 are valid
    TransferClassifier(weights=str(source_ckpt), num_classes=5, trainable_stages=4)
    with pytest.raises(ValueError, match="trainable_stages"):
        TransferClassifier(weights=str(source_ckpt), num_classes=5, trainable_stages=k)


# ----------------------------------------------------------------------------- modes


def test_linear_probe_trains_only_the_head(source_ckpt: Path) -> None:
    module = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="linear_probe", scheduler="none"
    )
    assert not any(p.requires_grad for p in module.net.stages.parameters())
    assert not any(m.training for s in module.net.stages for m in s.modules())
    assert all(p.requires_grad for p in module.net.head.parameters())
    opt = module.configure_optimizers()
    assert _group_ids(opt) == [{id(p) for p in module.net.head.parameters()}]


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_finetune_top_k_stages(source_ckpt: Path, k: int) -> None:
    lr, mult = 0.01, 0.25
    module = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        mode="finetune",
        trainable_stages=k,
        lr=lr,
        backbone_lr_mult=mult,
        scheduler="none",
    )
    n = len(module.net.stages)
    for i, stage in enumerate(module.net.stages):
        assert all(p.requires_grad == (i >= n - k) for p in stage.parameters()), i
    opt = module.configure_optimizers()
    groups = _group_ids(opt)
    assert groups[0] == {id(p) for p in module.net.head.parameters()}
    assert opt.param_groups[0]["lr"] == lr
    top = set().union(*_stage_groups(module)[n - k :])
    if k == 0:
        assert len(groups) == 1
    else:
        assert len(groups) == 2 and groups[1] == top
        assert opt.param_groups[1]["lr"] == pytest.approx(lr * mult)
    assert not any(id(p) in g for p in module.net.source_head.parameters() for g in groups)


def test_scratch_trains_everything_at_one_lr() -> None:
    module = TransferClassifier(num_classes=5, mode="scratch", lr=0.01, scheduler="none")
    assert module.net.source_head is None
    assert all(p.requires_grad for p in module.net.parameters())
    opt = module.configure_optimizers()
    assert set().union(*_group_ids(opt)) == {id(p) for p in module.net.parameters()}
    assert all(g["lr"] == 0.01 for g in opt.param_groups)


def test_finetune_optimizer_under_a_trainer(tmp_path: Path, source_ckpt: Path) -> None:
    """The real path: Lightning calls configure_optimizers (cosine schedule over the run's steps)."""
    module = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        trainable_stages=2,
        lr=0.02,
        backbone_lr_mult=0.1,
        num_sample_images=4,
    )
    trainer = _trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=_dm())
    (opt,) = trainer.optimizers
    n = len(module.net.stages)
    assert _group_ids(opt) == [
        {id(p) for p in module.net.head.parameters()},
        set().union(*_stage_groups(module)[n - 2 :]),
    ]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.002])
    assert len(trainer.lr_scheduler_configs) == 1
    assert list((tmp_path / "images").glob("val_predictions_epoch*.png"))  # validation picture


def test_gradual_unfreezing_thaws_one_stage_per_epoch(tmp_path: Path, source_ckpt: Path) -> None:
    frozen: list[int] = []

    class Record(Callback):
        def on_train_batch_start(
            self, trainer: Trainer, pl_module: LightningModule, *args: Any
        ) -> None:
            frozen.append(pl_module.net.num_frozen)

    module = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        trainable_stages=1,
        unfreeze_every=1,
        num_sample_images=0,
    )
    trainer = _trainer(
        tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[Record()]
    )
    trainer.fit(module, datamodule=_dm())
    assert frozen == [3, 2, 1]  # 4 stages: 1, 2, 3 trainable
    (opt,) = trainer.optimizers  # every stage is in the optimizer from the start
    assert set().union(*_group_ids(opt)) >= {id(p) for p in module.net.stages.parameters()}


# ----------------------------------------------------------------------------- source head


def test_source_head_and_stages_come_from_the_checkpoint(source_ckpt: Path) -> None:
    state = torch.load(source_ckpt, weights_only=True)["state_dict"]
    module = TransferClassifier(weights=str(source_ckpt), num_classes=5, mode="finetune")
    source = module.net.source_head
    assert source is not None and not any(p.requires_grad for p in source.parameters())
    assert torch.equal(source.weight, state["net.head.weight"])
    assert torch.equal(source.bias, state["net.head.bias"])
    stages = module.net.stages.state_dict()
    expected = {
        k.removeprefix("net.stages."): v for k, v in state.items() if k.startswith("net.stages.")
    }
    assert stages.keys() == expected.keys()
    assert all(torch.equal(stages[k], expected[k]) for k in stages)
    assert not torch.equal(module.net.head.weight, source.weight)  # the new head is new


def test_test_reports_target_and_source_accuracy(tmp_path: Path, source_ckpt: Path) -> None:
    module = TransferClassifier(weights=str(source_ckpt), num_classes=5, mode="finetune")
    trainer = _trainer(tmp_path)
    dm = _dm(source_classes=SOURCE)
    results = trainer.test(module, datamodule=dm)
    metrics = {k: v for r in results for k, v in r.items()}
    assert {"test/acc", "test/source_acc"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("test/acc", "test/source_acc"))


# ----------------------------------------------------------------------------- linear probe


def _frozen_state(module: TransferClassifier) -> dict[str, torch.Tensor]:
    """Every stage parameter and buffer (BN running stats, num_batches_tracked) and the source head."""
    state = {f"stages.{k}": v.clone() for k, v in module.net.stages.state_dict().items()}
    state |= {f"source_head.{k}": v.clone() for k, v in module.net.source_head.state_dict().items()}
    return state


def _short_fit(tmp_path: Path, module: TransferClassifier, dm: DigitsDataModule) -> None:
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=dm)


def test_linear_probe_keeps_the_source_task_exactly(tmp_path: Path, source_ckpt: Path) -> None:
    seed_everything(0)
    dm = _dm(source_classes=SOURCE)
    probe = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        mode="linear_probe",
        cache_features=False,
        reg_grid=None,  # the head trains by gradient descent on images
        lr=0.05,
        num_sample_images=0,
    )
    before = _frozen_state(probe)
    head_before = probe.net.head.weight.detach().clone()
    source_before = _trainer(tmp_path).test(probe, datamodule=dm)[1]["test/source_acc"]
    _short_fit(tmp_path, probe, dm)
    after = _frozen_state(probe)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a linear probe changed frozen tensors: {changed}"
    assert not torch.equal(head_before, probe.net.head.weight)  # while the head did learn
    source_after = _trainer(tmp_path).test(probe, datamodule=dm)[1]["test/source_acc"]
    assert source_after == source_before

    finetune = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="finetune", lr=0.05, num_sample_images=0
    )
    before = _frozen_state(finetune)
    _short_fit(tmp_path, finetune, dm)
    after = _frozen_state(finetune)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("running_mean") for k in changed)  # BatchNorm statistics moved
    # the bottom stage learned too
    assert any(k.startswith("stages.0.") and k.endswith(".weight") for k in changed)
    assert not any(k.startswith("source_head.") for k in changed)  # the source head is kept as is


class _Spy(Callback):
    """Records the training batches' shapes, the losses, and stage calls inside training steps."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.losses: list[float] = []
        self.calls = 0
        self.calls_in_training = 0
        self._at_start = 0

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for stage in pl_module.net.stages:  # after setup: the feature extraction is done
            stage.register_forward_hook(self._count)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.shapes.append(tuple(batch[0].shape))
        self._at_start = self.calls

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.calls_in_training += self.calls - self._at_start
        self.losses.append(float(outputs["loss"]))


def test_cached_features_train_the_head_on_vectors(tmp_path: Path, source_ckpt: Path) -> None:
    seed_everything(0)
    module = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        mode="linear_probe",
        cache_features=True,
        reg_grid=None,  # gradient descent on the cached vectors (not the C grid)
        lr=0.1,  # the random source net's features are small: a large step for the head
        scheduler="none",
        num_sample_images=0,
    )
    spy = _Spy()
    dm = _dm(labels_per_class=40, max_eval_samples=100)
    epochs = 12
    trainer = _trainer(tmp_path, max_epochs=epochs, check_val_every_n_epoch=epochs, callbacks=[spy])
    trainer.fit(module, datamodule=dm)
    dim = module.net.feature_dim
    assert len(spy.shapes) == epochs * 7  # 200 cached vectors in batches of 32, every epoch
    assert all(len(s) == 2 and s[1] == dim for s in spy.shapes), spy.shapes[:3]
    assert spy.calls_in_training == 0, "the frozen stages ran during training steps"
    assert spy.calls > 0  # ...but validation still runs them on images
    first, last = sum(spy.losses[:7]) / 7, sum(spy.losses[-7:]) / 7
    assert last < first - 0.1, (first, last)
    assert float(trainer.callback_metrics["val/acc"]) > 0.4  # 5 classes: chance is 0.2


def test_cached_features_do_not_leak_into_the_next_fit(tmp_path: Path, source_ckpt: Path) -> None:
    dm = _dm(labels_per_class=8)
    probe = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="linear_probe", num_sample_images=0
    )
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(probe, datamodule=dm)
    spy = _Spy()
    finetune = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="finetune", num_sample_images=0
    )
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[spy]).fit(
        finetune, datamodule=dm
    )
    assert spy.shapes and all(len(s) == 4 for s in spy.shapes), spy.shapes


def test_svm_head_and_a_cut_below_the_top(tmp_path: Path, source_ckpt: Path) -> None:
    """head=svm with feature_stages=3: the last conv stage max-pooled to 4x4 (64 * 16 = 1024-d)."""
    module = TransferClassifier(
        weights=str(source_ckpt),
        num_classes=5,
        mode="linear_probe",
        head="svm",
        feature_stages=3,
        num_sample_images=0,
    )
    assert module.net.feature_dim == 64 * 4 * 4
    spy = _Spy()
    trainer = _trainer(tmp_path, fast_dev_run=2, callbacks=[spy])
    trainer.fit(module, datamodule=_dm(source_classes=SOURCE))
    assert spy.shapes == [(32, 1024), (32, 1024)]
    assert torch.isfinite(torch.tensor(spy.losses)).all()
    (opt,) = trainer.optimizers
    assert _group_ids(opt) == [{id(p) for p in module.net.head.parameters()}]
    metrics = {
        k: v
        for r in trainer.test(module, datamodule=_dm(source_classes=SOURCE))
        for k, v in r.items()
    }
    assert {"test/acc", "test/source_acc"} <= set(metrics)


def test_scratch_learns_digits(tmp_path: Path) -> None:
    seed_everything(0)
    module = TransferClassifier(num_classes=10, mode="scratch", lr=3e-3, num_sample_images=0)
    dm = DigitsDataModule(labels_per_class=20, batch_size=32, max_eval_samples=200)
    trainer = _trainer(tmp_path, max_epochs=5, num_sanity_val_steps=0, check_val_every_n_epoch=5)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5 * 7
    acc = float(trainer.callback_metrics["val/acc"])
    assert acc > 0.3, acc  # 10 classes: chance is 0.1


def test_predict_and_input_check(tmp_path: Path) -> None:
    module = TransferClassifier(num_classes=5, mode="scratch", num_sample_images=0)
    with pytest.raises(ValueError, match="channel"):
        module._check_input(torch.zeros(2, 3, 28, 28))
    out = module.predict_step((torch.zeros(4, 1, 28, 28), torch.zeros(4)), 0)
    assert out["pred"].shape == (4,) and out["score"].shape == (4,)
    rows = module.format_predictions([out])
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
