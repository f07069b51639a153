"""Recipes as the papers state them: linear heads with C chosen on val, the frozen-feature cache,
the FCN staged learning rates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from sklearn.svm import LinearSVC
from torch.utils.data import DataLoader

from datamodules.digits import DigitsDataModule
from lit_modules import linear_probe
from lit_modules.linear_probe import (
    FEATURES,
    KORNBLITH_GRID,
    cache_key,
    eval_view,
    linear_weights,
    make_classifier,
    select_on_val,
)
from lit_modules.transfer import TransferClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGET = [5, 6, 7, 8, 9]


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    FEATURES.clear()


def _trainer(root: Path, **kw: Any) -> Trainer:
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}
    defaults |= {"enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(default_root_dir=root, **defaults, **kw)


def _dm(**kw: Any) -> DigitsDataModule:
    return DigitsDataModule(
        **{
            "classes": TARGET,
            "batch_size": 32,
            "labels_per_class": 10,
            "max_eval_samples": 50,
            **kw,
        }
    )


def _blobs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` points per class around `k` well separated centres in 6-d."""
    rng = np.random.default_rng(seed)
    centres = np.eye(6)[:k] * 4.0
    y = np.repeat(np.arange(k), n)
    return (centres[y] + rng.normal(size=(len(y), 6))).astype(np.float32), y


# ----------------------------------------------------------------------------- C chosen on val


class _Stub:
    """A classifier whose val accuracy is a known function of C."""

    ACC = {0.01: 0.6, 0.1: 0.9, 1.0: 0.9, 10.0: 0.7}

    def __init__(self, kind: str, c: float, seed: int = 0) -> None:
        self.c = c

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Stub:
        return self

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return self.ACC[self.c]


def test_grid_picks_the_best_val_c_and_the_smaller_of_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_probe, "make_classifier", _Stub)
    data = (np.zeros((4, 2)), np.arange(4))
    pick = select_on_val("svm", data, data, [10.0, 1.0, 0.01, 0.1])
    assert (pick.c, pick.val_acc) == (0.1, 0.9)  # 0.1 and 1 tie: the stronger prior wins
    assert pick.curve == _Stub.ACC


@pytest.mark.parametrize("kind", ["svm", "logreg"])
def test_grid_keeps_the_real_classifier_it_scored(kind: str) -> None:
    x, y = _blobs(20, 3, seed=0)
    val = _blobs(20, 3, seed=1)
    pick = select_on_val(kind, (x, y), val, [1e-4, 1e-2, 1.0])
    assert pick.val_acc == max(pick.curve.values()) == pick.model.score(*val)
    assert pick.c == min(c for c, acc in pick.curve.items() if acc == pick.val_acc)
    assert pick.c == pick.model[-1].C


def test_kornblith_grid_is_45_log_spaced_values() -> None:
    grid = np.array(KORNBLITH_GRID)
    assert len(grid) == 45 and grid[0] == 1e-6 and grid[-1] == 1e5
    assert np.allclose(np.diff(np.log10(grid)), 0.25, atol=1e-3)


@pytest.mark.parametrize(("kind", "k"), [("svm", 3), ("svm", 2), ("logreg", 3), ("logreg", 2)])
def test_head_weights_reproduce_the_sklearn_classifier(kind: str, k: int) -> None:
    """C is LinearSVC's / LogisticRegression's C: the nn.Linear head (StandardScaler folded in)
    gives the fitted classifier's decisions, and its probabilities for logistic regression."""
    x, y = _blobs(15, k, seed=2)
    x = x * np.array([1, 10, 0.1, 1, 5, 1], np.float32) + 3  # scales the scaler has to undo
    model = make_classifier(kind, 0.05, seed=0).fit(x, y)
    w, b = linear_weights(model, k)
    logits = torch.from_numpy(x) @ w.T + b  # (N, K)
    assert torch.equal(logits.argmax(1), torch.from_numpy(model.predict(x)))
    if k > 2:
        assert np.allclose(logits.numpy(), model.decision_function(x), atol=1e-4)
    if kind == "logreg":
        assert np.allclose(logits.softmax(1).numpy(), model.predict_proba(x), atol=1e-5)
    if kind == "svm":  # the very LinearSVC objective at this C, not a weight decay
        ref = LinearSVC(C=0.05, dual=False, tol=1e-8, max_iter=20_000)  # another solver
        ref.fit((x - x.mean(0)) / x.std(0), y)
        assert np.allclose(model[-1].coef_, ref.coef_, atol=1e-3)


