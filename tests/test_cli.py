"""scripts/train.py end to end: every embedded config, metrics.json, predict, W&B offline, DDP."""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lit_modules.callbacks import (
    BestAndLastCheckpoint,
    ExportWeights,
    MetricsJSON,
    PredictionsJSON,
    log_train_terms,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
SOURCE = "configs/transfer/digits_pretrain_source.yaml"
# Configs that need no external data: the embedded digits ones.
# The OverFeat config reads a trained BoxRegressor's weights (a classifier's is refused, clearly):
# tests/test_localization.py::test_overfeat_loads_a_regressor_and_scores_scenes runs it.
NEEDS_A_TRAINED_REGRESSOR = {"configs/localization/digits_overfeat.yaml"}
EMBEDDED = sorted(
    str(p.relative_to(ROOT))
    for p in ROOT.glob("configs/*/digits_*.yaml")
    if str(p.relative_to(ROOT)) not in NEEDS_A_TRAINED_REGRESSOR
)
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


@pytest.fixture(scope="module")
def fast_dev_runs(source_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`fit --trainer.fast_dev_run=true` of every embedded config, all in one process."""
    from tests.test_ddp import launch

    root = tmp_path_factory.mktemp("fast_dev_run")
    runs = []
    for config in EMBEDDED:
        cfg = yaml.safe_load((ROOT / config).read_text())
        extra = [  # configs that start from the digits network
            f"--model.{key}={source_weights}"
            for key in ("weights", "weights_backbone")
            if cfg["model"]["init_args"].get(key)
        ]
        if "cache_dir" in cfg["data"]["init_args"]:  # proposals: a cache of the test's own
            extra.append(f"--data.cache_dir={root / 'proposals'}")
        runs.append(
            ["fit", f"--config={config}", "--trainer.fast_dev_run=true",
             f"--trainer.default_root_dir={root}", f"--name={Path(config).stem}", *QUIET, *extra]
        )  # fmt: skip
    return dict(zip(EMBEDDED, launch(runs, root / "results.json", check=False), strict=True))


@pytest.mark.parametrize("config", EMBEDDED)
def test_fast_dev_run_every_embedded_config(config: str, fast_dev_runs: dict) -> None:
    assert fast_dev_runs[config] == "ok"


def test_fit_test_predict_write_their_files(source_weights: Path, tmp_path: Path) -> None:
    config = "configs/transfer/digits_finetune.yaml"
    common = [
        f"--config={config}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.weights={source_weights}",
        "--data.max_eval_samples=64",
        *QUIET,
    ]
    from tests.test_ddp import launch

    run = tmp_path / "run" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    fit = [
        "fit",
        *common,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--name=run",
    ]
    test = ["test", *common, f"--ckpt_path={ckpt}", "--name=test"]
    predict = ["predict", *common, f"--ckpt_path={ckpt}", "--name=pred"]
    assert launch([fit, test, predict], tmp_path / "results.json") == ["ok"] * 3  # one process
    fit = metrics_of(tmp_path, "run")
    assert {"val/acc", "val/loss", "train/loss", "train/acc"} <= fit.keys()
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list((run / "images").glob("val_predictions_epoch*.png")), "no sample-prediction picture"

    tested = metrics_of(tmp_path, "test")
    assert 0.0 <= tested["test/acc"] <= 1.0 and 0.0 <= tested["test/source_acc"] <= 1.0

    preds = json.loads((tmp_path / "pred" / "version_0" / "predictions.json").read_text())
    assert len(preds) == 64 and {"index", "pred", "score"} <= preds[0].keys()


def test_print_config_and_help(capsys: pytest.CaptureFixture) -> None:
    from scripts.train import run

    for args in (["fit", f"--config={SOURCE}", "--print_config"], ["fit", "--help"]):
        with pytest.raises(SystemExit) as done:  # both print and exit, before any work
            run(args)
        assert done.value.code in (0, None)
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out[: out.index("usage:")])
    assert resolved["model"]["class_path"] == "lit_modules.transfer.TransferClassifier"
    assert resolved["model"]["init_args"]["mode"] == "scratch"
    assert "--wandb" in out[out.index("usage:") :]


# Installed in every Python process of a run (on PYTHONPATH): records each network connection
# attempt and name lookup. wandb 0.31 offline starts its service (wandb-core, a Go binary) and
# talks to it over a unix socket, so the only expected connect is one AF_UNIX.
AUDIT_HOOK = """
import os, sys

def _audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        sock_family = getattr(getattr(args[0], "family", None), "name", "")
        detail = (sock_family, repr(args[1])) if event == "socket.connect" else ("", repr(args[:2]))
        with open(os.environ["CNNLAB_NET_LOG"], "a") as f:
            f.write(f"{os.getpid()}\\t{event}\\t{detail[0]}\\t{detail[1]}\\n")

sys.addaudithook(_audit)
"""


def _no_network_namespace() -> bool:
    """`unshare -rn` (util-linux) works unprivileged here: a run with no network at all."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


def _remote_attempts(log: Path) -> list[str]:
    """Logged attempts that could leave the machine: a non-loopback IP, a host name, a URL."""
    bad = []
    for line in log.read_text().splitlines() if log.exists() else []:
        _, event, family, detail = line.split("\t")
        if event == "socket.connect" and family == "AF_UNIX":
            continue
        host = detail.strip("()").split(",")[0].strip(" '\"")
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            if host == "localhost":
                continue
        bad.append(line)
    return bad


def offline_fit(
    tmp_path: Path, env: dict[str, str], prefix: tuple[str, ...] = ()
) -> tuple[str, float]:
    """A tiny W&B-offline `fit` as a new user runs it: empty HOME, no key, stdin closed.

    Every connection attempt of its Python processes is logged (AUDIT_HOOK); returns the captured
    stdout + stderr and the wall seconds.
    """
    home, tmp, site = tmp_path / "home", tmp_path / "tmp", tmp_path / "site"
    for folder in (home, tmp, site):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            *prefix,
            sys.executable,
            str(TRAIN),
            "fit",
            f"--config={SOURCE}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--wandb=offline",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,  # a prompt would read EOF and fail, not wait
        env={
            **clean,
            "HOME": str(home),  # no ~/.netrc, no ~/.config/wandb
            "TMPDIR": str(tmp),  # wandb's service socket and temporary files, checked too
            "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
            "CNNLAB_NET_LOG": str(tmp_path / "net.log"),
            **env,
        },
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "net.log").exists(), "the audit hook did not run"
    assert not _remote_attempts(tmp_path / "net.log"), _remote_attempts(tmp_path / "net.log")
    runs = list(
        (tmp_path / "runs" / "digits_pretrain_source" / "version_0" / "wandb").glob("offline-run-*")
    )
    assert runs, "no offline W&B run written"
    return proc.stdout + proc.stderr, seconds


@pytest.mark.slow  # a whole W&B-logged run per case: `make test` runs it in its own step
@pytest.mark.parametrize("network", ["host", "none"])
def test_wandb_offline_needs_no_account_and_no_network(tmp_path: Path, network: str) -> None:
    """No key, no ~/.netrc, stdin closed: the run is offline, asks nothing, connects nowhere.

    "none" runs it in a user namespace without network (`unshare -rn`): nothing can leave even
    from wandb-core (not Python, so not audited), and the run still finishes at its usual speed.
    """
    if network == "none" and not _no_network_namespace():
        pytest.skip("unshare -rn is not available unprivileged here")
    prefix = ("unshare", "-rn") if network == "none" else ()
    _, seconds = offline_fit(tmp_path, {}, prefix)
    assert seconds < 60, f"{seconds:.0f} s: something waited for a network time-out"


@pytest.mark.slow  # a whole W&B-logged run
def test_wandb_api_key_lands_nowhere(tmp_path: Path) -> None:
    """A key in the environment (offline run) is in no file of the run, W&B's logs, HOME or output."""
    secret = "cnnlab-FAKE-" + "5ecret" * 7  # the length of a real key (40+)
    output, _ = offline_fit(tmp_path, {"WANDB_API_KEY": secret})
    run = tmp_path / "runs" / "digits_pretrain_source" / "version_0"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "net.log"]
    names = {p.name for p in written}
    # the files that could hold it exist, so the search below is not vacuous
    assert {"config.yaml", "hparams.yaml", "metrics.csv", "output.log", "debug.log"} <= names
    assert any(p.name.endswith(".wandb") for p in written) and (run / "config.yaml").is_file()
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
    assert secret not in output


