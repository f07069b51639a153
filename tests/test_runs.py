"""Trustworthy runs: a fit killed mid-epoch and resumed is one run with the uninterrupted metrics.

For TransferClassifier, FasterRCNNModule and DCGANModule (two optimisers): SIGKILL in the middle
of epoch 1, `fit --ckpt_path last` again (the same command starts a job and resumes it), then the
final metrics equal an uninterrupted run's (deterministic mode) and one run directory holds the
whole history. Also: checked checkpoints, atomic writes, a SLURM requeue's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_modules.runs import AtomicCheckpointIO, CheckpointError, find_resume, read_checkpoint
from tests.test_cli import QUIET, ROOT, TRAIN
from tests.test_ddp import launch

KILL = '[{"class_path": "tests.killing.KillAt", "init_args": {"epoch": 1, "batch": 1}}]'
TIMING = ("seconds", "images_per_s")


def configs(judge: Path) -> dict[str, list[str]]:
    return {
        "transfer": [
            "--config=configs/transfer/digits_scratch.yaml",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
        ],
        "detection": [
            "--config=configs/detection/digits_faster_rcnn.yaml",
            "--model.weights_backbone=null",
            "--data.train_length=16",
            "--data.eval_length=4",
            "--data.eval_batch_size=4",
            "--trainer.max_steps=-1",
            "--trainer.val_check_interval=null",
        ],
        "gan": [
            "--config=configs/gan/digits_dcgan.yaml",
            "--model.g_width=8",
            "--model.d_width=8",
            f"--model.classifier_weights={judge}",
            "--data.max_eval_samples=32",
            "--data.batch_size=16",
            "--trainer.limit_train_batches=3",
        ],
    }


def common(root: Path, module: str) -> list[str]:
    wandb = "--wandb=offline" if module == "transfer" else "--wandb=disabled"  # W&B costs seconds
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=3",
        "--trainer.deterministic=true",
        *QUIET[1:],
        wandb,
    ]


def kill_job(pid: int) -> None:
    """Kill what is left of a killed job, as a cluster kills its cgroup: its process group and
    the W&B service it started (wandb-core runs in a session of its own, `--pid <its parent>`),
    which would otherwise outlive it and hold the run id "in use" for the resumed run."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"wandb-core") for a in args) and str(pid).encode() in args:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(cmdline.parent.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def runs(judge: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Uninterrupted runs, killed runs, resumed runs; and a resume from a truncated last.ckpt."""
    root = tmp_path_factory.mktemp("runs")
    cfg = configs(judge)
    full = [["fit", *cfg[m], *common(root, m), f"--name={m}_full"] for m in cfg]
    assert launch(full, root / "full.json") == ["ok"] * len(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    killed = {}
    for m in cfg:
        args = ["fit", *cfg[m], *common(root, m), f"--name={m}_cut", "--ckpt_path=last"]
        # Its own session, so that the whole job dies as a cluster kills a job (its cgroup):
        # the W&B service it started would otherwise outlive it and hold the run id "in use".
        proc = subprocess.Popen(
            [sys.executable, str(TRAIN), *args, f"--trainer.callbacks={KILL}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        _, stderr = proc.communicate(timeout=300)
        kill_job(proc.pid)
        killed[m] = proc.returncode
        assert proc.returncode == -9, f"{m}: not killed ({proc.returncode}):\n{stderr[-3000:]}"
    # A run whose last.ckpt was cut short while written by something else than cnnlab's writer.
    trunc = root / "trunc" / "version_0" / "checkpoints"
    shutil.copytree(root / "transfer_full" / "version_0" / "checkpoints", trunc)
    last = trunc / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    resume = [
        ["fit", *cfg[m], *common(root, m), f"--name={m}_cut", "--ckpt_path=last"] for m in cfg
    ]
    resume.append(["fit", *cfg["transfer"], *common(root, "x"), "--name=trunc", "--ckpt_path=last"])
    results = launch(resume, root / "resume.json", check=False)
    return {"root": root, "killed": killed, "results": results, "modules": list(cfg)}


def _metrics(run: Path) -> dict[str, float]:
    values = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in values.items() if not any(t in k for t in TIMING)}  # speed


@pytest.mark.slow  # kills and resumes whole runs: `make test` runs it in its own step
@pytest.mark.parametrize("module", ["transfer", "detection", "gan"])
def test_resume_after_sigkill_is_one_run_with_the_same_metrics(module: str, runs: dict) -> None:
    root: Path = runs["root"]
    assert runs["results"][runs["modules"].index(module)] == "ok"
    assert [p.name for p in (root / f"{module}_cut").iterdir()] == ["version_0"]  # one run dir
    run = root / f"{module}_cut" / "version_0"
    full, resumed = _metrics(root / f"{module}_full" / "version_0"), _metrics(run)
    assert full.keys() == resumed.keys()
    for key in full:
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    # the whole history: epoch 0 (before the kill) and epoch 2 (after the resume) in one file
    epochs = {line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "2"} <= epochs
    assert (run / "config.yaml").is_file() and (run / "config.resumed-1.yaml").is_file()
    assert len(list((run / "checkpoints").glob("last*.ckpt"))) == 1
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["run_dir"] == str(run.resolve())
    if module == "transfer":  # the same W&B run, continued
        run_id = (run / "wandb_run_id").read_text().strip()
        offline = sorted((run / "wandb").glob("offline-run-*"))
        assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)


@pytest.mark.slow  # reads the killed and resumed runs
def test_gan_checkpoint_holds_both_optimisers(runs: dict) -> None:
    last = runs["root"] / "gan_cut" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    states = ckpt["optimizer_states"]
    assert len(states) == 2 and all(s["state"] for s in states)  # Adam moments of G and of D


@pytest.mark.slow  # reads the killed and resumed runs
def test_truncated_last_checkpoint_is_one_clear_error(runs: dict) -> None:
    error = runs["results"][-1]
    last = runs["root"] / "trunc" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"checkpoint {last} cannot be read" in error
    assert "--ckpt_path " in error and "best-" in error  # the previous checkpoint to use
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(last)


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    """A save that dies half-way leaves the previous checkpoint whole and no temporary file."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("killed while writing")

    big = {"state_dict": {"w": torch.zeros(100_000)}, "z": Unpicklable()}
    with pytest.raises(RuntimeError, match="killed while writing"):
        AtomicCheckpointIO().save_checkpoint(big, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow  # reads the killed and resumed runs
def test_slurm_requeue_resumes_the_hpc_checkpoint_in_its_run_dir(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning saves `hpc_ckpt_N.ckpt` in default_root_dir on SIGUSR1 and requeues the job; the
    requeued `fit` (no --ckpt_path) continues in the run directory recorded in that checkpoint."""
    run = runs["root"] / "transfer_cut" / "version_0"
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt")
    assert find_resume(None, root=tmp_path, name="x", fit=True) is None  # not under SLURM
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "cnnlab")
    resume = find_resume(None, root=tmp_path, name="transfer_cut", fit=True)
    assert resume is not None and resume.ckpt == tmp_path / "hpc_ckpt_1.ckpt"
    assert resume.run_dir == run.resolve()
    with pytest.raises(CheckpointError, match="belongs to run .*transfer_cut.*, not to 'other'"):
        find_resume(None, root=tmp_path, name="other", fit=True)  # another job's checkpoint
    assert find_resume("last", root=tmp_path, name="none", fit=True) is None  # nothing yet: new run
