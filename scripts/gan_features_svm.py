"""DCGAN §5.1 on the embedded digits: a GAN's discriminator as a feature extractor for a linear SVM.

    python scripts/gan_features_svm.py --ckpt runs/digits_dcgan/version_0/checkpoints/best-039.ckpt
    python scripts/gan_features_svm.py --ckpt ... --labels-per-class 10 100 --seeds 0 1 2 --out svm.json

Pass the checkpoint whose FID you report (the one chosen on val/fid, `best-*.ckpt`): D and G of
one checkpoint, so the SVM and the FID describe the same GAN (scripts/demo_gan.py does).

Every hidden layer of D is max-pooled to 4x4 and the results concatenated (DCGAN's protocol),
then a linear L2-SVM (sklearn LinearSVC, squared hinge) learns from N labelled digits per class
of the train split and is scored on the 500 test digits. The same SVM runs on a randomly
initialised D of the same architecture and on the raw pixels: what D learned without labels
must beat both. C is chosen per feature set by cross-validation on the labelled digits only.
Writes JSON: one row per (features, labels per class) with `test/svm_acc` (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402
from torch import nn  # noqa: E402

from datamodules.digits import budget_indices, load_mnist5k  # noqa: E402
from datamodules.images import digits_images  # noqa: E402
from lit_modules.nets.gan_nets import build_discriminator  # noqa: E402

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# C is chosen by stratified k-fold CV on the labelled digits: every fold needs one digit of each
# class to validate on and one to train on, so k >= 2 folds and as many labels per class.
MIN_LABELS_PER_CLASS = 2
POOL = 4  # every layer max-pooled to 4x4 (DCGAN §5.1)


def _d_kwargs(hp: dict[str, Any]) -> dict[str, Any]:
    """build_discriminator arguments from a DCGANModule's hyper-parameters."""
    return {
        "arch": hp.get("arch", "dcgan"),
        "channels": hp.get("channels", 1),
        "image_size": hp.get("image_size", 32),
        "width": hp.get("d_width", 64),
        "mlp_hidden": tuple(hp.get("mlp_d_hidden", (240, 240))),
        "maxout_pieces": hp.get("maxout_pieces", 5),
        "dropout": hp.get("d_dropout", 0.2),
    }