# ----------------------------------------------------------------------------- nothing lost


def test_logger_false_runs_never_share_a_directory(tmp_path: Path) -> None:
    """`--trainer.logger=false` twice in one root: each run has its own version_N (no logger,
    so no metrics.csv / W&B), and the second weights export keeps the first one."""
    root = tmp_path / "runs"
    args = [
        "fit",
        f"--config={SOURCE}",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        *QUIET,
    ]
    results = tmp_path / "results.json"
    proc = subprocess.run(  # both runs in one process (tests/cli_batch.py): imports paid once
        [
            sys.executable,
            str(ROOT / "tests" / "cli_batch.py"),
            str(results),
            "--",
            *args,
            "--",
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for version in (0, 1):
        run = root / "digits_pretrain_source" / f"version_{version}"
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert "val/acc" in json.loads((run / "metrics.json").read_text())
        assert not (run / "metrics.csv").exists() and not (run / "wandb").exists()
    assert not (root / "checkpoints").exists() and not (root / "metrics.json").exists()
    previous = list((root / "weights").glob("digits_source.previous-*.pt"))
    assert (root / "weights" / "digits_source.pt").is_file() and len(previous) == 1
    assert f"the previous export is now {previous[0]}" in proc.stdout


class _Tiny(LightningModule):
    """Linear classifier on 8 random points: a full fit / predict in well under a second."""

    monitor = ("val/loss", "min")

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1]))

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).argmax(1)

    def format_predictions(self, outputs: list[torch.Tensor]) -> list[int]:
        return torch.cat(outputs).tolist()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_run(
    root: Path, *, epochs: int = 1, ckpt: Path | None = None, predict: bool = True
) -> None:
    """fit (+ predict) of `_Tiny` with cnnlab's callbacks and no logger: run dir = `root`."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g))
    trainer = Trainer(
        default_root_dir=root,
        logger=False,
        max_epochs=epochs,
        callbacks=[BestAndLastCheckpoint(), MetricsJSON(), PredictionsJSON()],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, loader = _Tiny(), DataLoader(data, batch_size=4)
    trainer.fit(model, loader, loader, ckpt_path=ckpt)
    if predict:
        trainer.predict(model, loader)


class _Terms(LightningModule):
    """Logs its loss through `log_train_terms`; remembers each step's loss and the logged steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.losses: dict[int, float] = {}
        self.logged: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.losses[self.global_step] = loss.item()
        log_train_terms(self, {"loss": loss, "half": loss / 2})
        return loss

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "train/loss":
            self.logged.append(self.global_step)
        super().log(name, value, *args, **kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_train_terms_are_logged_on_the_steps_the_logger_writes_and_the_last(
    tmp_path: Path,
) -> None:
    """Per-step terms skip the steps Lightning does not write (each self.log costs ~0.2 ms), yet
    the CSV holds each written step's own value (never a stale one) and metrics.json the fit's
    last step's."""
    from lightning.pytorch.loggers import CSVLogger

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(torch.randn(28, 2, generator=g), batch_size=4)  # 7 steps an epoch
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[MetricsJSON()],
        max_epochs=2,
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = _Terms()
    trainer.fit(model, loader)
    # written every 3 steps (0-based 2, 5, 8, 11); each epoch's last step (6, 13) logged too
    assert model.logged == [2, 5, 6, 8, 11, 13]
    rows = [
        r
        for r in csv.DictReader((tmp_path / "run" / "version_0" / "metrics.csv").open())
        if r.get("train/loss")
    ]
    written = {int(r["step"]): float(r["train/loss"]) for r in rows}
    assert sorted(written) == [2, 5, 8, 11]
    for step, value in written.items():
        assert value == pytest.approx(model.losses[step], rel=1e-6)
        half = next(float(r["train/half"]) for r in rows if int(r["step"]) == step)
        assert half == pytest.approx(value / 2, rel=1e-6)
    metrics = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())
    assert metrics["train/loss"] == pytest.approx(model.losses[13], rel=1e-6)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_callbacks_never_replace_an_earlier_runs_files(tmp_path: Path) -> None:
    """Two runs writing into one folder (no logger: run dir = default_root_dir, or a logger with
    a fixed version): every file of the first is still there, byte for byte; the second run's
    files get the next free name (Lightning's `last-v1.ckpt`, then `metrics-v1.json`, ...)."""
    _tiny_run(tmp_path)
    first = _contents(tmp_path)
    assert {"metrics.json", "predictions.json", "checkpoints/last.ckpt"} <= first.keys()
    _tiny_run(tmp_path)
    after = _contents(tmp_path)
    assert {k: after[k] for k in first} == first, "a file of the first run was replaced"
    assert {"metrics-v1.json", "predictions-v1.json", "checkpoints/last-v1.ckpt"} <= after.keys()
    assert "val/loss" in json.loads((tmp_path / "metrics-v1.json").read_text())


