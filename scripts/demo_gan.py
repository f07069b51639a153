"""Demo topic `gan`: DCGAN vs the 2014 MLP GAN on the embedded digits, and D-feature transfer.

    python -c "from pathlib import Path; from scripts.demo_gan import demo; print(demo(Path('runs/demo')))"

1. The digits classifier that measures sample quality (configs/gan/digits_classifier.yaml),
   trained unless its weights are already in <out>/runs/weights/.
2. configs/gan/digits_dcgan.yaml and configs/gan/digits_gan_mlp.yaml, each for the same fixed
   number of epochs (`EPOCHS`: 125 batches of 32 each, so the same steps on any machine and
   the same numbers on any machine and thread count), validated every `VAL_EVERY` epochs
   (val/fid: 2,000 samples vs the 500 val digits). The checkpoint with the best val/fid is then
   tested once: test/fid on 2,000 fresh samples vs 2,000 train digits, test/fid_floor (2,000
   other train digits vs the same: real vs real), test/digit_confidence, test/class_entropy.
   Their last sample grids are copied into `out`.
3. DCGAN §5.1: scripts/gan_features_svm.py on the D of that same checkpoint (10 labels per
   class) against a random D and raw pixels: FID and SVM describe one GAN.
`demo(out)` returns the numbers, `report(result)` the markdown section of REPORT.md.
"""

from __future__ import annotations

import csv
import inspect
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
import yaml  # noqa: E402

from scripts.demo import (  # noqa: E402
    CONFIGS,
    config_class,
    fit_args,
    free_cores,
    in_processes,
    run_config,
    torch_threads,
)
from scripts.gan_features_svm import run_svm  # noqa: E402
from scripts.train import main as cli_main  # noqa: E402

EPOCHS = 12  # per GAN, 125 steps each (1,500 steps): the budget of the GAN topic (~120 s)
# epochs between validations (the best checkpoint is chosen among these); each costs ~2.5 s of
# sampling and scoring 2,000 samples in float32
VAL_EVERY = 6
# Fixed, not the machine's: oneDNN's conv weight gradients sum per-thread partial sums, so the
# GAN numbers change in the last bits with the thread count (tests/test_protocol.py). One thread
# is also the fastest on 2 shared cores.
THREADS = 1
GANS = {"DCGAN": "gan/digits_dcgan.yaml", "2014 MLP GAN": "gan/digits_gan_mlp.yaml"}
GAN_OVERRIDES = [
    f"--trainer.max_epochs={EPOCHS}",
    f"--trainer.check_val_every_n_epoch={VAL_EVERY}",
    "--trainer.num_sanity_val_steps=0",
]
METRICS = ("fid", "fid_floor", "digit_confidence", "class_entropy")
SVM_SEEDS = (0, 1, 2)  # label draws
SVM_BUDGETS = (10,)  # 100 labels/class: add it here (about 100 s per seed and feature set)
LN10 = math.log(10)


def classifier_weights(root: Path) -> Path:
    """The digits classifier's weights, trained (configs/gan/digits_classifier.yaml) if missing."""
    path = root / "weights" / "digits_classifier.pt"
    if not path.is_file():
        print("[gan] training the digits classifier that scores the samples")
        # the judge's weights, hence every FID, must not vary with the machine's thread count
        # either (see THREADS)
        with torch_threads(THREADS):
            metrics = run_config(
                "gan/digits_classifier.yaml", "gan_classifier", root, [], test=False
            )
        print(f"[gan] digits classifier val/acc {metrics['val/acc']:.3f}")
    return path


