"""scripts/train.py end to end: every embedded config, metrics.json, predict, W&B offline, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
SOURCE = "configs/transfer/digits_pretrain_source.yaml"
# Configs that need no external data: the embedded digits ones.
EMBEDDED = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/digits_*.yaml"))
QUIET = [
    "--wandb=disabled",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def train(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"train.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def metrics_of(root: Path, name: str, version: int = 0) -> dict[str, float]:
    return json.loads((root / name / f"version_{version}" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (briefly) pretrained digits 0-4 network, exported where the target configs expect it."""
    root = tmp_path_factory.mktemp("source")
    train(
        "fit",
        f"--config={SOURCE}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=2",
        *QUIET,
    )
    path = root / "weights" / "digits_source.pt"
    assert path.is_file()
    return path


@pytest.mark.parametrize("config", EMBEDDED)
def test_fast_dev_run_every_embedded_config(
    config: str, source_weights: Path, tmp_path: Path
) -> None:
    cfg = yaml.safe_load((ROOT / config).read_text())
    extra = []
    for key in ("weights", "weights_backbone"):  # configs that start from the digits network
        if cfg["model"]["init_args"].get(key):
            extra.append(f"--model.{key}={source_weights}")
    train(
        "fit",
        f"--config={config}",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        *extra,
    )


def test_fit_test_predict_write_their_files(source_weights: Path, tmp_path: Path) -> None:
    config = "configs/transfer/digits_finetune.yaml"
    common = [
        f"--config={config}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.weights={source_weights}",
        "--data.max_eval_samples=64",
        *QUIET,
    ]
    train("fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--name=run")
    run = tmp_path / "run" / "version_0"
    fit = metrics_of(tmp_path, "run")
    assert {"val/acc", "val/loss", "train/loss", "train/acc"} <= fit.keys()
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list((run / "images").glob("val_predictions_epoch*.png")), "no sample-prediction picture"

    ckpt = run / "checkpoints" / "last.ckpt"
    train("test", *common, f"--ckpt_path={ckpt}", "--name=test")
    tested = metrics_of(tmp_path, "test")
    assert 0.0 <= tested["test/acc"] <= 1.0 and 0.0 <= tested["test/source_acc"] <= 1.0

    train("predict", *common, f"--ckpt_path={ckpt}", "--name=pred")
    preds = json.loads((tmp_path / "pred" / "version_0" / "predictions.json").read_text())
    assert len(preds) == 64 and {"index", "pred", "score"} <= preds[0].keys()


def test_print_config_and_help() -> None:
    out = train("fit", f"--config={SOURCE}", "--print_config").stdout
    resolved = yaml.safe_load(out)
    assert resolved["model"]["class_path"] == "lit_modules.transfer.TransferClassifier"
    assert resolved["model"]["init_args"]["mode"] == "scratch"
    assert "--wandb" in train("fit", "--help").stdout


def test_wandb_offline_needs_no_account(tmp_path: Path) -> None:
    env_home = tmp_path / "home"  # no ~/.netrc, no API key: offline must not ask
    env_home.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "fit",
            f"--config={SOURCE}",
            "--trainer.fast_dev_run=false",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--wandb=offline",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("WANDB")},
            "HOME": str(env_home),
            "PYTHONPATH": str(ROOT),
            "WANDB_SILENT": "true",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "digits_pretrain_source" / "version_0" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"


def test_bad_choice_lists_valid_ones() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "fit", f"--config={SOURCE}", "--model.mode=frozen"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "linear_probe" in proc.stderr and "finetune" in proc.stderr


def test_ddp_two_processes_fit_and_validate_count_each_sample_once(tmp_path: Path) -> None:
    """2-process DDP (gloo on CPU): fit completes; validate equals the 1-process validate.

    203 validation images split over 2 ranks is uneven: Lightning's default sampler would repeat
    one image to pad the shards; cnnlab's eval loaders must not.
    """
    config = "configs/transfer/digits_scratch.yaml"
    common = [
        f"--config={config}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.max_eval_samples=203",
        *QUIET,
    ]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    train(
        "fit",
        *common,
        *ddp,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--name=ddp_fit",
    )
    ckpt = tmp_path / "ddp_fit" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "val/acc" in metrics_of(tmp_path, "ddp_fit")

    train("validate", *common, "--trainer.devices=1", f"--ckpt_path={ckpt}", "--name=val1")
    train("validate", *common, *ddp, f"--ckpt_path={ckpt}", "--name=val2")
    one, two = metrics_of(tmp_path, "val1")["val/acc"], metrics_of(tmp_path, "val2")["val/acc"]
    assert two == pytest.approx(one, abs=1e-7)
    # the accuracy of 203 images is a multiple of 1/203: a padded 204-image count would not be
    assert round(one * 203) == pytest.approx(one * 203, abs=1e-4)


CLUSTER = sorted(
    str(p.relative_to(ROOT))
    for p in ROOT.glob("configs/*/*.yaml")
    if not p.name.startswith("digits_") and p.parent.name != "tables"
)


@pytest.mark.parametrize("config", CLUSTER)
def test_cluster_configs_resolve(config: str) -> None:
    """The GPU-cluster configs are valid against the current schemas (nothing is instantiated)."""
    resolved = yaml.safe_load(train("fit", f"--config={config}", "--print_config").stdout)
    assert resolved["model"]["class_path"].startswith("lit_modules.")
    assert resolved["data"]["class_path"].startswith("datamodules.")


def test_cifar10_config_runs_on_a_cifar_fixture(tmp_path: Path) -> None:
    """The cluster CIFAR-10 recipe, shrunk to CPU, on files in CIFAR's real on-disk format."""
    from tests.test_classification_data import write_cifar10

    data = tmp_path / "cifar10"
    write_cifar10(data)
    train(
        "fit",
        "--config=configs/transfer/cifar10_resnet50_finetune.yaml",
        f"--data.root={data}",
        "--data.download=false",
        "--data.image_size=32",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--model.backbone=resnet18",
        "--model.weights=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.sync_batchnorm=false",
        "--trainer.precision=32-true",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *QUIET,
    )


@pytest.mark.parametrize(
    ("config", "override", "expected"),
    [
        (
            "digits_finetune",
            "--model.weights=/nonexistent/w.pt",
            "weights file not found: /nonexistent/w.pt",
        ),
        ("digits_scratch", "--model.backbone=resnet99", "valid: digits_cnn, resnet18"),
        (
            "digits_scratch",
            "--model.num_classes=7",
            "the data has 5 classes but model.num_classes is 7",
        ),
    ],
)
def test_bad_input_is_one_clear_line(
    config: str, override: str, expected: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CNNLAB_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "fit",
            f"--config=configs/transfer/{config}.yaml",
            override,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.fast_dev_run=true",
            *QUIET,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
