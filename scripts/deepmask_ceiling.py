"""The mask AR that DeepMask's own training targets reach on the digit scenes, pasted back as
inference pastes them: the ceiling of a mask branch that learns its targets perfectly, set by
the window grid, the scales and the mask resolution. A net that refines each mask from the
window's pixels (the digits config's SharpMask-style refinement) is not bound by it: its masks
need not be the targets' cell averages, and it scored above this ceiling (0.919 vs 0.879).

    python scripts/deepmask_ceiling.py                        # the config's settings
    python scripts/deepmask_ceiling.py --mask-size 16         # what a 16 x 16 mask branch allows
    python scripts/deepmask_ceiling.py --scales 0.5 0.59 0.71 0.84 1

Every window of dense inference (each scale, every `stride` px of the resized scene, as
`multiscale_proposals` lays them out) predicts, for each digit that is a positive of that window
by the training rule (centred within pos_offset px, scale within 2**+-pos_scale), exactly its
training target: the digit's mask averaged over the m x m output cells. Those masks are pasted
back as inference pastes them (bilinear, threshold 0.5); each digit's best mask IoU gives the
average recall over IoU 0.5:0.95 (the AR that test/ar_1000 would be with a perfect score branch).
`--any-window` lets every window of the grid predict (off-centre and off-scale ones too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from datamodules.deepmask import DeepMaskDataModule, window_labels  # noqa: E402
from lit_modules.deepmask import average_recall, mask_iou  # noqa: E402
from lit_modules.nets.deepmask import paste_masks, window_grid  # noqa: E402

RULE = ("patch_size", "canonical_size", "pos_offset", "neg_offset", "pos_scale", "neg_scale")
CONFIG = Path(__file__).resolve().parents[1] / "configs/deepmask/digits_deepmask.yaml"


def ceiling(
    dm: DeepMaskDataModule, scales: list[float], stride: int, any_window: bool
) -> dict[str, float]:
    hp = dm.hparams
    rule = {k: hp[k] for k in RULE}  # window_labels' keywords, the data's values
    best = []
    for image, target in dm.scenes("test"):
        size = tuple(image.shape[-2:])
        windows = torch.cat([  # every window of dense inference (multiscale_proposals' grid)
            window_grid(round(size[0] * s) // stride + 1, round(size[1] * s) // stride + 1,
                        stride=stride, patch_size=hp.patch_size, scale=s)
            for s in scales
        ])  # fmt: skip
        centred = torch.cat(
            [(windows[:, :2] + windows[:, 2:]) / 2, windows[:, 2:3] - windows[:, :1]], 1
        )
        labels = torch.stack(  # (W, N): the training rule, window by window
            [window_labels(tuple(w), target["boxes"].float(), **rule) for w in centred.tolist()]
        )
        for k, gt in enumerate(target["masks"]):
            ok = torch.ones(len(windows), dtype=torch.bool) if any_window else labels[:, k] == 1
            if not ok.any():
                best.append(0.0)
                continue
            rois = torch.cat([torch.zeros(int(ok.sum()), 1), windows[ok]], 1)
            cells = roi_align(gt[None, None].float(), rois, hp.mask_size, sampling_ratio=4,
                              aligned=True)  # fmt: skip
            logits = torch.logit(cells[:, 0].clamp(1e-4, 1 - 1e-4))  # the training targets
            pasted = paste_masks(logits, windows[ok], size, 0.0)
            best.append(float(mask_iou(pasted, gt[None])[:, 0].max()))
    b = torch.tensor(best, dtype=torch.float64)
    return {"ar": float(average_recall(b)), "mean_best_iou": float(b.mean()), "objects": len(b)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="a DeepMask config")
    parser.add_argument("--scales", type=float, nargs="+", help="default: the config's")
    parser.add_argument("--stride", type=int, default=4, help="the trunk's stride (digits: 4)")
    parser.add_argument("--mask-size", type=int, help="default: the config's mask_size")
    parser.add_argument("--any-window", action="store_true", help="not only the positives")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    data = dict(cfg["data"]["init_args"])
    if args.mask_size:
        data["mask_size"] = args.mask_size
    dm = DeepMaskDataModule(**data)
    scales = args.scales or cfg["model"]["init_args"]["scales"]
    result = ceiling(dm, list(scales), args.stride, args.any_window)
    print(
        f"mask AR ceiling {result['ar']:.3f} (mean best mask IoU {result['mean_best_iou']:.3f}, "
        f"{result['objects']} test digits): scales {scales}, stride {args.stride}, mask "
        f"{data['mask_size']}x{data['mask_size']}, "
        f"{'every window' if args.any_window else 'positive windows only'}"
    )


if __name__ == "__main__":
    main()
