"""Demo topic `gan`: DCGAN vs the 2014 MLP GAN on the embedded digits, and D-feature transfer.

    python -c "from pathlib import Path; from scripts.demo_gan import demo; print(demo(Path('runs/demo')))"

1. The digits classifier that measures sample quality (configs/gan/digits_classifier.yaml),
   trained unless its weights are already in <out>/runs/weights/.
2. configs/gan/digits_dcgan.yaml and configs/gan/digits_gan_mlp.yaml, each for the same wall
   time (`WALL_MINUTES`, Lightning's max_time), then one validation of the final G: val/fid,
   val/digit_confidence, val/class_entropy. Their last sample grids are copied into `out`.
3. DCGAN §5.1: scripts/gan_features_svm.py on the DCGAN's D (10 labels per class)
   against a random D and raw pixels.
`demo(out)` returns the numbers, `report(result)` the markdown section of REPORT.md.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from scripts.demo import fit_args, run_config  # noqa: E402
from scripts.gan_features_svm import run_svm  # noqa: E402
from scripts.train import main as cli_main  # noqa: E402

WALL_MINUTES = 5.0  # per GAN: the budget, at most 5 minutes of CPU training
GANS = {"DCGAN": "gan/digits_dcgan.yaml", "2014 MLP GAN": "gan/digits_gan_mlp.yaml"}
GAN_OVERRIDES = ["--trainer.max_epochs=1000", "--trainer.check_val_every_n_epoch=4"]
SVM_BUDGETS = (10,)  # 100 labels/class: add it here (about 100 s per seed and feature set)
LN10 = math.log(10)


def classifier_weights(root: Path) -> Path:
    """The digits classifier's weights, trained (configs/gan/digits_classifier.yaml) if missing."""
    path = root / "weights" / "digits_classifier.pt"
    if not path.is_file():
        print("[gan] training the digits classifier that scores the samples")
        metrics = run_config("gan/digits_classifier.yaml", "gan_classifier", root, [], test=False)
        print(f"[gan] digits classifier val/acc {metrics['val/acc']:.3f}")
    return path


