"""Linear classifiers on frozen features, regularisation chosen on val; a keyed feature cache.

One implementation for `scripts/extract_features.py` (features -> .npz -> scikit-learn) and for
TransferClassifier's `linear_probe` mode (cached features -> the same fit -> its `nn.Linear` head):
for each C of a grid, standardize the train features and fit a linear SVM (`LinearSVC`: squared
hinge, one-vs-rest, C * sum(hinge^2) + 0.5 ||w||^2) or an L2 logistic regression (multinomial,
C * sum(log-loss) + 0.5 ||w||^2); keep the C with the best val accuracy. C means what it means
in scikit-learn -- no optimizer, schedule or decoupled decay between the paper's objective and it.

Frozen features are cached in memory only (a failed run leaves nothing behind), under a key made
of the backbone's weights and the data as the eval transform presents it; they are extracted from
the train split seen through the val split's deterministic transform, never an augmented view.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn
from torch.utils.data import Dataset

KINDS = ("svm", "logreg")
HEAD_KIND = {"svm": "svm", "softmax": "logreg"}  # TransferClassifier's head -> classifier
# Kornblith et al. (2019): 45 log-spaced values of the L2 strength in [1e-6, 1e5]; used here as C.
KORNBLITH_GRID = tuple(float(f"{10 ** (-6 + 0.25 * i):.4g}") for i in range(45))

# ----------------------------------------------------------------------------- classifiers


def make_classifier(kind: str, c: float, seed: int = 0) -> Pipeline:
    """Standardize, then a linear classifier: features of different layers differ in scale."""
    if kind == "svm":
        # dual coordinate descent: the same objective, far faster than the primal Newton solver
        # on the ill-conditioned features of a conv stage (seconds, not minutes, at C >= 0.1)
        svm = LinearSVC(C=c, dual=True, max_iter=20_000, random_state=seed)
        return make_pipeline(StandardScaler(), svm)
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5_000))
    raise ValueError(f"unknown classifier {kind!r}; valid: {', '.join(KINDS)}")


@dataclass
class Selection:
    """The classifier kept: its C, val accuracy, fitted pipeline, and val accuracy per C."""

    c: float
    val_acc: float
    model: Pipeline
    curve: dict[float, float] = field(default_factory=dict)


def select_on_val(
    kind: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    grid: Iterable[float],
    seed: int = 0,
) -> Selection:
    """Fit on train for each C, keep the best on val (ties: the smaller C, the stronger prior)."""
    best: Selection | None = None
    curve: dict[float, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = None
        for c in sorted(float(v) for v in grid):
            if kind == "logreg" and model is not None:
                # Warm start along the path (C ascending): L-BFGS begins at the previous C's
                # solution, not at zero; the minimum it converges to is the same.
                model = model.set_params(
                    logisticregression__C=c, logisticregression__warm_start=True
                )
            else:
                model = make_classifier(kind, c, seed)
            model.fit(*train)
            curve[c] = float(model.score(*val))
            if best is None or curve[c] > best.val_acc:
                best = Selection(c, curve[c], copy.deepcopy(model))  # the path moves `model` on
    if best is None:
        raise ValueError("the regularisation grid is empty")
    best.curve = curve
    return best


def fit_and_score(
    kind: str, data: dict[str, np.ndarray], grid: list[float], seed: int
) -> dict[str, float]:
    """`select_on_val` on train/val, the chosen classifier scored once on test."""
    pick = select_on_val(
        kind, (data["train_x"], data["train_y"]), (data["val_x"], data["val_y"]), grid, seed
    )
    test = float(pick.model.score(data["test_x"], data["test_y"]))
    return {f"val/acc_{kind}": pick.val_acc, f"test/acc_{kind}": test, f"c_{kind}": pick.c}


def linear_weights(model: Pipeline, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, D) weight and (K,) bias of an `nn.Linear` whose argmax (and, for logistic regression,
    softmax) equals the fitted pipeline's; the StandardScaler is folded in."""
    scaler, clf = model[0], model[-1]
    if not np.array_equal(clf.classes_, np.arange(num_classes)):
        raise ValueError(
            f"the train features hold classes {clf.classes_.tolist()}, the head has {num_classes}: "
            "every class needs at least one training example"
        )
    w = clf.coef_ / scaler.scale_  # (K or 1, D): x -> (x - mean) / scale folded into w, b
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:  # binary: one score s for class 1; logits (-s/2, s/2) keep sigmoid(s)
        w, b = np.concatenate([-w, w]) / 2, np.concatenate([-b, b]) / 2
    return torch.as_tensor(w, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)


# ----------------------------------------------------------------------------- feature cache


def eval_view(train: Dataset, val: Dataset) -> Dataset:
    """The train split through the val split's deterministic transform: one clean view per image.

    Knows cnnlab's two split types (digits: `augment`; torchvision data: `transform`); a data set
    with neither attribute is taken as it is.
    """
    for name in ("augment", "transform"):
        if hasattr(train, name) and hasattr(val, name):
            view = copy.copy(train)  # shallow: the images are shared, not copied
            setattr(view, name, getattr(val, name))
            return view
    return train


def _bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(np.asarray(value)).tobytes()


def state_digest(module: nn.Module) -> str:
    """sha256 of every tensor of `module`'s state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def dataset_digest(ds: Dataset) -> str:
    """sha256 of what a split feeds the network: its transform, images / indices and labels."""
    h = hashlib.sha256(f"{type(ds).__module__}.{type(ds).__qualname__}:{len(ds)}".encode())
    for name in ("transform", "augment"):
        if hasattr(ds, name):
            h.update(f"{name}={getattr(ds, name)!r}".encode())  # v2 reprs list every parameter
    for name in ("images", "labels", "indices", "targets"):
        value = getattr(ds, name, None)
        if value is not None:
            h.update(name.encode() + _bytes(value))
    base = getattr(ds, "base", None)
    if base is not None:  # a split of a torchvision data set: which one, from where
        h.update(repr((type(base).__qualname__, str(getattr(base, "root", "")))).encode())
    return h.hexdigest()


def cache_key(stages: nn.Module, pool: int, ds: Dataset) -> str:
    """The weights of the stages that make the features, their pooling, and the data as the
    (eval) transform presents it: new weights or a new transform never hit an old entry."""
    return hashlib.sha256(
        f"{state_digest(stages)}|{pool}|{dataset_digest(ds)}".encode()
    ).hexdigest()


Features = tuple[torch.Tensor, torch.Tensor]  # (N, D) float32, (N,) int64, on CPU


class FeatureCache:
    """In-memory, least-recently-used, at most `size` entries; an entry is stored only once its
    extraction finished, so an interrupted run caches nothing."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[str, Features] = OrderedDict()

    def get(self, key: str, extract: Callable[[], Features]) -> Features:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = extract()
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()


FEATURES = FeatureCache()  # per process: the demo's probes of one backbone share extractions