def test_resumed_fit_continues_its_own_metrics_json(tmp_path: Path) -> None:
    """The exception: a resumed fit is the same run, so it updates the run's metrics.json."""
    _tiny_run(tmp_path, predict=False)
    one_epoch = json.loads((tmp_path / "metrics.json").read_text())
    _tiny_run(tmp_path, epochs=2, ckpt=tmp_path / "checkpoints" / "last.ckpt", predict=False)
    assert not (tmp_path / "metrics-v1.json").exists()
    two_epochs = json.loads((tmp_path / "metrics.json").read_text())
    assert two_epochs.keys() == one_epoch.keys() and two_epochs != one_epoch


def test_export_weights_keeps_every_previous_export(tmp_path: Path) -> None:
    """The stable path holds the newest export; each earlier one is moved aside, not replaced."""
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path))
    export, net = ExportWeights("net.pt"), torch.nn.Linear(2, 1)
    for value in (1.0, 2.0, 3.0):
        torch.nn.init.constant_(net.weight, value)
        export.on_fit_end(trainer, net)  # type: ignore[arg-type]
    folder = tmp_path / "weights"
    load = lambda p: torch.load(p, weights_only=True)["state_dict"]["weight"][0, 0].item()  # noqa: E731
    assert load(folder / "net.pt") == 3.0
    kept = sorted(folder.glob("net.previous-*.pt"))
    assert sorted(load(p) for p in kept) == [1.0, 2.0]  # same second: -v1 tells them apart
    assert not list(folder.glob(".*tmp*")), "a temporary file was left behind"


