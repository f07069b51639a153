"""Train, validate, test or predict any cnnlab module + datamodule from a YAML config.

    python scripts/train.py fit --config configs/transfer/digits_finetune.yaml
    python scripts/train.py test --config configs/transfer/digits_finetune.yaml --ckpt_path runs/.../last.ckpt
    python scripts/train.py fit --config ... --print_config        # the resolved config

Runs go to <trainer.default_root_dir>/<name>/version_N/ (default runs/<config stem>/...):
config.yaml, metrics.json, checkpoints/ (best + last), images/, metrics.csv and the offline
W&B run in wandb/ (`--wandb online` after `wandb login` streams it; `wandb sync` uploads later).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from jsonargparse import DefaultHelpFormatter  # noqa: E402
from jsonargparse.typing import PositiveInt  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar  # noqa: E402
from lightning.pytorch.cli import (  # noqa: E402
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402

from lit_modules.callbacks import BestAndLastCheckpoint, MetricsJSON, PredictionsJSON  # noqa: E402
from lit_modules.cli_errors import SuggestingParser, user_error  # noqa: E402
from lit_modules.guard import BufferSnapshot  # noqa: E402
from lit_modules.runs import (  # noqa: E402
    WANDB_ID_FILE,
    AtomicCheckpointIO,
    Resume,
    RunCSVLogger,
    RunState,
    find_resume,
)

REPO = Path(__file__).resolve().parents[1]
WANDB_MODES = ("offline", "online", "disabled")
# Frozen backbone stages are kept in eval mode on purpose (FrozenBN); Lightning warns about it.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
# These epoch values come from metrics whose states are already summed over every rank (COCO /
# VOC07 mAP, the FCN confusion matrix, FID): identical on all ranks, so no `sync_dist` is needed;
# Lightning recommends it for any tensor logged under DDP. Other names still warn.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self.log\('(val|test)/"
    r"(map|mar|voc07_map|pixel_acc|mean_acc|miou|fwiou|fid|inception_score)[^']*'",
)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: the stored one (a resumed run), or a new one stored."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # `secrets`, not `random`: seed_everything has seeded `random`, every run would get one id
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:  # other ranks may see another version dir; they log nothing
        path.write_text(run_id + "\n")
    return run_id


def scale_lr(lr: float, base_batch: int, sizes: dict[str, int]) -> tuple[float, str]:
    """Linear scaling (Goyal et al. 2017): `lr` is for `base_batch` images per step in all.

    `sizes` multiply to the global batch (devices, nodes, batch, accumulation); returns the lr to
    use and the line that says how it was reached.
    """
    global_batch = math.prod(sizes.values())
    scaled = lr * global_batch / base_batch
    factors = " x ".join(f"{k} {v}" for k, v in sizes.items())
    change = "unchanged" if global_batch == base_batch else f"x {global_batch}/{base_batch}"
    return scaled, (
        f"lr scaling: model.lr {lr:.6g} is for a global batch of {base_batch}; this run's is "
        f"{global_batch} = {factors} -> lr {scaled:.6g} ({change})"
    )


class RunDirOnly(CSVLogger):
    """`--trainer.logger=false`: nothing is logged, but the run still gets its own `version_N`.

    Without any logger Lightning's run directory is `default_root_dir` itself, where the next run
    would replace this one's checkpoints, metrics.json, pictures and predictions.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any = None) -> None:
        pass

    def save(self) -> None:
        pass


def default_loggers(
    root: str,
    name: str,
    wandb: str,
    project: str,
    *,
    resume_dir: Path | None = None,
    log: bool = True,
) -> list[Logger]:
    """CSV logger (it fixes the run dir) and a W&B logger writing into the same dir.

    `resume_dir` (a resumed fit): the same `version_N`, `metrics.csv` appended, same W&B run id.
    `log=False` (`--trainer.logger=false`): only the run dir, no metrics.csv and no W&B.
    """
    csv_class = RunCSVLogger if log else RunDirOnly
    if resume_dir is not None:
        name = resume_dir.parent.name
        csv = csv_class(save_dir=resume_dir.parent.parent, name=name, version=resume_dir.name)
    else:
        csv = csv_class(save_dir=root, name=name)
    loggers: list[Logger] = [csv]
    if wandb != "disabled" and log:
        os.environ.setdefault("WANDB_SILENT", "true")
        _ = csv.experiment  # creates the (empty) run dir before W&B writes into it
        run_dir = Path(csv.log_dir)
        loggers.append(
            WandbLogger(
                project=project,
                name=name,
                save_dir=str(run_dir),
                offline=wandb == "offline",
                id=wandb_run_id(run_dir),
                resume="allow",
            )
        )
    return loggers


