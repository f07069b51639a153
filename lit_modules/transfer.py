"""TransferClassifier: a pretrained CNN as a fixed feature extractor, fine-tuned, or from scratch.

Modes (the lecture's three ways to use a CNN trained on another task):
- `linear_probe`: every backbone stage frozen (no gradients, BatchNorm in eval mode); only a
  linear head learns -- softmax (L2 logistic regression) or a linear SVM (squared hinge). With
  `cache_features` the frozen features of the train split (through the eval transform: never an
  augmented view) are extracted once; with `reg_grid` the head is fitted on them for every C of
  the grid and the C with the best val accuracy is kept (lit_modules/linear_probe.py, the same
  code as scripts/extract_features.py); the training epochs then leave it as it is.
- `finetune`: all stages, or only the top `trainable_stages`, learn; pretrained layers at
  `lr * backbone_lr_mult`; `unfreeze_every` epochs one more stage thaws (gradual unfreezing).
- `scratch`: random initialisation, the baseline transfer has to beat.
If the weights come with their own classifier (a digits-pretraining checkpoint), it is kept as
the source head and `test` reports `test/source_acc`: how much of the source task survived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_modules.callbacks import check_choice, check_labels, log_train_terms, make_optimizer
from lit_modules.guard import NonFinitePolicy, finite_loss
from lit_modules.linear_probe import (
    FEATURES,
    HEAD_KIND,
    Features,
    Selection,
    cache_key,
    eval_view,
    linear_weights,
    select_on_val,
)
from lit_modules.nets.transfer_net import build_transfer_net
from lit_modules.visual import labelled_grid, log_picture

MODES = ("linear_probe", "finetune", "scratch")
HEADS = ("softmax", "svm")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "none")
REG_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # C (scikit-learn's meaning), chosen on val


class TransferClassifier(LightningModule):
    monitor = ("val/acc", "max")  # what the best checkpoint tracks

    def __init__(
        self,
        backbone: str = "digits_cnn",
        weights: str | None = None,
        num_classes: int = 10,
        mode: Literal["linear_probe", "finetune", "scratch"] = "finetune",
        head: Literal["softmax", "svm"] = "softmax",
        feature_stages: int | None = None,
        trainable_stages: int | None = None,
        backbone_lr_mult: float = 0.1,
        unfreeze_every: int = 0,
        cache_features: bool = True,
        reg_grid: Sequence[float] | None = REG_GRID,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "none"] = "cosine",
        label_smoothing: float = 0.0,
        num_sample_images: int = 16,
        nonfinite_loss: NonFinitePolicy = "stop",
    ) -> None:
        """
        Args:
            nonfinite_loss: a NaN / Inf loss `stop`s training (naming the step and the term)
                or `skip`s the step, counted in train/skipped_steps (lit_modules/guard.py).
            backbone: `digits_cnn` or a torchvision classifier name (resnet18/34/50, vgg11/16[_bn],
                mobilenet_v3_large/small, efficientnet_b0).
            weights: `DEFAULT`, a torchvision weights name (`IMAGENET1K_V2`), null (random), or a
                path to a state dict / TransferClassifier checkpoint (loaded with weights_only=True).
            feature_stages: how many bottom stages are transferred (Yosinski et al.'s n; null:
                all). Below the top, the feature map is max-pooled to 4x4 and flattened.
            trainable_stages: finetune only: how many top stages learn (null: all).
            backbone_lr_mult: learning-rate factor for pretrained stages (the head gets `lr`).
            unfreeze_every: finetune only: if > 0, start with `trainable_stages` (or 0) stages
                trainable and thaw one more every this many epochs (single device only).
            cache_features: linear_probe only: extract frozen features once (eval transform, in
                memory, keyed by the weights and the data), train the head on them.
            reg_grid: linear_probe with cache_features only: C values (inverse L2 strength, as in
                scikit-learn's LinearSVC / LogisticRegression on standardized features); the head
                is fitted for each and the best on val is kept (logged as `val/chosen_c`). null:
                the head trains by gradient descent instead, with `weight_decay` as the optimizer
                applies it (decoupled under AdamW, scheduled, on the bias too: not an SVM's C).
            num_sample_images: validation images drawn with their predictions each epoch (0: none).
        """
        super().__init__()
        check_choice("mode", mode, MODES)
        check_choice("head", head, HEADS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        if mode == "scratch" and weights is not None:
            raise ValueError("mode 'scratch' trains from random initialisation: set weights: null")
        if reg_grid is not None and (not reg_grid or min(reg_grid) <= 0):
            raise ValueError(f"reg_grid must be positive C values or null, got {reg_grid}")
        if mode == "linear_probe" and reg_grid is not None and not cache_features:
            raise ValueError(
                "reg_grid fits the head on cached features: set cache_features: true, or "
                "reg_grid: null to train the head by gradient descent on images"
            )
        self.save_hyperparameters()
        self.net = build_transfer_net(
            backbone=backbone,
            num_classes=num_classes,
            weights=weights,
            feature_stages=feature_stages,
        )
        n = self.net.feature_stages
        if trainable_stages is not None and not 0 <= trainable_stages <= n:
            raise ValueError(
                f"trainable_stages must be in 0..{n} for {backbone}, got {trainable_stages}"
            )
        self.net.freeze_bottom(self._frozen_at(epoch=0))
        # The head is fitted on val-chosen C at fit start: the training epochs must not move it.
        self.grid_fit = mode == "linear_probe" and cache_features and reg_grid is not None
        self.automatic_optimization = not self.grid_fit
        self.choice: Selection | None = None
        if head == "svm":  # multi-class squared hinge (the gradient-descent path's loss)
            self.criterion: nn.Module = nn.MultiMarginLoss(p=2, margin=1.0)
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        acc = lambda k: MulticlassAccuracy(num_classes=k, average="micro")  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = (
            acc(num_classes),
            acc(num_classes),
            acc(num_classes),
        )
        # Mean over samples, synced as (sum, count): `self.log(sync_dist=True)` would average the
        # ranks' means, which differs from the 1-process mean when shards differ in size.
        self.val_loss = MeanMetric().set_dtype(torch.float64)
        source = self.net.source_head
        self.source_acc = acc(source.out_features) if source is not None else None
        self._samples: tuple[torch.Tensor, ...] | None = None

    # ------------------------------------------------------------------ freezing

    def _frozen_at(self, epoch: int) -> int:
        """How many bottom stages are frozen during `epoch`."""
        hp, n = self.hparams, self.net.feature_stages
        if hp.mode == "linear_probe":
            return n
        if hp.mode == "scratch":
            return 0
        top = n if hp.trainable_stages is None else hp.trainable_stages
        if hp.unfreeze_every > 0:
            top = min(n, (hp.trainable_stages or 0) + epoch // hp.unfreeze_every)
        return n - top

    def on_train_epoch_start(self) -> None:
        if self.hparams.unfreeze_every > 0:
            self.net.freeze_bottom(self._frozen_at(self.current_epoch))

    # ------------------------------------------------------------------ linear-probe fast path

    @torch.no_grad()
    def extract_features(self, loader: DataLoader) -> Features:
        """Backbone features of every batch of `loader`: (N, D) float32 on CPU, (N,) labels."""
        was_training = self.net.training
        self.net.eval()
        feats, labels = [], []
        for x, y in loader:
            x = x.to(self.device)
            feats.append((x if x.ndim == 2 else self.net.forward_features(x)).float().cpu())
            labels.append(y)
        self.net.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def cached_features(self, loader: DataLoader) -> Features:
        """`extract_features` of `loader`'s data set, from the in-memory cache when the same
        weights already saw the same data through the same transform."""
        net = self.net
        key = cache_key(net.stages[: net.feature_stages], net.pool, loader.dataset)
        return FEATURES.get(key, lambda: self.extract_features(loader))

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.trainer.world_size > 1 and hp.unfreeze_every > 0:
            raise ValueError(
                "unfreeze_every > 0 is not supported under DDP: DDP fixes the trainable parameters "
                "when it wraps the model. Use one device, or finetune with fixed trainable_stages."
            )
        dm = self.trainer.datamodule
        data_classes = getattr(dm, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != hp.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes (largest label {data_classes - 1}) but "
                f"model.num_classes is {hp.num_classes}: "
                f"set --model.init_args.num_classes {data_classes}"
            )
        if stage != "fit" or hp.mode != "linear_probe" or not hp.cache_features:
            return
        if dm is None:
            raise ValueError("cache_features needs a DataModule: trainer.fit(model, datamodule=dm)")
        # Runs before Lightning first asks for the train loader. Every rank extracts the whole
        # train split (same features, same fit on every rank); Lightning shards the cached loader.
        self.to(self.trainer.strategy.root_device)
        loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
        view = eval_view(loader.dataset, val_loader.dataset)
        clean = DataLoader(
            view, batch_size=loader.batch_size or 128, num_workers=loader.num_workers
        )
        feats, labels = self.cached_features(clean)
        if self.grid_fit:
            self.fit_head((feats, labels), self.cached_features(val_loader))
        cached = DataLoader(TensorDataset(feats, labels), batch_size=clean.batch_size, shuffle=True)
        # This trainer's train-data source only: the DataModule itself is never patched, so
        # nothing of this run (finished or failed) reaches a later fit with the same DataModule.
        self.trainer.fit_loop._data_source.instance = cached

    def fit_head(self, train: Features, val: Features) -> Selection:
        """Fit the head for every C of `reg_grid` on the train features; keep the best on val."""
        hp = self.hparams
        kind = HEAD_KIND[hp.head]
        pick = select_on_val(
            kind,
            (train[0].numpy(), train[1].numpy()),
            (val[0].numpy(), val[1].numpy()),
            hp.reg_grid,
        )
        w, b = linear_weights(pick.model, hp.num_classes)
        with torch.no_grad():
            self.net.head.weight.copy_(w)
            self.net.head.bias.copy_(b)
        self.choice = pick
        curve = "  ".join(f"{c:g}: {acc:.4f}" for c, acc in pick.curve.items())
        rank_zero_info(f"linear probe ({kind}): C={pick.c:g} chosen on val (val acc by C: {curve})")
        return pick

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # on CPU, every batch (a data set without num_classes escapes `setup`'s check); loader 1
        # of `test` is the source task, scored by the source head
        if not self.trainer.predicting and dataloader_idx == 0:
            check_labels(batch[1], self.hparams.num_classes)
        return batch

    # ------------------------------------------------------------------ steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, K) logits

    def _check_input(self, x: torch.Tensor) -> None:
        want = self.net.stages[0]
        first = next((m for m in want.modules() if isinstance(m, nn.Conv2d)), None)
        if x.ndim == 4 and first is not None and x.shape[1] != first.in_channels:
            raise ValueError(
                f"backbone {self.hparams.backbone} expects {first.in_channels}-channel images, "
                f"got {x.shape[1]} (for digits set data.channels: {first.in_channels})"
            )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch  # (B, C, H, W) images, or (B, D) cached features
        if batch_idx == 0:
            self._check_input(x)
        feats = x if x.ndim == 2 else self.net.forward_features(x)
        if self.grid_fit:  # the head was fitted in `setup`: only score it (manual optimization)
            with torch.no_grad():
                logits = self.net.forward_head(feats)
                loss = self.criterion(logits, y)
            self.train_acc.update(logits, y)
            log_train_terms(self, {"loss": loss})
            # No gradients, so no parameter moves; the step only advances global_step, which
            # checkpointing (no save at an unchanged step) and logging go by.
            self.optimizers().step()
            return loss
        logits = self.net.forward_head(feats)
        loss = self.criterion(logits, y)
        if not finite_loss(self, {"loss": loss}, self.hparams.nonfinite_loss):
            return None  # skipped: no backward, no optimizer step
        self.train_acc.update(logits.detach(), y)  # epoch-level only: no per-step compute or log
        log_train_terms(self, {"loss": loss})
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)  # Lightning computes, syncs and resets it

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:
            self._check_input(x)
        logits = self(x)
        self.val_acc(logits, y)
        self.val_loss.update(self.criterion(logits, y).double(), weight=len(y))
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc, prog_bar=True)
        k = self.hparams.num_sample_images
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            self._samples = (x[:k], logits[:k].argmax(1), y[:k])

    def on_validation_epoch_end(self) -> None:
        if self.choice is not None:
            self.log("val/chosen_c", self.choice.c)
        if self._samples is None:
            return
        x, pred, y = self._samples
        self._samples = None
        names = getattr(self.trainer.datamodule, "class_names", None) or [
            str(i) for i in range(self.hparams.num_classes)
        ]
        texts = [
            f"{names[p]} ({names[t]})" if p != t else names[p]
            for p, t in zip(pred.tolist(), y.tolist(), strict=True)
        ]
        grid = labelled_grid(x, texts, (pred == y).tolist())
        log_picture(self, "val/predictions", grid, caption="prediction (truth if wrong)")

    def test_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y = batch
        if dataloader_idx == 0:
            self.test_acc(self(x), y)
            self.log("test/acc", self.test_acc, add_dataloader_idx=False)
        elif self.source_acc is not None:  # the source task, through the source head
            self.source_acc(self.net.forward_source(x), y)
            self.log("test/source_acc", self.source_acc, add_dataloader_idx=False)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self(x).softmax(1)
        score, pred = probs.max(1)
        return {"pred": pred.cpu(), "score": score.cpu()}

    def format_predictions(self, outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
        """Rows of predictions.json: one per predicted image, in loader order."""
        pred = torch.cat([o["pred"] for o in outputs]).tolist()
        score = torch.cat([o["score"] for o in outputs]).tolist()
        return [
            {"index": i, "pred": p, "score": round(s, 6)}
            for i, (p, s) in enumerate(zip(pred, score, strict=True))
        ]

    # ------------------------------------------------------------------ optimisation

    def _param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        mult = hp.backbone_lr_mult if hp.weights is not None else 1.0
        # Gradual unfreezing needs every stage in the optimizer from the start; otherwise only
        # the stages that will ever learn.
        first = 0 if hp.unfreeze_every > 0 else self.net.num_frozen
        stage_params = [
            p for s in self.net.stages[first : self.net.feature_stages] for p in s.parameters()
        ]
        groups = [{"params": list(self.net.head.parameters()), "lr": hp.lr}]
        if stage_params:
            groups.append({"params": stage_params, "lr": hp.lr * mult})
        return groups

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self._param_groups()
        opt = make_optimizer(groups, hp)
        if hp.scheduler == "none" or self.grid_fit:  # grid_fit: manual optimization, no steps
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
