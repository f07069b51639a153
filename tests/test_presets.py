"""Cluster workflow and pictures: trainer presets compose with any recipe, the lr follows the
global batch, reproduce.py logs W&B tables offline, and picture labels read at 100% zoom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import yaml
from lightning.pytorch.strategies import StrategyRegistry
from torchvision.utils import draw_bounding_boxes

from lit_modules.visual import class_legend, draw_detections, labelled_grid, segmentation_grid
from scripts import reproduce
from scripts.train import run, scale_lr

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "trainer"
RECIPE = "configs/detection/voc07_faster_rcnn_r50fpn.yaml"  # 8 GPUs, DDP: what presets undo
READABLE_PX = 12  # height of a digit of a label, in pixels


def resolved(capsys: pytest.CaptureFixture, *args: str) -> dict[str, Any]:
    """The config `fit ... --print_config` resolves (nothing is instantiated: no GPU needed)."""
    with pytest.raises(SystemExit) as done:
        run(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "bf16"])
def test_preset_overrides_only_the_trainer_of_a_recipe(
    preset: str, capsys: pytest.CaptureFixture
) -> None:
    ours = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    assert set(ours) == {"trainer"}
    cfg = resolved(capsys, f"--config={RECIPE}", f"--config=configs/trainer/{preset}.yaml")
    alone = resolved(capsys, f"--config={RECIPE}")
    assert {k: cfg["trainer"][k] for k in ours["trainer"]} == ours["trainer"]
    others = set(alone["trainer"]) - set(ours["trainer"])
    assert {k: cfg["trainer"][k] for k in others} == {k: alone["trainer"][k] for k in others}
    assert cfg["model"] == alone["model"] and cfg["data"] == alone["data"]


def test_ddp_preset_skips_unused_parameter_search_and_syncbn_is_opt_in(
    capsys: pytest.CaptureFixture,
) -> None:
    text = (PRESETS / "ddp.yaml").read_text()
    cfg = resolved(capsys, f"--config={RECIPE}", "--config=configs/trainer/ddp.yaml")
    strategy = StrategyRegistry[cfg["trainer"]["strategy"]]
    assert strategy["init_params"]["find_unused_parameters"] is False
    assert cfg["trainer"]["sync_batchnorm"] is False and "# sync_batchnorm: true" in text
    on = resolved(
        capsys,
        f"--config={RECIPE}",
        "--config=configs/trainer/ddp.yaml",
        "--trainer.sync_batchnorm=true",
    )
    assert on["trainer"]["sync_batchnorm"] is True


def test_cpu_bf16_presets_run_and_scale_the_lr_to_the_global_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """digits_scratch's lr 0.003 declared for 16 images; this run's batch is 8 x 4 accumulated."""
    cli = run(
        [
            "fit",
            "--config=configs/transfer/digits_scratch.yaml",
            "--config=configs/trainer/cpu.yaml",
            "--config=configs/trainer/bf16.yaml",
            "--lr_base_batch_size=16",
            "--data.batch_size=8",
            "--trainer.accumulate_grad_batches=4",
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--wandb=disabled",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.strategy.root_device.type == "cpu"
    assert cli.model.hparams.lr == pytest.approx(0.006)
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group.get("initial_lr", group["lr"]) == pytest.approx(0.006)
    assert (
        "model.lr 0.003 is for a global batch of 16; this run's is 32 = devices 1 x nodes 1 x "
        "batch 8 x accumulate 4 -> lr 0.006 (x 32/16)"
    ) in out
    assert cli._run_name(cli.config.fit) == "digits_scratch"  # runs/<recipe>/, not runs/bf16/
    # config.yaml (written from cli.config) keeps the recipe's lr: a re-run scales the same way
    assert cli.config.fit.model.init_args.lr == 0.003 and cli.config.fit.lr_base_batch_size == 16


def test_scale_lr_is_linear_and_says_so_when_unchanged() -> None:
    sizes = {"devices": 8, "nodes": 1, "batch": 2, "accumulate": 1}
    lr, line = scale_lr(0.02, 16, sizes)
    assert lr == pytest.approx(0.02) and line.endswith("-> lr 0.02 (unchanged)")
    lr, line = scale_lr(0.02, 16, {**sizes, "nodes": 4})
    assert lr == pytest.approx(0.08) and "this run's is 64" in line


# ---------------------------------------------------------------------- reproduce: W&B tables

TABLE = {"metrics": ["test/acc"], "scale": 100}
ROWS = [
    {
        "name": "fine-tuned",
        "config": "transfer/digits_finetune.yaml",
        "quick": True,
        "metrics": {"test/acc": 0.875},
        "paper": {"test/acc": 93.6},
        "selection": {"checkpoint": "best-1.ckpt", "monitor": "val/acc", "val_score": 0.9},
        "seconds": 12.5,
    },
    {
        "name": "Pets",
        "config": "transfer/pets_resnet50_finetune.yaml",
        "quick": False,
        "metrics": {},
        "paper": {"test/acc": 90.1},
        "seconds": None,
        "skipped": "no embedded stand-in",
    },
]
RESULT = {"table": "transfer", "quick": True, "protocol": reproduce.protocol(TABLE, ROWS)}


def test_reproduce_logs_the_table_as_a_wandb_table_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        run_dir = reproduce.log_wandb({**RESULT, "rows": ROWS}, TABLE, tmp_path, "offline")
    finally:
        wandb.teardown()  # its service would outlive the test (see conftest.no_wandb_service_left)
    assert run_dir is not None and run_dir.parent == tmp_path / "wandb"
    assert run_dir.name.startswith("offline-run-") and list(run_dir.glob("run-*.wandb"))
    (logged,) = run_dir.glob("files/media/table/transfer_*.table.json")
    table = yaml.safe_load(logged.read_text())  # JSON is YAML
    assert table["columns"] == [
        "row",
        "config",
        "quick",
        "test/acc (paper)",
        "test/acc (ours)",
        "chosen checkpoint",
        "wall s",
    ]
    assert table["data"][0][3:] == [93.6, 87.5, "best-1.ckpt (val/acc 0.9)", 12.5]
    assert table["data"][1][3:] == [90.1, None, "-", None]


def test_reproduce_makes_no_wandb_run_unless_asked(tmp_path: Path) -> None:
    assert reproduce.log_wandb({**RESULT, "rows": ROWS}, TABLE, tmp_path, "disabled") is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(SystemExit):  # an unknown mode is refused before any run
        reproduce.main(["transfer", "--wandb=on"])


# ---------------------------------------------------------------------- readable pictures


def text_rows(picture: torch.Tensor) -> int:
    """Height in pixels of the white text in `picture` (3, H, W) uint8 (nothing else is white)."""
    rows = (picture.int().min(0).values > 200).any(1).nonzero()
    return 0 if len(rows) == 0 else int(rows.max() - rows.min() + 1)


BOX = torch.tensor([[30.0, 40.0, 60.0, 80.0]])


def one_detection(**kwargs: Any) -> torch.Tensor:
    """A black 96 px scene with one detection, drawn as the detection module's pictures are."""
    pred = {
        "boxes": BOX,
        "labels": torch.tensor([7]),
        "scores": torch.tensor([0.93]),
    }
    return draw_detections([torch.zeros(3, 96, 96)], [pred], names={7: "6"}, **kwargs)