def train_gan(config: str, name: str, root: Path, judge: Path, minutes: float) -> dict[str, Any]:
    """`train.py fit` for `minutes` of wall time, then `validate` the final weights."""
    wall = time.strftime("%H:%M:%S", time.gmtime(round(minutes * 60)))
    extra = [f"--trainer.max_time=00:{wall}", f"--model.classifier_weights={judge}", *GAN_OVERRIDES]
    args = fit_args(config, name, root, extra)
    t0 = time.perf_counter()
    cli = cli_main(args)
    fit_seconds = time.perf_counter() - t0
    trainer = cli.trainer
    steps_per_epoch = len(cli.datamodule.train_dataloader())
    trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    run = Path(trainer.log_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    batches = trainer.global_step // len(trainer.optimizers)  # global_step counts G's and D's steps
    epochs = batches / steps_per_epoch
    return {
        "config": config,
        "run": str(run),
        "fit_seconds": round(fit_seconds, 1),
        "batches": batches,
        "epochs": round(epochs, 2),
        "seconds_per_epoch": round(fit_seconds / max(epochs, 1e-9), 1),
        "val/fid": metrics.get("val/fid"),
        "val/digit_confidence": metrics.get("val/digit_confidence"),
        "val/class_entropy": metrics.get("val/class_entropy"),
    }


def _last_image(run: Path, key: str) -> Path:
    images = sorted((run / "images").glob(f"{key}_epoch*.png"))
    if not images:
        raise FileNotFoundError(f"no {key} picture in {run / 'images'}")
    return images[-1]


def _fid_curve(run: Path) -> tuple[list[float], list[float]]:
    """(epoch, val/fid) pairs from the run's metrics.csv."""
    xs, ys = [], []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/fid"):
                xs.append(float(row["epoch"]) + 1)
                ys.append(float(row["val/fid"]))
    return xs, ys


def plot_fid(runs: dict[str, Path], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, run in runs.items():
        ax.plot(*_fid_curve(run), marker="o", label=label)
    ax.set(
        xlabel="epoch (4,000 digits)", ylabel="val/fid (digits-classifier features)", yscale="log"
    )
    ax.set_title(f"Same wall time ({WALL_MINUTES:g} min each)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo(out: Path) -> dict[str, Any]:
    """Train both GANs for the same wall time, score them, and run the D-feature SVM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two fighting
    try:
        root = out / "runs"
        judge = classifier_weights(root)
        gans, runs = {}, {}
        for label, config in GANS.items():
            name = f"gan_{Path(config).stem}"
            print(f"[gan] {label}: {WALL_MINUTES:g} min of training ({config})")
            gans[label] = train_gan(config, name, root, judge, WALL_MINUTES)
            runs[label] = Path(gans[label]["run"])
            figure = f"gan_{Path(config).stem}_samples.png"
            shutil.copy(_last_image(runs[label], "val_samples"), out / figure)
            gans[label]["figure"] = figure
            g = gans[label]
            print(
                f"[gan] {label}: {g['epochs']:.1f} epochs, {g['seconds_per_epoch']:.1f} s/epoch, "
                f"fid {g['val/fid']:.1f}, confidence {g['val/digit_confidence']:.3f}, "
                f"class entropy {g['val/class_entropy']:.3f}"
            )
        shutil.copy(_last_image(runs["DCGAN"], "val_interpolation"), out / "gan_interpolation.png")
        plot_fid(runs, out / "gan_fid.png")
        t0 = time.perf_counter()
        ckpt = runs["DCGAN"] / "checkpoints" / "last.ckpt"
        svm = run_svm(ckpt, SVM_BUDGETS, (0, 1, 2))
        svm["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(threads)
    return {
        "wall_minutes_per_gan": WALL_MINUTES,
        "gans": gans,
        "svm": svm,
        "figures": [*(g["figure"] for g in gans.values()), "gan_interpolation.png", "gan_fid.png"],
    }


def _svm_acc(result: dict[str, Any], features: str, budget: int) -> tuple[float, float]:
    row = next(
        r
        for r in result["svm"]["rows"]
        if r["features"] == features and r["labels_per_class"] == budget
    )
    return row["test/svm_acc"], row["std"]


def gan_claims(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's targets, checked against this run's numbers."""
    d, m = result["gans"]["DCGAN"], result["gans"]["2014 MLP GAN"]
    svm = {f: _svm_acc(result, f, 10)[0] for f in ("trained_d", "random_d", "pixels")}
    return [
        ("DCGAN samples: digit_confidence >= 0.90", d["val/digit_confidence"] >= 0.90),
        (
            "DCGAN samples: class_entropy >= 0.95 ln 10 (2.187)",
            d["val/class_entropy"] >= 0.95 * LN10,
        ),
        ("DCGAN's FID below the MLP GAN's after the same wall time", d["val/fid"] < m["val/fid"]),
        (
            "D-feature SVM beats random-D features and raw pixels at 10 labels/class",
            svm["trained_d"] > max(svm["random_d"], svm["pixels"]),
        ),
    ]


def report(result: dict[str, Any]) -> list[str]:
    """Markdown lines for REPORT.md."""
    minutes = result["wall_minutes_per_gan"]
    lines = [
        "## Generative CNNs: the 2014 GAN vs DCGAN (digits)",
        "",
        f"Both GANs trained for the same wall time ({minutes:g} min each, one CPU thread, same data,",
        "Adam 2e-4 / beta1 0.5, non-saturating G loss), then validated once: 500 samples against",
        "the 500 real val digits. FID is measured in the 256-d penultimate layer of a digits",
        "classifier (not Inception: not comparable with published FIDs); confidence = its mean",
        "top-class probability on the samples; class entropy of its predictions (ln 10 = 2.303",
        "means all ten digits equally often).",
        "",
        "| model | epochs | s/epoch | val/fid | val/digit_confidence | val/class_entropy |",
        "|---|---|---|---|---|---|",
    ]
    for label, g in result["gans"].items():
        lines.append(
            f"| {label} | {g['epochs']:.1f} | {g['seconds_per_epoch']:.1f} | {g['val/fid']:.1f} "
            f"| {g['val/digit_confidence']:.3f} | {g['val/class_entropy']:.3f} |"
        )
    lines += [""]
    lines += [f"![{label}]({g['figure']})" for label, g in result["gans"].items()]
    lines += [
        "",
        "DCGAN latent interpolations (each row a straight line between two z):",
        "",
        "![interpolation](gan_interpolation.png) ![fid](gan_fid.png)",
        "",
        "D-feature transfer (DCGAN §5.1): every D layer max-pooled to 4x4 and concatenated, a",
        "linear L2-SVM (C by 5-fold CV on the labelled digits), test accuracy on the 500 test",
        "digits, mean ± std over 3 draws of the labelled digits:",
        "",
        "| features | dim | " + " | ".join(f"test/svm_acc @{b}/class" for b in SVM_BUDGETS) + " |",
        "|---|---|" + "---|" * len(SVM_BUDGETS),
    ]
    names = {"trained_d": "DCGAN's D", "random_d": "random D (same net)", "pixels": "raw pixels"}
    for key, label in names.items():
        dim = next(r["dim"] for r in result["svm"]["rows"] if r["features"] == key)
        cells = " | ".join("{:.3f} ± {:.3f}".format(*_svm_acc(result, key, b)) for b in SVM_BUDGETS)
        lines.append(f"| {label} | {dim} | {cells} |")
    lines += ["", "Targets of the issue, checked on these numbers:", ""]
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in gan_claims(result)]
    return lines
