"""DDP: a 2-process `fit` of every module is one run; `validate` / `test` of one checkpoint on 2
gloo processes give the 1-process metrics.

For every module, on evaluation sets whose size does not divide among the ranks (203 digits, 7
scenes, 101 images): no sample dropped, none counted twice, every rank making the same collective
calls. All runs of one side share a process (tests/cli_batch.py): the imports are paid once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_modules.detection import _new_map
from tests.test_cli import QUIET, ROOT

BATCH = ROOT / "tests" / "cli_batch.py"
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
# Speed is a measurement of the run, not a score of the checkpoint.
NOT_COMPARED = ("images_per_s", "seconds")


def modules(judge: Path) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """name -> (config + shared overrides, fit-only overrides, evaluation overrides)."""
    return {
        "transfer": (
            ["--config=configs/transfer/digits_scratch.yaml", "--data.max_eval_samples=203"],
            ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2"],
            [],
        ),
        "detection": (
            [
                "--config=configs/detection/digits_faster_rcnn.yaml",
                "--model.weights_backbone=null",
                "--data.train_length=16",
                "--data.eval_length=7",
                "--data.eval_batch_size=2",
            ],
            ["--trainer.max_steps=3", "--trainer.val_check_interval=null"],
            [],
        ),
        "segmentation": (
            [
                "--config=configs/segmentation/digits_fcn8s.yaml",
                "--data.train_length=16",
                "--data.eval_length=7",
                "--data.eval_batch_size=2",
            ],
            ["--trainer.max_epochs=1"],
            [],
        ),
        "gan": (
            [
                "--config=configs/gan/digits_dcgan.yaml",
                "--model.g_width=8",
                "--model.d_width=8",
                f"--model.classifier_weights={judge}",
                "--data.max_eval_samples=101",
                "--data.batch_size=16",
            ],
            ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3"],
            [],
        ),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    runs: list[list[str]], out: Path, world_size: int = 1, *, check: bool = True
) -> list[str]:
    """Run the commands in one process, or in `world_size` torchrun-style ranks."""
    argv = [sys.executable, str(BATCH), str(out)]
    for args in runs:
        argv += ["--", *args]
    base = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    if world_size == 1:
        procs = [subprocess.Popen(argv, cwd=ROOT, env=base, stderr=subprocess.PIPE, text=True)]
    else:
        port = str(free_port())
        procs = [
            subprocess.Popen(
                argv,
                cwd=ROOT,
                env={
                    **base,
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "GROUP_RANK": "0",
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                },
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(world_size)
        ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert out.is_file(), f"no results (exit codes {codes}):\n" + "\n".join(
        e[-3000:] for e in errors
    )
    results = json.loads(out.read_text())
    assert not check or codes == [0] * world_size, (
        f"exit codes {codes}: {results}\n{errors[0][-3000:]}"
    )
    return results


@pytest.mark.slow  # multi-process: `make test` runs it in its own step
def test_validate_and_test_on_2_processes_equal_1_process(judge: Path, tmp_path: Path) -> None:
    root = [f"--trainer.default_root_dir={tmp_path}", *QUIET]
    specs = modules(judge)
    ckpt = {m: tmp_path / f"{m}_fit" / "version_0" / "checkpoints" / "last.ckpt" for m in specs}
    fits = [
        ["fit", *common, *fit, *root, f"--name={m}_fit"] for m, (common, fit, _) in specs.items()
    ]

    def evals(world: int) -> list[list[str]]:
        extra = DDP if world == 2 else ["--trainer.devices=1"]
        return [
            [
                stage,
                *common,
                *ev,
                *root,
                *extra,
                f"--ckpt_path={ckpt[m]}",
                f"--name={m}_{stage}{world}",
            ]
            for m, (common, _, ev) in specs.items()
            for stage in ("validate", "test")
        ]

    assert launch(fits + evals(1), tmp_path / "one.json") == ["ok"] * (len(fits) + 8)
    fits2 = [[*f[:-1], f"--name={m}_fit2", *DDP] for m, f in zip(specs, fits, strict=True)]
    assert launch(fits2 + evals(2), tmp_path / "two.json", world_size=2) == ["ok"] * 12
    for m in specs:  # a 2-process fit is one run: one dir, one set of checkpoints, one metrics.json
        assert [p.name for p in (tmp_path / f"{m}_fit2").iterdir()] == ["version_0"], m
        run = tmp_path / f"{m}_fit2" / "version_0"
        assert (run / "checkpoints" / "last.ckpt").is_file(), m
        assert [p.name for p in run.glob("metrics*.json")] == ["metrics.json"], m
    for m in specs:
        for stage in ("validate", "test"):
            one = json.loads(
                (tmp_path / f"{m}_{stage}1" / "version_0" / "metrics.json").read_text()
            )
            two = json.loads(
                (tmp_path / f"{m}_{stage}2" / "version_0" / "metrics.json").read_text()
            )
            keys = sorted(k for k in one if not k.endswith(NOT_COMPARED))
            assert keys and keys == sorted(k for k in two if not k.endswith(NOT_COMPARED)), m
            for k in keys:
                assert two[k] == pytest.approx(one[k], abs=1e-6, rel=1e-6), f"{m} {stage} {k}"
            assert not list((tmp_path / f"{m}_{stage}2").glob("version_1")), "one run dir"


def _map_worker(rank: int, world: int, port: int, shards: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = _new_map()
        preds, targets = shards[rank]
        if preds:  # a rank may also hold no image at all
            metric.update(preds, targets)
        result = {k: v.item() for k, v in metric.compute().items() if v.numel() == 1}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def _scene(n_gt: int, n_det: int, seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_gt, 2, generator=g) * 50
    gt = torch.cat([xy, xy + 20], 1)
    det = (gt[:n_det] + torch.randn(min(n_det, n_gt), 4, generator=g)).clamp_min(0)
    pred = {
        "boxes": det,
        "scores": torch.rand(len(det), generator=g),
        "labels": torch.ones(len(det), dtype=torch.int64),
    }
    target = {
        "boxes": gt,
        "labels": torch.ones(n_gt, dtype=torch.int64),
        "iscrowd": torch.zeros(n_gt, dtype=torch.int64),
    }
    return pred, target


def test_map_sync_with_uneven_shards_and_a_rank_without_detections(tmp_path: Path) -> None:
    """Rank 1 holds fewer images than rank 0 and none of its images has a detection."""
    counts = [(2, 2), (1, 0), (2, 1), (1, 0), (1, 1)]  # (ground-truth boxes, detections)
    scenes = [_scene(n_gt, n_det, seed) for seed, (n_gt, n_det) in enumerate(counts)]
    shards = [
        tuple(map(list, zip(*scenes[rank::2], strict=True))) if scenes[rank::2] else ([], [])
        for rank in range(2)
    ]  # UnrepeatedDistributedSampler's deal: image i to rank i % 2
    assert all(len(p["boxes"]) == 0 for p in shards[1][0])
    one = _new_map()
    one.update(*map(list, zip(*scenes, strict=True)))
    expected = {k: v.item() for k, v in one.compute().items() if v.numel() == 1}
    out = tmp_path / "two.json"
    torch.multiprocessing.spawn(_map_worker, args=(2, free_port(), shards, str(out)), nprocs=2)
    assert json.loads(out.read_text()) == pytest.approx(expected, abs=1e-9)
