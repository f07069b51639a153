"""A frozen CNN as a generic feature extractor, taken literally: features to .npz, then sklearn.

    python scripts/extract_features.py --weights runs/weights/digits_source.pt \\
        --backbone digits_cnn --data digits --classes 5 6 7 8 9 --labels-per-class 10 \\
        --out runs/features/digits_5-9.npz
    python scripts/extract_features.py --backbone resnet18 --weights DEFAULT --data digits \\
        --image-size 64 --channels 3 --normalize imagenet --classes 5 6 7 8 9
    python scripts/extract_features.py --backbone resnet50 --weights DEFAULT \\
        --data imagefolder --root DIR

DeCAF / Razavian et al.'s recipe outside any training loop: the backbone (eval mode, no
gradients) maps every image of the train (with the label budget), val and test splits to a
feature vector; a linear SVM and/or logistic regression (on standardized features) is fitted on
the train features only, C picked on val, accuracy reported on val and test (the fit and the
choice are lit_modules/linear_probe.py's, which TransferClassifier's linear_probe mode uses too). The .npz keeps the
features, so other classifiers can be tried without touching the network again.
Writes <out> (.npz: train_x/train_y/val_x/val_y/test_x/test_y + meta) and <out>.json (accuracies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402

from datamodules.classification import ClassificationDataModule  # noqa: E402
from datamodules.digits import DigitsDataModule, budget_indices  # noqa: E402
from lit_modules.callbacks import keep_previous  # noqa: E402
from lit_modules.linear_probe import fit_and_score  # noqa: E402  (shared with linear_probe mode)
from lit_modules.nets.transfer_net import TransferNet, build_transfer_net  # noqa: E402

DATASETS = ("digits", "cifar10", "cifar100", "pets", "flowers102", "imagefolder")
SPLITS = ("train", "val", "test")
CLASSIFIERS = {"svm": ("svm",), "logreg": ("logreg",), "both": ("svm", "logreg")}


# ----------------------------------------------------------------------------- data


def digits_splits(args: argparse.Namespace) -> tuple[dict[str, Dataset], list[str]]:
    """The DigitsDataModule's three splits (its own class remap and label budget)."""
    dm = DigitsDataModule(
        classes=args.classes,
        labels_per_class=args.labels_per_class,
        image_size=args.image_size or 28,
        channels=args.channels or 1,
        normalize=args.normalize or "digits",
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
    )
    dm.setup()
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    return {s: loader.dataset for s, loader in zip(SPLITS, loaders, strict=True)}, dm.class_names


def split_labels(ds: Dataset) -> np.ndarray:
    """Labels of a ClassificationDataModule split, from its base data set's targets if it has them
    (no image decoded); otherwise by loading every sample."""
    base, indices = getattr(ds, "base", None), getattr(ds, "indices", None)
    for name in ("targets", "_labels"):
        targets = getattr(base, name, None)
        if targets is not None and indices is not None:
            return np.asarray([int(targets[i]) for i in indices])
    return np.asarray([int(ds[i][1]) for i in range(len(ds))])


def select(ds: Dataset, classes: list[int] | None, per_class: int | None, seed: int) -> Dataset:
    """The samples of `classes` (all if None), at most `per_class` of each (all if None)."""
    if classes is None and per_class is None:
        return ds
    labels = split_labels(ds)
    keep = np.flatnonzero(np.isin(labels, classes)) if classes is not None else np.arange(len(ds))
    keep = keep[budget_indices(labels[keep], per_class, seed)]
    return Subset(ds, keep.tolist())


def classification_splits(args: argparse.Namespace) -> tuple[dict[str, Dataset], list[str]]:
    """A torchvision data set's splits with eval transforms (augment=False) on every split."""
    if args.channels is not None or args.normalize is not None:
        msg = "--channels and --normalize apply to --data digits only (real data: RGB, ImageNet)"
        raise ValueError(msg)
    dm = ClassificationDataModule(
        dataset=args.data,
        root=args.root,
        image_size=args.image_size or 224,
        num_workers=args.num_workers,
        augment=False,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
    )
    dm.setup()
    names = list(dm.class_names) or [str(i) for i in range(dm.num_classes)]
    if args.classes and not set(args.classes) <= set(range(len(names))):
        raise ValueError(f"--classes must be ids in 0..{len(names) - 1}, got {args.classes}")
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    splits = {}
    for s, loader in zip(SPLITS, loaders, strict=True):
        budget = args.labels_per_class if s == "train" else None
        splits[s] = select(loader.dataset, args.classes, budget, args.seed)
    return splits, [names[c] for c in args.classes] if args.classes else names


# ----------------------------------------------------------------------------- features


