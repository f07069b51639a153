"""Callbacks every cnnlab run uses: metrics.json, best + last checkpoints, predictions.json.

Nothing lost: a file an earlier run left under the same name is never replaced. Checkpoints get
Lightning's `last-v1.ckpt` naming; `metrics.json` and `predictions.json` the same (`free_path`);
an exported weights file moves the previous export aside. `check_labels` is the label-range check
the modules run on every batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


def run_dir(trainer: Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def free_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free `<stem>-vK<suffix>` (K = 1, 2, ...).

    Lightning's own rule for checkpoints (`last.ckpt`, then `last-v1.ckpt`), used for the other
    files a run writes into a folder that an earlier run may already have filled (a run directory
    without logger is `default_root_dir` itself, or a logger with a fixed version).
    """
    candidate, k = path, 0
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-v{k}{path.suffix}")
    return candidate


def can_fuse(params: Any) -> bool:
    """Fused SGD / Adam(W) take floating-point parameters on CPU or CUDA (not MPS / XLA here);
    `params` as an optimizer takes them: tensors or parameter groups."""
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(
        t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors
    )


def log_train_terms(
    module: LightningModule,
    terms: dict[str, torch.Tensor | float],
    *,
    batch_size: int | None = None,
    prog_bar: tuple[str, ...] = ("loss",),
) -> None:
    """`module.log` of a training step's scalars as `train/<name>` (those in `prog_bar` on the
    progress bar too), on the steps whose values Lightning writes to the loggers only.

    A `self.log` call costs Lightning ~0.2 ms on CPU (its result collection moves the metric's
    state to the value's device on every call): 4-5 calls a step were 3-5% of a 24-100 ms step.
    A value logged on a step the loggers skip is overwritten unread, so these terms are logged
    when `log_every_n_steps` says the step is written (the condition Lightning itself applies
    after the step), and on an epoch's or the fit's last step, so that metrics.json ends with
    the final values even in runs shorter than `log_every_n_steps`. The progress bar shows the
    loss of the last written step.
    """
    trainer = module._trainer
    connector = getattr(trainer, "_logger_connector", None)
    if not (
        connector is None
        or getattr(connector, "should_update_logs", True)
        or trainer.is_last_batch
        or 0 < trainer.max_steps <= trainer.global_step + 1
    ):
        return
    for name, value in terms.items():
        module.log(f"train/{name}", value, prog_bar=name in prog_bar, batch_size=batch_size)


def make_optimizer(params: Any, hp: Any) -> torch.optim.Optimizer:
    """`hp.optimizer` sgd (momentum, weight decay) or adamw (decoupled weight decay) at `hp.lr`,
    over parameters or parameter groups: the choice every trained module's config offers.

    Fused: one kernel updates every parameter, where PyTorch's CPU default loops over them in
    small ops (AdamW 1.0 vs 7.8 ms a step for the digits CNN's 0.9M parameters, one thread)."""
    params = list(params)
    fused = can_fuse(params)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, fused=fused
        )
    return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)