def test_linear_probe_module_keeps_the_val_chosen_c(tmp_path: Path, source_ckpt: Path) -> None:
    seed_everything(0)
    grid = [1e-4, 1e-2, 1.0]
    module = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="linear_probe", head="svm",
        reg_grid=grid, num_sample_images=0,
    )  # fmt: skip
    dm = _dm()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    # the same choice from the features taken outside the module
    dm.setup()
    train = module.extract_features(DataLoader(dm.train_dataloader().dataset, batch_size=64))
    val = module.extract_features(dm.val_dataloader())
    expect = select_on_val("svm", (train[0].numpy(), train[1].numpy()),
                           (val[0].numpy(), val[1].numpy()), grid)  # fmt: skip
    assert module.choice is not None and module.choice.curve == expect.curve
    assert float(trainer.callback_metrics["val/chosen_c"]) == pytest.approx(expect.c)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(expect.val_acc)
    w, b = linear_weights(expect.model, 5)  # two training epochs left the fitted head as it was
    assert torch.allclose(module.net.head.weight, w) and torch.allclose(module.net.head.bias, b)


def test_reg_grid_needs_cached_features(source_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="cache_features"):
        TransferClassifier(
            weights=str(source_ckpt), num_classes=5, mode="linear_probe", cache_features=False
        )
    with pytest.raises(ValueError, match="reg_grid"):
        TransferClassifier(weights=str(source_ckpt), num_classes=5, reg_grid=[0.0, 1.0])


# ----------------------------------------------------------------------------- feature cache


def test_cache_key_follows_the_weights_and_the_transform(source_ckpt: Path) -> None:
    module = TransferClassifier(weights=str(source_ckpt), num_classes=5, mode="linear_probe")
    net = module.net
    stages = net.stages[: net.feature_stages]
    ds = _dm()
    ds.setup()
    train = ds.train_dataloader().dataset
    again = _dm()
    again.setup()
    key = cache_key(stages, net.pool, train)
    assert cache_key(stages, net.pool, again.train_dataloader().dataset) == key  # stable
    with torch.no_grad():
        net.head.weight.add_(1.0)  # the head does not make the features
    assert cache_key(stages, net.pool, train) == key
    with torch.no_grad():
        next(stages.parameters()).view(-1)[0] += 1e-3  # one weight of the first stage
    moved = cache_key(stages, net.pool, train)
    assert moved != key
    for other in (_dm(image_size=32), _dm(normalize="imagenet"), _dm(augment=True)):
        other.setup()
        assert cache_key(stages, net.pool, other.train_dataloader().dataset) != moved
    assert cache_key(stages, 2, train) != moved


def test_cache_holds_the_eval_view_never_an_augmented_one(
    tmp_path: Path, source_ckpt: Path
) -> None:
    seed_everything(0)
    module = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="linear_probe", num_sample_images=0
    )
    augmented, plain = _dm(augment=True), _dm()
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=augmented)
    plain.setup()
    net, clean = module.net, plain.train_dataloader().dataset
    assert augmented.train_dataloader().dataset.augment is not None  # the data does augment
    view = eval_view(augmented.train_dataloader().dataset, augmented.val_dataloader().dataset)
    assert view.augment is None and torch.equal(view.images, clean.images)
    key = cache_key(net.stages[: net.feature_stages], net.pool, clean)
    assert key in FEATURES  # extracted through the eval transform
    aug_key = cache_key(net.stages[: net.feature_stages], net.pool, augmented._sets["train"])
    assert aug_key not in FEATURES
    cached, _ = FEATURES.get(key, lambda: pytest.fail("not cached"))
    expect, _ = module.extract_features(DataLoader(clean, batch_size=64))
    assert torch.equal(cached, expect)


class _Boom(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise RuntimeError("boom")


class _Shapes(Callback):
    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self.shapes.append(tuple(batch[0].shape))


def test_a_failed_probe_leaves_nothing_in_the_datamodule(tmp_path: Path, source_ckpt: Path) -> None:
    dm = _dm()
    probe = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="linear_probe", num_sample_images=0
    )
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[_Boom()]).fit(
            probe, datamodule=dm
        )
    assert "train_dataloader" not in vars(dm)  # never patched
    spy = _Shapes()
    finetune = TransferClassifier(
        weights=str(source_ckpt), num_classes=5, mode="finetune", num_sample_images=0
    )
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[spy]).fit(
        finetune, datamodule=dm
    )
    assert spy.shapes and all(len(s) == 4 for s in spy.shapes), spy.shapes  # images, not features


# ----------------------------------------------------------------------------- FCN staged lr


def test_fcn_finer_nets_train_at_a_hundredth_of_the_coarser_lr() -> None:
    """Long et al. §4.2: FCN-16s starts from FCN-32s and FCN-8s from FCN-16s, lr decreased 100x."""
    args = {
        v: yaml.safe_load((CONFIGS / f"segmentation/voc_fcn{v}_vgg16.yaml").read_text())["model"][
            "init_args"
        ]
        for v in ("32s", "16s", "8s")
    }
    for coarse, fine in (("32s", "16s"), ("16s", "8s")):
        assert args[fine]["loss_reduction"] == args[coarse]["loss_reduction"]
        assert args[fine]["lr"] == pytest.approx(args[coarse]["lr"] / 100)
        assert coarse in args[fine]["init_from"]