def load_discriminator(ckpt: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """D of a DCGANModule checkpoint (weights_only load: a checkpoint is data) and its config."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"GAN checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(hp, dict) or not isinstance(state, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no hyper_parameters/state_dict)")
    d_state = {
        k[len("discriminator.") :]: v for k, v in state.items() if k.startswith("discriminator.")
    }
    if not d_state:
        raise ValueError(f"{path} holds no discriminator.* weights: not a DCGANModule checkpoint")
    net = build_discriminator(**_d_kwargs(hp))
    try:
        net.load_state_dict(d_state)
    except RuntimeError as err:
        raise ValueError(f"{path}: discriminator weights do not match its config: {err}") from err
    return net.eval(), hp


@torch.no_grad()
def d_features(net: nn.Module, images: torch.Tensor, batch_size: int = 250) -> np.ndarray:
    """Every hidden layer of D, max-pooled to 4x4 and concatenated: (N, sum_l C_l * 16)."""
    net.eval()
    out = []
    for x in images.split(batch_size):
        layers = net.features(x)  # [(B, C_l, H_l, W_l)] (MLP D: [(B, H_l)])
        pooled = [F.adaptive_max_pool2d(f, POOL).flatten(1) if f.ndim == 4 else f for f in layers]
        out.append(torch.cat(pooled, 1))
    return torch.cat(out).numpy()


def svm_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_jobs: int = 1,
) -> tuple[float, float]:
    """Test accuracy of a linear L2-SVM on standardised features, C by CV; (accuracy, C).

    n_jobs: threads for the CV fits (liblinear releases the GIL; worker processes cost more to
    start than the ~0.1 s fits: 9.7 s vs 4.2 s for 3 draws on 2 cores); the result does not
    depend on it (the dual solver's shuffling is seeded, not drawn from a global RNG)."""
    fewest = int(np.bincount(train_y)[np.unique(train_y)].min())
    if fewest < MIN_LABELS_PER_CLASS:
        raise ValueError(
            f"{fewest} labelled example(s) per class is too few to choose C by cross-validation: "
            f"the minimum label budget is {MIN_LABELS_PER_CLASS} per class"
        )
    folds = min(5, fewest)
    svm = make_pipeline(
        StandardScaler(), LinearSVC(loss="squared_hinge", max_iter=20000, random_state=0)
    )
    search = GridSearchCV(
        svm,
        {"linearsvc__C": list(C_GRID)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=0),
        n_jobs=n_jobs,
    )
    with joblib.parallel_config(backend="threading"):
        search.fit(train_x, train_y)
    return float(search.score(test_x, test_y)), float(search.best_params_["linearsvc__C"])


FEATURE_SETS = ("trained_d", "random_d", "pixels")


def run_svm(
    ckpt: str | Path | None,
    labels_per_class: list[int] | tuple[int, ...] = (10,),
    seeds: tuple[int, ...] = (0, 1, 2),
    n_jobs: int = 1,
    *,
    sets: tuple[str, ...] = FEATURE_SETS,
    hp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SVM accuracies on trained-D, random-D and pixel features (`sets`) for each label budget;
    the cross-validation fits (225 of ~0.1 s at 10 labels/class) in `n_jobs` threads.

    ckpt: the GAN checkpoint (needed for trained_d; its config gives random_d's architecture).
    hp: the DCGANModule's hyper-parameters instead of ckpt's, for random_d and pixels alone:
    the baselines need no trained GAN, so they can run while it trains (scripts/demo_gan.py).
    """
    unknown = set(sets) - set(FEATURE_SETS)
    if unknown:
        raise ValueError(f"unknown feature sets {sorted(unknown)}; valid: {FEATURE_SETS}")
    trained = None
    if ckpt is not None:
        trained, hp = load_discriminator(ckpt)
    if hp is None or ("trained_d" in sets and trained is None):
        raise ValueError(
            "run_svm needs the GAN checkpoint (or its hyper-parameters, without trained_d)"
        )
    size, channels = hp.get("image_size", 32), hp.get("channels", 1)
    split = load_mnist5k()
    images = {s: digits_images(s, size, channels) for s in ("train", "test")}  # (N, C, S, S)
    labels = {s: split[s].labels for s in ("train", "test")}
    features: dict[str, dict[str, np.ndarray]] = {}
    for name in sets:
        if name == "trained_d":
            features[name] = {s: d_features(trained, images[s]) for s in images}
        elif name == "random_d":
            # same architecture, N(0, 0.02) init: the second net drawn after seed 0 (the first
            # is the skeleton the trained weights load into), the same net every run
            torch.manual_seed(0)
            build_discriminator(**_d_kwargs(hp))
            random_d = build_discriminator(**_d_kwargs(hp)).eval()
            features[name] = {s: d_features(random_d, images[s]) for s in images}
        else:
            features[name] = {s: images[s].flatten(1).numpy() for s in images}
    rows = []
    for name, feats in features.items():
        for budget in labels_per_class:
            accs, cs = [], []
            for seed in seeds:
                idx = budget_indices(labels["train"], budget, seed)
                acc, c = svm_accuracy(
                    feats["train"][idx], labels["train"][idx], feats["test"], labels["test"],
                    n_jobs,
                )  # fmt: skip
                accs.append(acc)
                cs.append(c)
            rows.append(
                {
                    "features": name,
                    "labels_per_class": budget,
                    "dim": int(feats["train"].shape[1]),
                    "test/svm_acc": float(np.mean(accs)),
                    "std": float(np.std(accs)),
                    "per_seed": accs,
                    "C": cs,
                }
            )
            print(
                f"[svm] {name:9s} {budget:>3} labels/class  dim {rows[-1]['dim']:>5}  "
                f"test/svm_acc {np.mean(accs):.3f} ± {np.std(accs):.3f}"
            )
    arch = hp.get("arch")
    return {"ckpt": str(ckpt), "arch": arch, "d": _d_kwargs(hp), "seeds": list(seeds), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="a DCGANModule checkpoint")
    parser.add_argument("--labels-per-class", nargs="+", type=int, default=[10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="label draws")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout only)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the SVM's CV fits")
    args = parser.parse_args(argv)
    low = MIN_LABELS_PER_CLASS
    if any(not low <= n <= 400 for n in args.labels_per_class):
        parser.error(
            f"--labels-per-class {' '.join(map(str, args.labels_per_class))}: each budget must be "
            f"in {low}..400 ({low} per class is the minimum for choosing C by {low}-fold "
            "cross-validation; the train split has 400 per class)"
        )
    try:
        result = run_svm(args.ckpt, args.labels_per_class, tuple(args.seeds), args.jobs)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    text = json.dumps(result, indent=2) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"svm: {args.out}")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