def one_cycle(
    opt: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR, except where its warm-up is exactly one step: there
    (pct_start x total_steps == 1, e.g. 0.2 x 5 or 0.1 x 10) torch's first phase has zero length
    and its first step divides by zero. The warm-up is then lengthened by 1e-6 of a step, which
    gives the same rates to 1e-6."""
    if pct_start * total_steps == 1 and total_steps > 1:
        pct_start = (1 + 1e-6) / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start
    )


def check_data_classes(module: Any) -> None:
    """In `setup`: a detector's num_classes (objects + background) must be its DataModule's."""
    dm = module.trainer.datamodule if module._trainer is not None else None
    data_classes = getattr(dm, "num_classes", None)
    if isinstance(data_classes, int) and data_classes != module.hparams.num_classes:
        raise ValueError(
            f"the data has {data_classes - 1} classes + background (largest label "
            f"{data_classes - 1}) but model.num_classes is {module.hparams.num_classes}: "
            f"set --model.init_args.num_classes {data_classes}"
        )


def check_choice(name: str, value: object, valid: tuple) -> None:
    """A config value that must be one of `valid`: a clear error naming the option and the choices."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def check_labels(
    labels: torch.Tensor, num_classes: int, *, ignore_index: int | None = None
) -> None:
    """A clear error for a label outside 0..num_classes-1, before it reaches the loss.

    There it is an obscure IndexError ("Target 7 is out of bounds") on CPU and a device-side
    assert on CUDA that kills the process. Called on CPU batches (`on_before_batch_transfer`):
    one max over the labels, no GPU synchronisation.
    """
    if labels.numel() == 0:
        return
    if ignore_index is not None:  # ignored pixels count as 0: no copy of the valid ones
        labels = labels.masked_fill(labels == ignore_index, 0)
    low, top = (int(v) for v in torch.aminmax(labels))  # one pass
    if low < 0:
        raise ValueError(f"the data has label {low}: labels must be 0..{num_classes - 1}")
    if top >= num_classes:
        raise ValueError(
            f"the data has label {top} but model.num_classes is {num_classes} (labels must be "
            f"0..{num_classes - 1}): set --model.init_args.num_classes {top + 1} or fix the labels"
        )


class MetricsJSON(Callback):
    """Writes `metrics.json` in the run directory at the end of fit / validate / test.

    A flat object of the final logged values, keys exactly as logged (`"test/acc": 0.98`). A
    later stage in the same process (fit, then test) adds its keys to the same file, and so does
    a resumed fit (the same run, continued). A new run never merges into or replaces an earlier
    run's file: if the folder already holds one, this run writes `metrics-v1.json` (and says so).
    """

    def __init__(self) -> None:
        self.path: Path | None = None  # the file this process writes, chosen at its first write

    def _target(self, trainer: Trainer, path: Path) -> Path:
        if self.path is not None and self.path.parent == path.parent:
            return self.path  # a later stage of this process: same file
        resumed = trainer.state.fn == TrainerFn.FITTING and trainer.ckpt_path is not None
        self.path = path if resumed else free_path(path)
        if self.path != path:
            print(f"metrics: {path} is an earlier run's; this run's metrics go to {self.path}")
        return self.path

    def _write(self, trainer: Trainer) -> None:
        path = run_dir(trainer) / "metrics.json"  # every rank: log_dir is a collective under DDP
        if not trainer.is_global_zero:
            return
        path = self._target(trainer, path)
        metrics = json.loads(path.read_text()) if path.exists() else {}
        for key, value in trainer.callback_metrics.items():
            v = float(value.item() if isinstance(value, torch.Tensor) else value)
            v = 0.0 if v == 0 else v  # -0.0 (e.g. an entropy of exactly 0) reads as a bug
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


# The field naming a row's image: COCO results rows (detection) and the GAN's sample rows.
IMAGE_KEYS = ("image_id", "index")


def merge_rows(per_rank: list[list[dict]]) -> list[dict]:
    """The rows of every rank as one list, sorted (stably) by their image key.

    Evaluation loaders deal image i to rank i % W (`UnrepeatedDistributedSampler`, no image
    repeated), so the union holds each image once; image ids (and GAN indices) ascend in the
    data-set order of cnnlab's sets, so the sort gives the 1-process file's order, and the stable
    sort keeps each image's rows in the module's order (detections by score).
    """
    rows = [row for part in per_rank for row in part]
    key = next((k for k in IMAGE_KEYS if rows and all(k in r for r in rows)), None)
    return rows if key is None else sorted(rows, key=lambda r: r[key])


