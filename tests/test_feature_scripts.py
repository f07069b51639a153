"""scripts/extract_features.py end to end, and a smoke run of scripts/benchmark.py's measurements."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from PIL import Image

from scripts import benchmark, extract_features
from scripts.bench_modules import (
    ROOT,
    Batches,
    build_data,
    build_module,
    make_trainer,
    plain_loop,
    take_batches,
)

CHANCE_5 = 0.2
# Random conv features + a linear classifier reach ~0.8 on digits 5-9 with 10 labels per class
# (0.81-0.84 measured over four seeds); 0.5 is far above chance and far below that.
MIN_ACC = 0.5


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("features") / "digits_5-9.npz"
    argv = ["--backbone", "digits_cnn", "--data", "digits", "--classes", "5", "6", "7", "8", "9"]
    results = extract_features.main([*argv, "--labels-per-class", "10", "--out", str(out)])
    return results, out


def test_npz_holds_features_and_labels_of_every_split(digits_run: tuple[dict, Path]) -> None:
    _, out = digits_run
    data = np.load(out)
    sizes = {"train": 50, "val": 50, "test": 250}  # the 10-label budget covers val too
    for split, n in sizes.items():
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        assert x.dtype == np.float32 and x.shape == (n, 256)  # digits_cnn's pre-logits features
        assert y.dtype == np.int64 and y.shape == (n,)
        assert np.isfinite(x).all()
        assert sorted(np.unique(y).tolist()) == [0, 1, 2, 3, 4]  # digits 5-9 relabelled 0-4
    assert np.bincount(data["train_y"]).tolist() == [10] * 5
    meta = json.loads(str(data["meta"]))
    assert meta["backbone"] == "digits_cnn" and meta["weights"] is None
    assert meta["classes"] == ["5", "6", "7", "8", "9"]


def test_linear_classifiers_beat_chance(
    digits_run: tuple[dict, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = digits_run
    written = json.loads(out.with_suffix(".json").read_text())
    for kind in ("svm", "logreg"):
        for split in ("val", "test"):
            acc = written[f"{split}/acc_{kind}"]
            assert isinstance(acc, float) and 0.0 <= acc <= 1.0
            assert acc == results[f"{split}/acc_{kind}"]
        assert written[f"test/acc_{kind}"] > max(MIN_ACC, CHANCE_5)
        assert written[f"c_{kind}"] in (0.01, 0.1, 1.0, 10.0)


def test_missing_weights_file_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_weights.pt"
    argv = ["--weights", str(missing), "--classes", "5", "6", "--out", str(tmp_path / "f.npz")]
    with pytest.raises(SystemExit) as exc:
        extract_features.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error:") and str(missing) in message and "\n" not in message
    assert not (tmp_path / "f.npz").exists()


def test_wrong_channel_count_names_the_fix(tmp_path: Path) -> None:
    argv = ["--channels", "3", "--classes", "5", "6", "--out", str(tmp_path / "f.npz")]
    with pytest.raises(SystemExit, match="--channels 1"):
        extract_features.main(argv)


def _write_imagefolder(root: Path) -> None:
    """root/{train,val}/c{0,1,2}/*.png: constant images, one colour per class."""
    colours = {"c0": (200, 30, 30), "c1": (30, 200, 30), "c2": (30, 30, 200)}
    for split, n in (("train", 4), ("val", 2)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.full((12, 12, 3), rgb, np.uint8) + np.uint8(i)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_with_class_subset_and_label_budget(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "data")
    out = tmp_path / "f.npz"
    argv = ["--backbone", "resnet18", "--data", "imagefolder", "--root", str(tmp_path / "data")]
    argv += ["--image-size", "32", "--classes", "2", "0", "--labels-per-class", "3"]
    results = extract_features.main([*argv, "--classifier", "logreg", "--out", str(out)])
    data = np.load(out)
    assert data["train_x"].shape == (6, 512) and np.bincount(data["train_y"]).tolist() == [3, 3]
    assert data["val_x"].shape == (4, 512) and data["test_x"].shape == (4, 512)  # test/ = val/
    assert results["meta"]["classes"] == ["c2", "c0"]
    assert "test/acc_logreg" in results and "test/acc_svm" not in results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One `benchmark.py --quick` run of every figure of every module (~25-30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("benchmark")
    return benchmark.main(["--quick", "--out", str(out)]), out


@pytest.fixture(scope="module")
def overhead(quick_run: tuple[dict, Path]) -> dict:
    return quick_run[0]["classifier_epoch"]["trainer_vs_plain"]


@pytest.fixture(scope="module")
def bf16(quick_run: tuple[dict, Path]) -> dict:
    return quick_run[0]["classifier_epoch"]["bf16_vs_fp32"]


@pytest.fixture(scope="module")
def dense(quick_run: tuple[dict, Path]) -> dict:
    return quick_run[0]["dense_vs_sliding"]


FIGURE_KEYS = ("ratio", "repeats", "threads", "load_before", "load_after")
TIMES = {
    "trainer_vs_plain": (
        "plain_s",
        "lightning_s",
        "plain_loop_s",
        "lightning_loop_s",
        "plain_cpu_s",
    ),
    "bf16_vs_fp32": ("fp32_step_s", "bf16_step_s", "fp32_step_cpu_s", "bf16_step_cpu_s"),
    "pipeline": ("loader_batch_s", "train_step_s", "fed_step_s"),
    "flops": ("achieved_flops", "peak_flops", "bf16_achieved_flops", "bf16_peak_flops"),
}


@pytest.mark.parametrize("module", list(benchmark.SPECS))
def test_benchmark_module_figures_smoke(quick_run: tuple[dict, Path], module: str) -> None:
    figures = quick_run[0]["modules"][module]
    for name, times in TIMES.items():
        figure = figures[name]
        assert all(k in figure for k in FIGURE_KEYS), (name, figure)
        assert all(figure[t] > 0 for t in times), (name, figure)
        assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0
        assert figure["threads"] == 1 and figure["repeats"] == 1
    for name, key in (("trainer_vs_plain", "ratio_loop"), ("trainer_vs_plain", "ratio_cpu")):
        assert math.isfinite(figures[name][key]) and figures[name][key] > 0
    paired = figures["trainer_vs_plain_per_step"]  # step by step in one fit (--quick: 3 steps)
    assert all(k in paired for k in FIGURE_KEYS) and paired["pairs"] == 2
    assert paired["plain_step_s"] > 0 and paired["lightning_step_s"] > 0
    assert paired["ratio_q1"] <= paired["ratio"] <= paired["ratio_q3"]
    assert math.isfinite(figures["bf16_vs_fp32"]["ratio_cpu"])
    assert 0.0 <= figures["pipeline"]["wait_share"] < 1.0
    assert figures["flops"]["flops_per_step"] > 0 and figures["flops"]["ratio"] < 1.5
    layout = figures["channels_last"]  # measured where the config trains channels_last
    config = yaml.safe_load((ROOT / benchmark.SPECS[module].config).read_text())
    if not config["model"]["init_args"].get("channels_last"):
        assert layout is None
        return
    assert all(k in layout for k in FIGURE_KEYS) and layout["repeats"] == 1
    assert layout["nchw_step_s"] > 0 and layout["nhwc_step_s"] > 0
    assert math.isfinite(layout["ratio"]) and layout["ratio"] > 0
    assert f"| {module} | {layout['precision']} |" in (quick_run[1] / "BENCHMARK.md").read_text()


@pytest.mark.parametrize("module", ["deepmask", "fast_rcnn", "gan"])
def test_benchmark_plain_step_does_the_training_steps_work(module: str) -> None:
    """The plain loop is the module's training_step minus the Trainer: from the same seed and
    batches (dropout, RoI sampling, GAN noise), Lightning's fit ends on the same weights (the
    GAN's averaged G too) (< 1 s each)."""
    benchmark.quiet()
    batches = take_batches(build_data(module, 2), 2)
    plain, fitted, start = (build_module(module, 0) for _ in range(3))
    seed_everything(0, verbose=False)
    plain_loop(module, plain, batches)
    trainer = make_trainer(None, max_epochs=1)
    seed_everything(0, verbose=False)
    trainer.fit(fitted, train_dataloaders=Batches(batches))
    # no step skipped (no RoIs, non-finite loss); a GAN's global_step counts G's and D's steps
    assert trainer.global_step == 2 * len(trainer.optimizers)
    pairs = list(zip(plain.parameters(), fitted.parameters(), start.parameters(), strict=True))
    assert all(torch.equal(p, f) for p, f, _ in pairs)
    assert any(not torch.equal(p, s) for p, _, s in pairs)  # and training moved them


def test_benchmark_roi_align_figure(quick_run: tuple[dict, Path]) -> None:
    figure = quick_run[0]["roi_align"]
    for s in (1, 2):
        r = figure[f"sampling_ratio_{s}"]
        assert r["torchvision_s"] > 0 and r["embedding_bag_s"] > 0
        assert r["speedup"] == pytest.approx(r["torchvision_s"] / r["embedding_bag_s"])
    assert "RoIAlign forward + backward" in (quick_run[1] / "BENCHMARK.md").read_text()


def test_benchmark_fcn_forward_figure(quick_run: tuple[dict, Path]) -> None:
    f = quick_run[0]["fcn_forward"]  # moved from the segmentation demo (--quick: 64 px)
    assert f["size"] == 64 and f["repeats"] == 1
    nets = [v for v in f.values() if isinstance(v, dict) and "images_per_s" in v]
    assert len(nets) == 3 and all(v["images_per_s"] > 0 for v in nets)
    assert "FCN forward on the CPU" in (quick_run[1] / "BENCHMARK.md").read_text()


def test_benchmark_map_backends_agree(quick_run: tuple[dict, Path]) -> None:
    m = quick_run[0]["modules"]["detection"]["map_backends"]
    assert m["pycocotools_s"] > 0 and m["faster_coco_eval_s"] > 0 and math.isfinite(m["ratio"])
    scores = m["scores"]
    assert 0.0 < scores["pycocotools"]["map"] < 1.0  # neither trivial nor perfect
    for key, value in scores["pycocotools"].items():
        assert scores["faster_coco_eval"][key] == pytest.approx(value, abs=1e-6), key
    assert m["max_abs_diff"] <= 1e-6


def test_benchmark_overhead_smoke(overhead: dict) -> None:
    for key in ("plain_s", "lightning_s", "lightning_fit_s", "lightning_epoch_s", "plain_cpu_s"):
        assert overhead[key] > 0
    assert math.isfinite(overhead["ratio"]) and math.isfinite(overhead["ratio_epoch"])
    assert overhead["batches"] == 2 and len(overhead["plain_all_s"]) == 1


def test_benchmark_bf16_smoke(bf16: dict) -> None:
    for precision in ("fp32", "bf16"):
        assert bf16[precision]["epoch_s"] > 0
        assert 0.0 <= bf16[precision]["test_acc"] <= 1.0
    assert math.isfinite(bf16["speed_ratio"]) and abs(bf16["acc_diff"]) <= 1.0


def test_benchmark_dense_equals_sliding_without_padding(dense: dict) -> None:
    assert dense["unpadded_digits_cnn"]["max_abs_diff"] <= 1e-4  # the 1e-4
    assert dense["digits_cnn"]["max_abs_diff"] > 1e-4  # padded: differs near crop borders
    nets = [dense["digits_cnn"], dense["unpadded_digits_cnn"]]
    assert all(r["windows"] == 50 * 50 and r["speedup"] > 0 for r in nets)
    assert dense["threads"] == 1 and dense["load_before"] >= 0


def test_benchmark_writes_bench_json_and_every_table(quick_run: tuple[dict, Path]) -> None:
    result, out = quick_run
    written = json.loads((out / "bench.json").read_text())
    assert not (out / "benchmark.json").exists()
    env = written["env"]
    for key in ("torch", "lightning", "threads", "cpus", "load_before", "load_after", "wall_s"):
        assert key in env
    assert env["quick"] is True and sorted(written["modules"]) == sorted(benchmark.SPECS)
    assert written["matmul_peak"]["fp32_flops"] > 0 and written["matmul_peak"]["bf16_flops"] > 0
    text = (out / "BENCHMARK.md").read_text()
    assert text == "# cnnlab benchmark\n\n" + benchmark.markdown(result)
    for title in (
        "Trainer vs plain",
        "Data pipeline",
        "Achieved FLOP",
        "bf16-mixed vs",
        "channels_last (NHWC) vs NCHW",
        "COCO mAP",
    ):
        assert f"## {title}" in text, title
    for module in benchmark.SPECS:  # one row in each per-module table (layout: NHWC configs)
        layout = result["modules"][module]["channels_last"] is not None
        assert text.count(f"| {module} |") == 4 + layout
    assert "| plain PyTorch loop |" in text and "| bf16-mixed |" in text
    assert "| unpadded_digits_cnn |" in text and "| faster_coco_eval |" in text


def test_benchmark_modules_subset_and_bad_args(tmp_path: Path) -> None:
    args = benchmark.parse_args(["--modules", "gan", "detection", "--quick"])
    assert args.modules == ["gan", "detection"] and args.steps == 1 and args.repeats == 1
    args = benchmark.parse_args(["--modules", "deepmask", "fast_rcnn"])
    assert args.modules == ["deepmask", "fast_rcnn"] and args.steps is None
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--modules", "rcnn"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--repeats", "0"])