def train_gan(
    config: str, name: str, root: Path, judge: Path, extra: list[str] | None = None
) -> dict[str, Any]:
    """`train.py fit` for a fixed number of epochs, then `test` of the checkpoint chosen on val.

    Returns the test metrics of that checkpoint and its path (`ckpt`): the D-feature SVM reads
    the same file, so the SVM and the FID describe one GAN.
    """
    args = [f"--model.classifier_weights={judge}", *GAN_OVERRIDES, *(extra or [])]
    t0 = time.perf_counter()
    cli = cli_main(fit_args(config, name, root, args))
    fit_seconds = time.perf_counter() - t0
    trainer = cli.trainer
    steps_per_epoch = len(cli.datamodule.train_dataloader())
    best = trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"{config}: no best checkpoint by val/fid (was the judge found?)")
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    run = Path(trainer.log_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    batches = trainer.global_step // len(trainer.optimizers)  # global_step counts G's and D's steps
    chosen = torch.load(best, map_location="cpu", weights_only=True)
    return {
        "config": config,
        "run": str(run),
        "ckpt": best,
        "chosen_epoch": chosen["epoch"] + 1,  # epochs trained when it was saved
        "val/fid of chosen": float(trainer.checkpoint_callback.best_model_score),
        "fit_seconds": round(fit_seconds, 1),
        "batches": batches,
        "epochs": round(batches / steps_per_epoch, 2),
        "seconds_per_epoch": round(fit_seconds / max(batches / steps_per_epoch, 1e-9), 1),
        **{f"test/{m}": metrics.get(f"test/{m}") for m in METRICS},
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
    ax.set_title(f"Same steps ({EPOCHS} epochs each)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_hparams(config: str) -> dict[str, Any]:
    """The model's hyper-parameters as a run of `config` saves them: its class's defaults
    updated by the config's init_args (what the random-D baseline needs before any run)."""
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    cls = config_class(model["class_path"])
    defaults = {
        k: v.default
        for k, v in inspect.signature(cls.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    return defaults | model.get("init_args", {})


def _gan_topic_job(kind: str, *args: Any) -> dict[str, Any]:
    """One job of the GAN topic's process pool: a GAN's training, or the SVM baselines."""
    if kind == "gan":
        return train_gan(*args)
    hp, budgets, seeds = args
    return run_svm(None, budgets, seeds, sets=("random_d", "pixels"), hp=hp)


def train_gans(root: Path, judge: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Both GANs at once, one process each: one thread per GAN keeps its numbers the same on
    any machine, and the processes use the cores that one thread per process leaves free.
    The SVM's baselines (random-D and pixel features: no trained GAN needed) take the first
    core a GAN frees (the MLP GAN finishes first), while DCGAN still trains.

    Returns the GANs' results and the baselines' SVM rows."""
    jobs = [("gan", c, f"gan_{Path(c).stem}", root, judge) for c in GANS.values()]
    jobs.append(("svm", config_hparams(GANS["DCGAN"]), SVM_BUDGETS, SVM_SEEDS))
    *results, baselines = in_processes(_gan_topic_job, jobs, threads=THREADS)
    return dict(zip(GANS, results, strict=True)), baselines


def demo(out: Path) -> dict[str, Any]:
    """Train both GANs for the same steps, test the checkpoints chosen on val, run the SVM."""
    with torch_threads(THREADS):  # the numbers depend on it: fixed (see THREADS)
        root = out / "runs"
        judge = classifier_weights(root)
        print(f"[gan] {', '.join(GANS)}: {EPOCHS} epochs of training each, in parallel")
        gans, baselines = train_gans(root, judge)
        runs = {label: Path(g["run"]) for label, g in gans.items()}
        for label, g in gans.items():
            g["figure"] = f"{runs[label].parent.name}_samples.png"
            shutil.copy(_last_image(runs[label], "val_samples"), out / g["figure"])
            print(
                f"[gan] {label}: {g['epochs']:.1f} epochs, {g['seconds_per_epoch']:.1f} s/epoch, "
                f"chosen epoch {g['chosen_epoch']}: test/fid {g['test/fid']:.1f} (floor "
                f"{g['test/fid_floor']:.1f}), confidence {g['test/digit_confidence']:.3f}, "
                f"class entropy {g['test/class_entropy']:.3f}"
            )
        shutil.copy(_last_image(runs["DCGAN"], "val_interpolation"), out / "gan_interpolation.png")
        plot_fid(runs, out / "gan_fid.png")
        t0 = time.perf_counter()
        # D of the FID's checkpoint; its SVM's CV fits over the cores the GANs have freed
        dcgan = gans["DCGAN"]["ckpt"]
        svm = run_svm(dcgan, SVM_BUDGETS, SVM_SEEDS, free_cores(), sets=("trained_d",))
        if baselines["d"] != svm["d"]:  # the random D must be the trained D's architecture
            raise RuntimeError(f"random D {baselines['d']} differs from {dcgan}'s D {svm['d']}")
        svm["rows"] += baselines["rows"]
        svm["seconds_after_training"] = round(time.perf_counter() - t0, 1)
    return {
        "epochs_per_gan": EPOCHS,
        "threads": THREADS,
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
        ("DCGAN samples: digit_confidence >= 0.90", d["test/digit_confidence"] >= 0.90),
        (
            "DCGAN samples: class_entropy >= 0.95 ln 10 (2.187)",
            d["test/class_entropy"] >= 0.95 * LN10,
        ),
        (
            "DCGAN's test FID below the MLP GAN's after the same steps",
            d["test/fid"] < m["test/fid"],
        ),
        (
            "D-feature SVM beats random-D features and raw pixels at 10 labels/class",
            svm["trained_d"] > max(svm["random_d"], svm["pixels"]),
        ),
    ]


def report(result: dict[str, Any]) -> list[str]:
    """Markdown lines for REPORT.md."""
    epochs = result["epochs_per_gan"]
    lines = [
        "## Generative CNNs: the 2014 GAN vs DCGAN (digits)",
        "",
        f"Both GANs trained for the same {epochs} epochs (125 batches of 32 each: the same steps on",
        "any machine; same data, non-saturating G loss, Adam with beta1 0.5: DCGAN at lr 1.2e-3 in",
        "bf16-mixed, sampling from an average of G's weights, as configs/gan/digits_dcgan.yaml says",
        "why; the MLP GAN at its config's 2e-4 in float32), validated every",
        f"{VAL_EVERY} epochs (val/fid: 2,000 samples vs the 500 val digits). The checkpoint with the",
        "best val/fid is tested once, on a latent stream val never used: test/fid = 2,000 samples vs",
        "2,000 train digits (a seeded half; the 500 test digits are too few for a stable FID), and",
        "the floor = the other 2,000 train digits vs the same 2,000: real against real, the best any",
        "G can score at these sample counts. FID is measured in the 256-d penultimate layer of a",
        "digits classifier (not Inception: not comparable with published FIDs); confidence = its",
        "mean top-class probability on the samples; class entropy of its predictions (ln 10 = 2.303",
        "means all ten digits equally often). The D-feature SVM below reads the same checkpoint.",
        "",
        "| model | epochs | s/epoch | chosen epoch | test/fid | test/fid_floor "
        "| test/digit_confidence | test/class_entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, g in result["gans"].items():
        lines.append(
            f"| {label} | {g['epochs']:.1f} | {g['seconds_per_epoch']:.1f} | {g['chosen_epoch']} "
            f"| {g['test/fid']:.1f} | {g['test/fid_floor']:.2f} | {g['test/digit_confidence']:.3f} "
            f"| {g['test/class_entropy']:.3f} |"
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
