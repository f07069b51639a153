"""Callbacks every cnnlab run uses: metrics.json, best + last checkpoints, predictions.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


def run_dir(trainer: Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


class MetricsJSON(Callback):
    """Writes `metrics.json` in the run directory at the end of fit / validate / test.

    A flat object of the final logged values, keys exactly as logged (`"test/acc": 0.98`). A
    later stage in the same process (fit, then test) adds its keys to the same file.
    """

    def _write(self, trainer: Trainer) -> None:
        path = run_dir(trainer) / "metrics.json"  # every rank: log_dir is a collective under DDP
        if not trainer.is_global_zero:
            return
        metrics = json.loads(path.read_text()) if path.exists() else {}
        for key, value in trainer.callback_metrics.items():
            v = float(value.item() if isinstance(value, torch.Tensor) else value)
            metrics[key] = v if math.isfinite(v) else str(v)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint keeping `last.ckpt` and the best one by the module's own `monitor`.

    Each LightningModule names its metric as a class attribute (`monitor = ("val/acc", "max")`),
    so one callback config serves classification, detection (val/map) and GANs (val/fid).
    """

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("filename", "best-{epoch:03d}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(**kwargs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is None and hasattr(pl_module, "monitor"):
            self.monitor, self.mode = pl_module.monitor
            self.kth_value = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        super().setup(trainer, pl_module, stage)


class PredictionsJSON(Callback):
    """`predict` writes `predictions.json` (the module's `format_predictions` rows) in the run dir."""

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fmt = getattr(pl_module, "format_predictions", None)
        outputs = trainer.predict_loop.predictions
        if fmt is None or not outputs:
            return
        if outputs and isinstance(outputs[0], list):  # several predict loaders: the first
            outputs = outputs[0]
        rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = run_dir(trainer) / f"predictions{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fmt(outputs)) + "\n")
        print(f"predictions: {path}")


class ExportWeights(Callback):
    """At the end of fit, save the module's weights to `<default_root_dir>/weights/<filename>`.

    A stable path for the next experiment to start from (the digits 0-4 pretraining feeds every
    digits transfer config), independent of the run's version number.
    """

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "weights" / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": pl_module.state_dict()}, path)
        print(f"weights: {path}")