class KeepConfigs(SaveConfigCallback):
    """Saves `config.yaml`; a resumed fit adds `config.resumed-K.yaml` instead of replacing it."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank
        k = 0
        while not self.already_saved and (log_dir / self.config_filename).exists():
            k += 1
            self.config_filename = f"config.resumed-{k}.yaml"
        super().setup(trainer, pl_module, stage)


class CnnlabCLI(LightningCLI):
    resume: Resume | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Run name: runs go to <default_root_dir>/<name>/version_N (default: the config file's stem).",
        )
        parser.add_argument(
            "--wandb",
            type=Literal["offline", "online", "disabled"],
            default=os.environ.get("WANDB_MODE", "offline")
            if os.environ.get("WANDB_MODE") in WANDB_MODES
            else "offline",
            help="Weights & Biases mode: offline (default; no account, no network), online (after `wandb login`), disabled.",
        )
        parser.add_argument("--wandb_project", type=str, default="cnnlab", help="W&B project name.")
        parser.add_argument(
            "--lr_base_batch_size",
            type=PositiveInt | None,
            default=None,
            help="The global batch the recipe's model.lr is for: `fit` scales lr linearly to this "
            "run's (devices x nodes x data.batch_size x accumulate_grad_batches) and prints it.",
        )

    def _run_name(self, cfg: Any) -> str:
        """`--name`, else the last config's stem; a preset (configs/trainer/) is not the experiment."""
        if cfg.get("name"):
            return cfg["name"]
        configs = [Path(str(c)) for c in cfg.get("config") or []]
        recipes = [c for c in configs if c.parent.name != "trainer"] or configs
        if recipes:
            return recipes[-1].stem
        model = cfg.get("model")
        class_path = getattr(model, "class_path", None) or type(self.model).__name__
        return str(class_path).rsplit(".", 1)[-1].lower()

    def before_instantiate_classes(self) -> None:
        """Resolve `--ckpt_path last` / a requeue's checkpoint and check the file before any work."""
        if not self.subcommand or "ckpt_path" not in self.config[self.subcommand]:
            return
        cfg = self.config[self.subcommand]
        root = Path(self._get(self.config, "trainer.default_root_dir", default=None) or "runs")
        self.resume = find_resume(
            cfg.get("ckpt_path"), root=root, name=self._run_name(cfg), fit=self.subcommand == "fit"
        )
        if cfg.get("ckpt_path") == "last" or self.resume is not None:
            cfg["ckpt_path"] = str(self.resume.ckpt) if self.resume else None

    def after_instantiate_classes(self) -> None:
        """A recipe's lr is for its global batch: scale it to this run's (`--lr_base_batch_size`).

        The model's `hparams.lr` (what `configure_optimizers` reads, saved in checkpoints) gets
        the lr used; config.yaml keeps the recipe's, so re-running it scales the same way.
        """
        if self.subcommand != "fit" or self.config.fit.get("lr_base_batch_size") is None:
            return
        base_batch = self.config.fit.lr_base_batch_size
        hp, data = self.model.hparams, getattr(self.datamodule, "hparams", {})
        if "lr" not in hp or "batch_size" not in data:
            raise ValueError("--lr_base_batch_size needs a model with `lr` and data `batch_size`")
        t = self.trainer
        sizes = {
            "devices": t.num_devices,
            "nodes": t.num_nodes,
            "batch": data["batch_size"],
            "accumulate": t.accumulate_grad_batches,
        }
        hp.lr, line = scale_lr(hp.lr, base_batch, sizes)
        if rank_zero_only.rank == 0:
            print(line, flush=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        logs = trainer_cfg.get("logger") is not False  # false: a run dir of its own all the same
        if trainer_cfg.get("logger") in (None, True, False):
            root = trainer_cfg.get("default_root_dir") or "runs"
            resume_dir = self.resume.run_dir if self.resume else None
            kwargs["logger"] = default_loggers(
                root,
                self._run_name(cfg),
                cfg.get("wandb"),
                cfg.get("wandb_project"),
                resume_dir=resume_dir,
                log=logs,
            )
        seed = cfg.get("seed_everything")
        callbacks = [
            BestAndLastCheckpoint(),
            MetricsJSON(),
            PredictionsJSON(),
            RunState(seed if type(seed) is int else None),  # bool seeds: no seeding asked for
            BufferSnapshot(),
        ]
        if logs and (kwargs.get("logger") or trainer_cfg.get("logger")):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = [*(trainer_cfg.get("callbacks") or []), *callbacks]
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description (usage examples) kept as written."""


def close_run(*, ok: bool) -> None:
    """End what a run started before the interpreter exits.

    Lightning destroys a NCCL process group at exit but leaves a gloo one to the interpreter's
    teardown, where its C++ worker threads are destroyed while still joinable: the process aborts
    with "terminate called without an active exception" (SIGABRT, exit code -6) at random, after
    the run has finished. So every rank destroys its group here, after a barrier (on success) so
    that no peer is still inside a collective; and the W&B run is finished so its service exits.
    """
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if ok else 1)


def run(args: list[str] | None = None) -> CnnlabCLI:
    """One command, in this process; the caller ends the run (`close_run`)."""
    return CnnlabCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"default_root_dir": "runs"},
        save_config_callback=KeepConfigs,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__, "formatter_class": HelpFormatter},
        parser_class=SuggestingParser,
        args=args,
    )


def main(args: list[str] | None = None) -> CnnlabCLI:
    ok = False
    try:
        cli = run(args)
        ok = True
        return cli
    except Exception as err:
        cause = user_error(err)
        if cause is None or os.environ.get("CNNLAB_DEBUG"):  # a bug, not bad input: full traceback
            raise
        sys.exit(f"error: {cause}  (CNNLAB_DEBUG=1 shows the traceback)")
    finally:
        close_run(ok=ok)


if __name__ == "__main__":
    main()
