"""Metrics torchmetrics lacks: the FCN paper's four segmentation scores from one confusion matrix.

The confusion matrix itself is a torchmetrics `MulticlassConfusionMatrix(ignore_index=255)`: it
syncs across DDP ranks (a sum), so the scores computed from it are those of the whole data set.
"""

from __future__ import annotations

import torch

FCN_SCORES = ("pixel_acc", "mean_acc", "miou", "fwiou")


def fcn_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel accuracy, mean accuracy, mean IU and frequency-weighted IU (Long et al. §5).

    confusion: (K, K), n_ij = pixels of true class i predicted as class j (torchmetrics' layout:
    rows are targets). With t_i = sum_j n_ij:
        pixel acc = sum_i n_ii / sum_i t_i
        mean acc  = (1/n_cl) sum_i n_ii / t_i
        mean IU   = (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
        f.w. IU   = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
    A class never in the ground truth has no accuracy (0/0) and, if never predicted either, no
    IU: it is left out of the means (n_cl counts the classes that have one), as the authors'
    `score.py` does with `nanmean`. Returns 0-d float64 tensors.
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got {tuple(confusion.shape)}")
    n = confusion.double()
    diag = n.diagonal()  # n_ii
    t = n.sum(1)  # t_i: ground-truth pixels of class i
    predicted = n.sum(0)  # sum_j n_ji: pixels predicted as class i
    total = t.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: no labelled pixel was scored")
    acc = diag / t  # NaN where t_i == 0
    iu = diag / (t + predicted - diag)  # NaN where class i is neither present nor predicted
    return {
        "pixel_acc": diag.sum() / total,
        "mean_acc": acc.nanmean(),
        "miou": iu.nanmean(),
        "fwiou": (t * iu).nansum() / total,  # t_i = 0 wherever iu is NaN
    }