def test_export_weights_exports_the_checkpoint_chosen_on_val(tmp_path: Path) -> None:
    """`weights: best` exports the best checkpoint's weights, not the final ones; `last` these."""
    best = tmp_path / "best-003.ckpt"
    torch.save({"state_dict": {"weight": torch.full((1, 2), 7.0)}}, best)
    callback = SimpleNamespace(best_model_path=str(best))
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), checkpoint_callback=callback
    )
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(net.weight, 1.0)
    read = lambda: torch.load(tmp_path / "weights" / "net.pt", weights_only=True)["state_dict"]  # noqa: E731
    ExportWeights("net.pt").on_fit_end(trainer, net)  # type: ignore[arg-type]
    assert read()["weight"][0, 0].item() == 7.0
    ExportWeights("net.pt", weights="last").on_fit_end(trainer, net)  # type: ignore[arg-type]
    assert read()["weight"][0, 0].item() == 1.0


def test_export_full_checkpoint_copies_the_chosen_checkpoint_whole(tmp_path: Path) -> None:
    """`full_checkpoint: true` exports the run's checkpoint file itself (hyperparameters too);
    without one to copy it says so, never a state dict that load_from_checkpoint cannot read."""
    best, last = tmp_path / "best-001.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"lr": 0.5}}, best)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 0.5}}, last)
    callback = SimpleNamespace(best_model_path=str(best), last_model_path=str(last))
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), checkpoint_callback=callback
    )
    net = torch.nn.Linear(2, 1)
    read = lambda: torch.load(tmp_path / "weights" / "m.ckpt", weights_only=False)  # noqa: E731
    ExportWeights("m.ckpt", full_checkpoint=True).on_fit_end(trainer, net)  # type: ignore[arg-type]
    assert read()["hyper_parameters"] == {"lr": 0.5} and read()["state_dict"]["w"].item() == 1.0
    ExportWeights("m.ckpt", "last", full_checkpoint=True).on_fit_end(trainer, net)  # type: ignore[arg-type]
    assert read()["state_dict"]["w"].item() == 0.0
    callback.best_model_path = callback.last_model_path = ""
    with pytest.raises(FileNotFoundError, match="m.ckpt.*saved none"):
        ExportWeights("m.ckpt", full_checkpoint=True).on_fit_end(trainer, net)  # type: ignore[arg-type]


