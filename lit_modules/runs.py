"""Trustworthy runs: one directory per experiment, resumed in place, atomic and checked checkpoints.

- `find_resume` turns `--ckpt_path last | PATH` (and a SLURM requeue's `hpc_ckpt_N.ckpt`) into the
  checkpoint file and the run directory it belongs to, so that a resumed `fit` continues in the
  same `version_N` (same `metrics.csv`, same W&B run id) instead of starting a second run.
- `read_checkpoint` opens a checkpoint before Lightning does: a truncated or corrupt file is one
  clear error naming it and the previous checkpoint to resume from.
- `AtomicCheckpointIO` writes every checkpoint to a temporary file beside it, then renames it.
- `RunState` stores the run directory in every checkpoint and reseeds every RNG at the start of
  each training epoch from (seed, epoch, rank): a run resumed from an epoch-end checkpoint then
  replays exactly what the uninterrupted run did (same shuffles, dropout masks, augmentations).
"""

from __future__ import annotations

import csv
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment

WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run a resumed fit continues
META_KEY = "cnnlab"  # checkpoint entry: {"run_dir": ...}


class CheckpointError(OSError):
    """A checkpoint that cannot be read (truncated, corrupt, not a checkpoint)."""


@dataclass(frozen=True)
class Resume:
    ckpt: Path  # the checkpoint file Lightning restores
    run_dir: Path | None  # the run directory to continue in; None: not inside a cnnlab run


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_last(root: Path, name: str) -> Path | None:
    """`last.ckpt` of the newest run `<root>/<name>/version_N` that has one."""
    runs = sorted((root / name).glob("version_*"), key=_version, reverse=True)
    for run in runs:
        last = run / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
    return None


def find_hpc(root: Path) -> Path | None:
    """The newest `hpc_ckpt_N.ckpt` Lightning saved in `root` when SLURM signalled a requeue."""
    numbered = [
        (int(m.group(1)), p)
        for p in root.glob("hpc_ckpt_*.ckpt")
        if (m := re.search(r"_(\d+)\.ckpt$", p.name))
    ]
    return max(numbered)[1] if numbered else None


def _readable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return False
    return True


def previous_checkpoint(path: Path) -> Path | None:
    """The newest other readable checkpoint in the same folder (best-*, epoch checkpoints)."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return next((p for p in others if _readable(p)), None)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's cnnlab entry (`run_dir`); a clear error if the file is unreadable.

    `mmap=True` reads only the pickled header, not the tensors: cheap even for a big model.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:  # readable, but holds objects that could run code
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} refused: it holds pickled objects ({found[1] if found else 'code'}) "
            "that weights_only=True loading (Lightning's and cnnlab's) never runs"
        ) from err
    except Exception as err:
        previous = previous_checkpoint(path)
        hint = (
            f"resume from the previous one: --ckpt_path {previous}"
            if previous
            else f"no other readable checkpoint in {path.parent}: start a new run without --ckpt_path"
        )
        raise CheckpointError(
            f"checkpoint {path} cannot be read, truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {hint}"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint.get(META_KEY, {})


def _run_dir_of(ckpt: Path, meta: dict[str, Any]) -> Path | None:
    """The run directory a checkpoint belongs to: recorded in it, or `<run>/checkpoints/x.ckpt`."""
    recorded = meta.get("run_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if ckpt.parent.name == "checkpoints" and _version(ckpt.parent.parent) >= 0:
        return ckpt.parent.parent
    return None


def find_resume(ckpt_path: str | None, *, root: Path, name: str, fit: bool) -> Resume | None:
    """Resolve `ckpt_path` (None, "last", "best", "hpc" or a file) to a checked checkpoint.

    - "last": the newest `<root>/<name>/version_N/checkpoints/last.ckpt`; None (a new run, with a
      message) when there is none yet, so the same command starts and resumes a job.
    - None under SLURM with an `hpc_ckpt_N.ckpt` in `root` (a requeued job): that checkpoint.
    Only `fit` continues in the checkpoint's run directory; evaluation is a new run.
    """
    if ckpt_path is None and fit and SLURMEnvironment.detect():
        hpc = find_hpc(root)
        if hpc is None:
            return None
        ckpt = hpc
    elif ckpt_path is None or ckpt_path in ("best", "hpc"):
        return None  # Lightning's own meanings (in-process fit -> test)
    elif ckpt_path == "last":
        ckpt = find_last(root, name)
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {root / name}; starting a new run")
            return None
    else:
        ckpt = Path(ckpt_path)
    meta = read_checkpoint(ckpt)
    run_dir = _run_dir_of(ckpt, meta) if fit else None
    if ckpt_path is None and run_dir is not None and run_dir.parent.name != name:
        # Lightning would load it anyway (an hpc checkpoint in default_root_dir is always resumed)
        raise CheckpointError(
            f"{ckpt} (a SLURM requeue checkpoint) belongs to run {run_dir}, not to '{name}': "
            "give each job its own --trainer.default_root_dir, or move the file away"
        )
    return Resume(ckpt=ckpt, run_dir=run_dir)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the destination folder, synced, then renamed.

    Lightning's default goes through fsspec, whose local "transaction" writes to the system temp
    directory and then `shutil.move`s the file: across file systems (local /tmp, a cluster's
    shared disk) that is a copy, and a job killed during the copy leaves a truncated checkpoint.
    `os.replace` in the same folder is atomic: the old file or the new one, never half of one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if "://" in str(path):  # object stores: fsspec's own upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class RunState(Callback):
    """Epoch-seeded RNGs and the run directory recorded in every checkpoint (see module doc).

    The seed is saved in the checkpoint and restored on resume, so a `seed_everything: true`
    (random) run also resumes exactly. Checkpoints taken mid-epoch (a SLURM requeue signal)
    resume mid-epoch with the next epoch's order unchanged but the rest of the epoch re-drawn.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:
            return
        s = (self.seed * 1_000_003 + trainer.current_epoch * 10_007 + trainer.global_rank) % 2**32
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[META_KEY] = {
            "run_dir": str(Path(trainer.log_dir or trainer.default_root_dir).resolve())
        }

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict.get("seed", self.seed)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing `metrics.csv`; a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger that continues an existing run directory's `metrics.csv` instead of wiping it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