def test_detection_labels_are_readable_and_above_their_box() -> None:
    picture = one_detection()  # the 96 px scene is drawn at 192 px: the box top is at y = 80
    assert picture.shape[-2:] == (192, 192)  # one tile: make_grid adds no padding
    assert text_rows(picture) >= READABLE_PX
    white = (picture.int().min(0).values > 200).nonzero()  # (N, 2) rows, columns
    assert white[:, 0].max() < 80 and white[:, 1].min() >= 60  # on its tag, above the box
    below = one_detection(threshold=0.95)  # the detection scores less: nothing is drawn
    assert text_rows(below) == 0 and below.sum() < picture.sum()
    # torchvision's default font, measured the same way: the labels these pictures had
    black = torch.zeros(3, 192, 192, dtype=torch.uint8)
    old = draw_bounding_boxes(black, BOX * 2, ["6 0.93"], colors="red", label_colors="white")
    assert 0 < text_rows(old) < READABLE_PX


def test_segmentation_grid_titles_rows_and_shows_a_legend_of_the_classes_shown() -> None:
    palette = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44)]
    names = ["background", "one", "two", "three"]
    truth = torch.zeros(2, 48, 48, dtype=torch.int64)
    truth[:, 10:20, 10:20] = 1
    pred = truth.clone()
    pred[0, 30:40, 30:40] = 3
    pred[1, 0:5, 0:5] = 255  # ignored: not a class
    legend = class_legend([truth, pred], names, palette)
    assert legend == [("one", palette[1]), ("three", palette[3])]
    overlays = torch.zeros(2, 3, 48, 48, dtype=torch.uint8)
    grid = segmentation_grid({"ground truth": overlays, "prediction": overlays}, legend, side=96)
    tiles = 2 * (96 + 4)  # two rows of one padded grid each
    bands = grid.shape[1] - tiles
    assert bands % 3 == 0 and bands // 3 >= READABLE_PX + 4  # two titles and the legend
    legend_band = grid[:, -(bands // 3) :]
    assert text_rows(legend_band) >= READABLE_PX
    colours = {tuple(c) for c in legend_band.flatten(1).T.tolist()}
    assert {palette[1], palette[3]} <= colours and palette[2] not in colours
    assert text_rows(grid[:, : bands // 3]) >= READABLE_PX  # "ground truth"


def test_classification_captions_are_readable() -> None:
    grid = labelled_grid(torch.zeros(2, 1, 28, 28), ["3", "3 (truth 5)"], [True, False])
    assert text_rows(grid) >= READABLE_PX