def _gather_rows(trainer: Trainer, rows: list[dict]) -> list[dict] | None:
    """Every rank's rows on rank 0 (None on the others); this rank's rows on one process."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return rows
    per_rank: list[list[dict]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(per_rank, rows)
    return merge_rows(per_rank) if trainer.is_global_zero else None


class PredictionsJSON(Callback):
    """`predict` writes `predictions.json` (the module's `format_predictions` rows) in the run dir.

    Under DDP the ranks' rows are gathered and rank 0 writes ONE file, each image once, in the
    data-set order (`merge_rows`). A file of that name already there (an earlier predict) is kept:
    this one is `predictions-v1.json`.
    """

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fmt = getattr(pl_module, "format_predictions", None)
        outputs = trainer.predict_loop.predictions
        if fmt is None:
            return
        if outputs and isinstance(outputs[0], list):  # several predict loaders: the first
            outputs = outputs[0]
        # every rank takes part in the gather (a rank may hold no image) and in log_dir
        folder = run_dir(trainer)
        rows = _gather_rows(trainer, fmt(outputs) if outputs else [])
        if rows is None or (not rows and not outputs):
            return
        # every predict is new output: an earlier file of that name is kept (predictions-v1.json)
        path = free_path(folder / "predictions.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows) + "\n")
        print(f"predictions: {path}")


class ExportWeights(Callback):
    """At the end of fit, save the module's weights to `<default_root_dir>/weights/<filename>`.

    A stable path for the next experiment to start from (the digits 0-4 pretraining feeds every
    digits transfer config), independent of the run's version number. The newest export is at
    that path; an earlier one there is moved aside, never replaced:
    `<stem>.previous-<its time>.pt` (see `previous_name`).

    `weights: best` (default) exports the checkpoint chosen on val (the run's `best-*.ckpt`), as
    the next stage of a staged recipe would start from it; `last`, or a run without a best
    checkpoint, exports the final weights. `full_checkpoint: true` exports the whole Lightning
    checkpoint instead of `{"state_dict": ...}` alone, hyperparameters included, so that
    `Module.load_from_checkpoint(path)` rebuilds the model (DeepMask as a detector's proposer).
    """

    def __init__(
        self,
        filename: str,
        weights: Literal["best", "last"] = "best",
        full_checkpoint: bool = False,
    ) -> None:
        if weights not in ("best", "last"):
            raise ValueError(f"ExportWeights: weights must be best or last, got {weights!r}")
        self.filename, self.weights, self.full_checkpoint = filename, weights, full_checkpoint

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        callback = getattr(trainer, "checkpoint_callback", None)
        best = getattr(callback, "best_model_path", "")
        path = best if self.weights == "best" and best and Path(best).is_file() else ""
        if self.full_checkpoint:  # a checkpoint file of the run, copied whole
            path = path or getattr(callback, "last_model_path", "")
            if not path or not Path(path).is_file():
                raise FileNotFoundError(
                    f"ExportWeights({self.filename!r}, full_checkpoint=true) copies a checkpoint "
                    "of the run, but the run saved none: keep checkpointing on"
                )
            return torch.load(path, map_location="cpu", weights_only=False)  # this run's own file
        if path:
            return {
                "state_dict": torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            }
        return {"state_dict": pl_module.state_dict()}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        export = self._export(trainer, pl_module)
        path = Path(trainer.default_root_dir) / "weights" / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        # written beside the target, then renamed: readers of `path` see a whole file, always
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(export, tmp)
            kept = previous_name(path) if path.exists() else None
            if kept is not None:
                os.replace(path, kept)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"weights: {path}" + (f" (the previous export is now {kept})" if kept else ""))


def previous_name(path: Path) -> Path:
    """A free name for the file at `path`, stamped with its modification time.

    `digits_source.pt` written at 2024-05-01 12:00:00 -> `digits_source.previous-20240501-120000.pt`
    (`-v1`, `-v2`, ... appended if two exports share a second).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    return free_path(path.with_name(f"{path.stem}.previous-{stamp}{path.suffix}"))


def keep_previous(path: Path) -> Path | None:
    """Move an earlier file at `path` to its `previous_name` before it is written again; where."""
    if not path.is_file():
        return None
    kept = previous_name(path)
    os.replace(path, kept)
    print(f"the previous {path.name} is now {kept}")
    return kept
