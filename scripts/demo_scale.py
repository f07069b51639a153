"""Demo topic `scale`: a classifier made fully convolutional, dense class maps, OverFeat boxes.

    python -c "from pathlib import Path; from scripts.demo_scale import demo; print(demo(Path('runs/demo')))"

1. The digits classifier (configs/gan/digits_classifier.yaml; trained unless its weights are in
   <out>/runs/weights/), convolutionalized: class-map peaks on 224 px digit scenes
   (configs/spatial/digits_classmap.yaml: test/peak_precision, test/peak_recall).
2. Dense vs sliding window on one 224 px scene: the convolutionalized net once against the
   classifier on every 28 px crop at the same stride (`lit_modules.spatial.dense_vs_sliding`).
3. OverFeat: a BoxRegressor on the classifier's trunk (configs/localization/
   digits_box_regressor.yaml: test/loc_acc, test/mean_iou), then the same net convolutionalized
   over the detection scenes at 3 scales (configs/localization/digits_overfeat.yaml: test/map_50,
   test/map, test/images_per_s).
`demo(out)` returns the numbers, `report(result)` the markdown section of REPORT.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from datamodules.digits import DIGITS_MEAN, DIGITS_STD, DigitCanvas  # noqa: E402
from lit_modules.nets.backbones import unpadded_digits_cnn  # noqa: E402
from lit_modules.spatial import build_classifier, dense_vs_sliding  # noqa: E402
from scripts.demo import process_pool, run_config, test_only, torch_threads  # noqa: E402
from scripts.demo_gan import classifier_weights  # noqa: E402

FIGURES = {  # report picture <- (run, picture key in its images/)
    "scale_classmap.png": ("scale_classmap", "test_classmaps"),
    "scale_boxes.png": ("scale_box_regressor", "val_boxes"),
    "scale_overfeat.png": ("scale_overfeat", "test_detections"),
}
TARGETS = {  # issue 11
    "dense_speedup": 10.0,
    "dense_equal": 1e-4,
    "test/loc_acc": 0.90,
    "test/map_50": 0.80,
}


def _run_dir(root: Path, name: str) -> Path:
    return max((root / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def dense_figures(judge: Path) -> dict[str, Any]:
    """Dense vs sliding on test scene 0 of a 224 px canvas (the class-map config's scenes).

    Twice: the trained digits classifier (its speed-up; its convs zero-pad, so scores differ
    near crop borders) and its unpadded twin (random weights: equality needs no training), whose
    map equals the crop-by-crop scores to float rounding.
    """
    image = DigitCanvas("test", length=1, size=224, num_digits=(3, 8), digit_size=(24, 32))[0]
    x = (image["image"] - DIGITS_MEAN) / DIGITS_STD  # (1, 224, 224), as the classifier was trained
    torch.manual_seed(0)
    nets = {
        "trained": build_classifier(backbone="digits_cnn", weights=str(judge)),
        "unpadded": unpadded_digits_cnn(),
    }
    keep = (int, float, str, list)
    return {
        name: {k: v for k, v in dense_vs_sliding(net, x, repeats=5).items() if isinstance(v, keep)}
        for name, net in nets.items()
    }


def copy_figures(root: Path, out: Path) -> list[str]:
    """The last picture of each run into the report folder; the names copied."""
    copied = []
    for name, (run, key) in FIGURES.items():
        pictures = sorted((_run_dir(root, run) / "images").glob(f"{key}_*.png"))
        if pictures:
            shutil.copyfile(pictures[-1], out / name)
            copied.append(name)
    return copied


def class_maps(root: Path, judge: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Part 1 and 2: the class-map test run, then dense vs sliding (a worker's job)."""
    classmap = test_only(
        "spatial/digits_classmap.yaml", "scale_classmap", root, [f"--model.weights={judge}"]
    )
    return classmap, dense_figures(judge)


def _ready() -> None:
    """A first job: the worker has imported this module (torch, Lightning) once it returns."""


def demo(out: Path) -> dict[str, Any]:
    root = out / "runs"
    # Two lanes of one thread each. The worker starts (its imports) while the classifier trains
    # on one thread; then it makes the class maps while this process trains the box regressor
    # and runs OverFeat. Sequential, with both threads in one process, took ~7 s longer.
    with process_pool(1) as pool:
        pool.submit(_ready)
        judge = classifier_weights(root)
        t0 = time.perf_counter()
        maps = pool.submit(class_maps, root, judge)
        with torch_threads(1):
            boxes = run_config(
                "localization/digits_box_regressor.yaml",
                "scale_box_regressor",
                root,
                [f"--model.weights={judge}"],
            )
            overfeat = test_only(
                "localization/digits_overfeat.yaml",
                "scale_overfeat",
                root,
                [f"--model.weights={root / 'weights' / 'digits_box_regressor.pt'}"],
            )
        classmap, dense = maps.result()
    print(
        f"[scale] dense vs sliding: {dense['trained']['speedup']:.1f}x, unpadded twin max abs "
        f"diff {dense['unpadded']['max_abs_diff']:.2g}"
    )
    figures = copy_figures(root, out)
    print(
        f"[scale] loc_acc {boxes['test/loc_acc']:.3f}  OverFeat map_50 "
        f"{overfeat['test/map_50']:.3f}  {time.perf_counter() - t0:.0f} s"
    )
    return {
        "classmap": {k: v for k, v in classmap.items() if k.startswith("test/")},
        "dense_vs_sliding": dense,
        "box_regressor": {k: v for k, v in boxes.items() if k.startswith("test/")},
        "overfeat": {k: v for k, v in overfeat.items() if k.startswith("test/")},
        "figures": figures,
    }


def report(result: dict[str, Any]) -> list[str]:
    c, d, u = (
        result["classmap"],
        result["dense_vs_sliding"]["trained"],
        result["dense_vs_sliding"]["unpadded"],
    )
    b, o = result["box_regressor"], result["overfeat"]
    speedup = d["speedup"]
    lines = [
        "## Adapting CNNs to scale: class maps and OverFeat (digits)",
        "",
        "The digits classifier (28 px crops) convolutionalized: one pass over a 224 px scene scores",
        "every 28 px window. Class-map peaks as point detections on 200 test scenes, dense vs",
        "sliding-window crops on one scene, then OverFeat: a box-regression head on the same trunk",
        "(single-digit windows) applied densely at 3 scales over the detection scenes, boxes merged.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| test/peak_precision | {c.get('test/peak_precision', float('nan')):.3f} |",
        f"| test/peak_recall | {c.get('test/peak_recall', float('nan')):.3f} |",
        f"| dense vs sliding speed-up ({d['windows']} windows, {d['threads']} threads) "
        f"| {speedup:.1f}x |",
        f"| dense vs sliding argmax agreement | {d['argmax_agreement']:.3f} |",
        f"| dense vs sliding max abs score difference | {d['max_abs_diff']:.3g} |",
        f"| unpadded twin: speed-up / max abs difference | {u['speedup']:.1f}x / "
        f"{u['max_abs_diff']:.2g} |",
        f"| BoxRegressor test/loc_acc | {b['test/loc_acc']:.3f} |",
        f"| BoxRegressor test/mean_iou | {b['test/mean_iou']:.3f} |",
        f"| OverFeat test/map_50 | {o['test/map_50']:.3f} |",
        f"| OverFeat test/map | {o['test/map']:.3f} |",
        f"| OverFeat test/images_per_s | {o.get('test/images_per_s', float('nan')):.1f} |",
        "",
        "The trained classifier's dense and sliding scores differ where its convs zero-pad: a crop",
        "sees zeros at its edge where the whole image has real pixels. Its unpadded twin (same",
        "shape, valid convs, random weights) gives the crop-by-crop scores exactly.",
        "",
    ]
    captions = {
        "scale_classmap.png": "class maps and their peaks on 224 px scenes",
        "scale_boxes.png": "BoxRegressor: class and box on single-digit windows (truth in green)",
        "scale_overfeat.png": "OverFeat: 3 scales, greedy merge, on the detection scenes",
    }
    lines += [f"![{captions[f]}]({f})" for f in result.get("figures", [])] + [""]
    checks = {
        "dense class map >= 10x faster than sliding crops": speedup >= TARGETS["dense_speedup"],
        "dense = sliding scores to 1e-4 without padding": u["max_abs_diff"]
        <= TARGETS["dense_equal"],
        "test/loc_acc >= 0.90": b["test/loc_acc"] >= TARGETS["test/loc_acc"],
        "OverFeat test/map_50 >= 0.80": o["test/map_50"] >= TARGETS["test/map_50"],
    }
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in checks.items()]
    return lines