def check_channels(net: TransferNet, x: torch.Tensor, backbone: str) -> None:
    """A clear message instead of a conv shape error deep inside the backbone."""
    conv = next((m for m in net.stages[0].modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and x.shape[1] != conv.in_channels:
        want, got = conv.in_channels, x.shape[1]
        hint = f"for digits pass --channels {want}"
        raise ValueError(f"backbone {backbone} expects {want}-channel images, got {got} ({hint})")


@torch.no_grad()
def extract(
    net: TransferNet, ds: Dataset, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 features and (N,) int64 labels of `ds`, in dataset order."""
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    feats, labels = [], []
    for i, (x, y) in enumerate(loader):
        if i == 0:
            check_channels(net, x, args.backbone)
        feats.append(net.forward_features(x).flatten(1).float().numpy())  # (B, D)
        labels.append(torch.as_tensor(y).numpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64)


def remap(y: np.ndarray, classes: list[int] | None) -> np.ndarray:
    """Original class ids -> 0..K-1 in the order of `classes` (as DigitsDataModule does)."""
    if classes is None:
        return y
    lookup = np.full(max(classes) + 1, -1, np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup[y]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter  # keep the docstring's examples as written
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    add = parser.add_argument
    add("--backbone", default="digits_cnn", help="digits_cnn (default) or a torchvision name")
    add("--weights", help="file, torchvision weights name (DEFAULT, ...), or none (default)")
    add("--data", default="digits", choices=DATASETS, help="data set (default: digits)")
    add("--root", default="data", help="data folder, all but digits (default: data)")
    add("--classes", type=int, nargs="+", help="class ids kept, relabelled 0..K-1 in this order")
    add("--feature-stages", type=int, help="bottom stages used (Yosinski's n; default: all)")
    add("--labels-per-class", type=int, help="train label budget per class (default: all)")
    add("--image-size", type=int, help="input size (default: 28 for digits, else 224)")
    add("--channels", type=int, choices=(1, 3), help="digits only (default: 1; 3 for torchvision)")
    add("--normalize", choices=("digits", "imagenet"), help="digits only (default: digits)")
    add("--max-eval-samples", type=int, help="cap on val and test images (default: none)")
    add("--classifier", choices=tuple(CLASSIFIERS), default="both", help="(default: both)")
    add("--grid", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="C values tried")
    add("--batch-size", type=int, default=256, help="extraction batch size (default: 256)")
    add("--num-workers", type=int, default=0, help="data loader workers (default: 0)")
    add("--seed", type=int, default=0, help="splits, label budget, random weights (default: 0)")
    add("--out", type=Path, default=Path("runs/features/features.npz"), help="output .npz")
    args = parser.parse_args(argv)
    if args.weights is not None and args.weights.lower() in ("none", "null"):
        args.weights = None
    return args


def extract_splits(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], list[str]]:
    """Features and labels of every split (`train_x`, `train_y`, ...) and the class names."""
    splits, names = digits_splits(args) if args.data == "digits" else classification_splits(args)
    torch.manual_seed(args.seed)  # a random-weights backbone is the same net on every run
    cut = {} if args.feature_stages is None else {"feature_stages": args.feature_stages}
    net = build_transfer_net(
        backbone=args.backbone, num_classes=len(names), weights=args.weights, **cut
    )
    net.eval()  # BatchNorm running statistics, no dropout
    print(f"backbone {args.backbone} (weights: {args.weights}), classes: {' '.join(names)}")
    data: dict[str, np.ndarray] = {}
    for split, ds in splits.items():
        t = time.perf_counter()
        x, y = extract(net, ds, args)
        data[f"{split}_x"] = x  # (N, D) float32
        data[f"{split}_y"] = y if args.data == "digits" else remap(y, args.classes)  # (N,) int64
        print(f"{split}: {len(y)} images -> features {x.shape} in {time.perf_counter() - t:.1f} s")
    return data, names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Extract, save, classify; returns what <out>.json holds."""
    t0 = time.perf_counter()
    data, names = extract_splits(args)
    meta = {"backbone": args.backbone, "weights": args.weights, "data": args.data}
    meta |= {"feature_stages": args.feature_stages}
    meta |= {"classes": names, "labels_per_class": args.labels_per_class}
    meta |= {"feature_dim": int(data["train_x"].shape[1])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keep_previous(args.out)  # an earlier extraction is kept, never replaced
    np.savez(args.out, **data, meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out}")
    results: dict[str, Any] = {}
    for kind in CLASSIFIERS[args.classifier]:
        t = time.perf_counter()
        scores = fit_and_score(kind, data, args.grid, args.seed)
        results.update(scores)
        val, test = scores[f"val/acc_{kind}"], scores[f"test/acc_{kind}"]
        took = time.perf_counter() - t
        c = scores[f"c_{kind}"]
        print(f"{kind}: C={c:g} val/acc {val:.4f} test/acc {test:.4f} ({took:.1f} s)")
    results["meta"] = meta
    json_path = args.out.with_suffix(".json")
    keep_previous(json_path)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path} ({time.perf_counter() - t0:.1f} s in all)")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError, RuntimeError) as err:  # missing files, bad weights, wrong input
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