def test_demo_twice_keeps_both_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo` again: the previous REPORT.md, report.json and figures move to
    `runs/demo/archive/<time>/` (printed); the runs folder stays where the next demo finds it."""
    from scripts import demo

    calls = []

    def fake_demo(out: Path) -> dict[str, Any]:
        calls.append(len(calls) + 1)
        (out / "figure.png").write_text(f"figure of run {calls[-1]}")
        (out / "runs").mkdir(exist_ok=True)
        (out / "runs" / f"run{calls[-1]}.txt").write_text("a run")
        return {"run": calls[-1]}

    topic = SimpleNamespace(demo=fake_demo, report=lambda r: [f"run {r['run']}"])
    monkeypatch.setitem(sys.modules, "tests.fake_topic", topic)
    monkeypatch.setitem(demo.TOPICS, "fake", "tests.fake_topic")
    monkeypatch.setattr(demo, "quiet_lightning", lambda: None)  # global logging / warnings
    out = tmp_path / "demo"
    demo.main(["--topics", "fake", "--out", str(out)])
    demo.main(["--topics", "fake", "--out", str(out)])
    (archive,) = (out / "archive").iterdir()
    assert f"previous report moved to {archive}" in capsys.readouterr().out
    assert "run 1" in (archive / "REPORT.md").read_text()
    assert json.loads((archive / "report.json").read_text())["fake"]["run"] == 1
    assert (archive / "figure.png").read_text() == "figure of run 1"
    assert "run 2" in (out / "REPORT.md").read_text()
    assert (out / "figure.png").read_text() == "figure of run 2"
    assert {p.name for p in (out / "runs").iterdir()} == {"run1.txt", "run2.txt"}


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


@pytest.mark.slow  # multi-process: `make test` runs it in its own step
def test_ddp_two_process_fit_is_one_run_and_exits_cleanly(tmp_path: Path) -> None:
    """`--trainer.devices=2` from a plain `python train.py` (Lightning starts the second process):
    exit status 0 (no abort at exit), one run dir with one set of checkpoints, one metrics.json and
    one W&B run. Validate / test parity with 1 process, for every module: tests/test_ddp.py."""
    proc = train(
        "fit",
        "--config=configs/transfer/digits_scratch.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.max_eval_samples=203",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--name=ddp_fit",
        "--wandb=offline",
        *QUIET[1:],
    )
    assert "terminate called" not in proc.stderr
    assert [p.name for p in (tmp_path / "ddp_fit").iterdir()] == ["version_0"]
    run = tmp_path / "ddp_fit" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-000.ckpt", "last.ckpt"]
    assert len(list(tmp_path.rglob("metrics*.json"))) == 1
    assert "val/acc" in metrics_of(tmp_path, "ddp_fit")
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


CLUSTER = sorted(
    str(p.relative_to(ROOT))
    for p in ROOT.glob("configs/*/*.yaml")
    if not p.name.startswith("digits_") and p.parent.name not in ("tables", "trainer")
)


@pytest.mark.parametrize("config", CLUSTER)
def test_cluster_configs_resolve(config: str, capsys: pytest.CaptureFixture) -> None:
    """The GPU-cluster configs are valid against the current schemas (nothing is instantiated)."""
    from scripts.train import run

    with pytest.raises(SystemExit) as done:  # --print_config prints and exits, like --help
        run(["fit", f"--config={config}", "--print_config"])
    assert done.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
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
            "the data has 5 classes (largest label 4) but model.num_classes is 7",
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


def test_keep_previous_moves_an_earlier_report_aside(tmp_path: Path) -> None:
    """reproduce.py, benchmark.py, extract_features.py and demo_detection.py keep earlier outputs."""
    from lit_modules.callbacks import keep_previous

    path = tmp_path / "table.md"
    assert keep_previous(path) is None  # nothing yet
    path.write_text("first")
    kept = keep_previous(path)
    assert kept is not None and kept.read_text() == "first" and not path.exists()
    assert kept.name.startswith("table.previous-") and kept.suffix == ".md"
    path.write_text("second")
    assert keep_previous(path) != kept and kept.read_text() == "first"  # both kept


def test_in_processes_keeps_job_order_and_sets_the_threads() -> None:
    from scripts.demo import free_cores, in_processes

    jobs = [(n,) for n in range(5)]  # 2 threads a run: one process on 2 cores (spawning costs)
    assert in_processes(_square_and_threads, jobs, threads=2) == [(n * n, 2) for n in range(5)]
    assert 1 <= free_cores(window=0.05) <= os.cpu_count()


def _square_and_threads(n: int) -> tuple[int, int]:
    import torch

    return n * n, torch.get_num_threads()
