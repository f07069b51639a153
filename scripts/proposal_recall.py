"""Proposal recall against the number of proposals per image, on the embedded digit scenes.

    python scripts/proposal_recall.py --out runs/proposal_recall
    python scripts/proposal_recall.py --out runs/proposal_recall --methods ss_fast ss_quality sliding \\
        --rpn_ckpt runs/detection_digits/version_0/checkpoints/last.ckpt --scenes 50

For each method (selective search fast / quality, sliding windows, and a trained Faster R-CNN's
RPN with --rpn_ckpt) and each k in --counts: the share of digits whose best IoU with one of the
first k proposals of their scene is >= 0.5 and >= 0.7, the average recall over IoU 0.5:0.95
(AR@k), the mean number of proposals per scene and the milliseconds per scene. Writes
<out>/proposal_recall.json and <out>/proposal_recall.png. `recall_curves` and `plot_recall` are
what a demo calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.detection import DIGIT_SCENES  # noqa: E402
from datamodules.digits import DigitCanvas  # noqa: E402
from datamodules.proposals import to_hwc_uint8  # noqa: E402
from lit_modules.nets.proposals import (  # noqa: E402
    average_recall,
    proposal_recall,
    selective_search,
    sliding_windows,
    warm_up,
)

COUNTS = (10, 50, 100, 300, 1000, 2000)
IOUS = (0.5, 0.7)
METHODS = {  # CLI name -> the name in the JSON, the figure and the demo's table
    "ss_fast": "selective search (fast)",
    "ss_quality": "selective search (quality)",
    "sliding": "sliding windows",
}
RPN = "Faster R-CNN RPN"
Propose = Callable[[torch.Tensor], torch.Tensor]  # (3, H, W) float [0, 1] -> (N, 4) xyxy


def digit_scenes(scenes: int, split: str = "test") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The detection topic's scenes (its `digits` source, seed 0): images (3, H, W) float in
    [0, 1] and their digit boxes (G, 4)."""
    settings = {**DIGIT_SCENES}
    canvas = DigitCanvas(split, length=scenes, channels=3, **settings)  # type: ignore[arg-type]
    items = [canvas[i] for i in range(scenes)]
    return [it["image"] for it in items], [it["boxes"] for it in items]


def rpn_proposer(ckpt: Path, top_n: int) -> Propose:
    """A trained Faster R-CNN's RPN, its test-time caps raised to `top_n` boxes per image."""
    from lit_modules.detection import FasterRCNNModule
    from lit_modules.nets.detectors import rpn_proposals

    net = FasterRCNNModule.load_from_checkpoint(ckpt, map_location="cpu").net.eval()

    def propose(image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return rpn_proposals(net, [image], top_n=top_n)[0]

    return propose


def proposers(methods: Sequence[str], rpn_ckpt: Path | None, top_n: int) -> dict[str, Propose]:
    """{display name: image -> boxes} for the CLI names in `methods` (and the RPN if a ckpt)."""
    table: dict[str, Propose] = {
        "ss_fast": lambda img: selective_search(
            to_hwc_uint8(img), mode="fast", max_proposals=top_n
        ),
        "ss_quality": lambda img: selective_search(
            to_hwc_uint8(img), mode="quality", max_proposals=top_n
        ),
        "sliding": lambda img: sliding_windows(img.shape[1], img.shape[2])[:top_n],
    }
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {', '.join(table)}")
    out = {METHODS[m]: table[m] for m in methods}
    if rpn_ckpt is not None:
        out[RPN] = rpn_proposer(rpn_ckpt, top_n)
    return out


def measure(
    propose: Propose,
    images: list[torch.Tensor],
    truth: list[torch.Tensor],
    counts: Sequence[int] = COUNTS,
    iou_thresholds: Sequence[float] = IOUS,
) -> dict[str, Any]:
    """One method's curve: recall {iou: {k: r}}, AR {k: ar}, proposals and ms per image."""
    boxes, seconds = [], []
    for image in images:
        start = time.perf_counter()
        boxes.append(propose(image))
        seconds.append(time.perf_counter() - start)
    recall = proposal_recall(boxes, truth, counts, iou_thresholds)
    return {
        "recall": {str(t): {str(k): v for k, v in r.items()} for t, r in recall.items()},
        "ar": {str(k): v for k, v in average_recall(boxes, truth, counts).items()},
        "proposals_per_image": float(np.mean([len(b) for b in boxes])),
        "ms_per_image": 1000 * float(np.mean(seconds)),
        "ms_per_image_median": 1000 * float(np.median(seconds)),
    }


def recall_curves(
    *,
    scenes: int = 50,
    split: str = "test",
    methods: Sequence[str] = ("ss_fast", "sliding"),
    rpn_ckpt: Path | None = None,
    counts: Sequence[int] = COUNTS,
    iou_thresholds: Sequence[float] = IOUS,
) -> dict[str, dict[str, Any]]:
    """{method name: measure(...)} on `scenes` digit scenes of `split`: recall at each IoU and
    k, AR@k, proposals per image, ms per image (OpenCV's first-call warm-up excluded)."""
    images, truth = digit_scenes(scenes, split)
    if any(m.startswith("ss_") for m in methods):
        warm_up()
    found = proposers(methods, rpn_ckpt, max(counts))
    return {name: measure(p, images, truth, counts, iou_thresholds) for name, p in found.items()}


def plot_recall(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per IoU threshold: recall against proposals per image (log x), a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ious = list(next(iter(curves.values()))["recall"])
    fig, axes = plt.subplots(1, len(ious), figsize=(5 * len(ious), 3.8), sharey=True, squeeze=False)
    for ax, iou in zip(axes[0], ious, strict=True):
        for name, c in curves.items():
            r = c["recall"][iou]
            ax.plot([int(k) for k in r], list(r.values()), marker="o", label=name)
        ax.set(xscale="log", xlabel="proposals per image", title=f"recall at IoU >= {iou}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall of the digit boxes")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(curves: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: recall at each IoU at the smallest and the largest k, AR, speed."""
    first = next(iter(curves.values()))
    ious, ks = list(first["recall"]), list(next(iter(first["recall"].values())))
    cols = [f"R@{k} IoU{t}" for t in ious for k in (ks[0], ks[-1])] + [f"AR@{ks[-1]}"]
    lines = ["| method | " + " | ".join(cols) + " | proposals / image | ms / image |"]
    lines.append("|---" * (len(cols) + 3) + "|")
    for name, c in curves.items():
        vals = [c["recall"][t][k] for t in ious for k in (ks[0], ks[-1])] + [c["ar"][ks[-1]]]
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals)
            + f" | {c['proposals_per_image']:.0f} | {c['ms_per_image']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Recall (IoU 0.5 and 0.7) against the number of proposals per image on the "
        "embedded digit scenes: selective search, sliding windows, a Faster R-CNN's RPN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the PNG")
    p.add_argument("--scenes", type=int, default=50, help="digit scenes measured")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=["ss_fast", "ss_quality", "sliding"]
    )
    p.add_argument(
        "--rpn_ckpt", type=Path, default=None,
        help="a FasterRCNNModule checkpoint: add its RPN's top-N proposals (N = max of --counts)",
    )  # fmt: skip
    p.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="k per image")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timings)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = recall_curves(
        scenes=args.scenes,
        split=args.split,
        methods=args.methods,
        rpn_ckpt=args.rpn_ckpt,
        counts=sorted(set(args.counts)),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"scenes": args.scenes, "split": args.split, "threads": args.threads}
    (args.out / "proposal_recall.json").write_text(
        json.dumps({"settings": meta, "curves": curves}, indent=2)
    )
    plot_recall(curves, args.out / "proposal_recall.png")
    print(table(curves))
    print(f"wrote {args.out / 'proposal_recall.json'} and {args.out / 'proposal_recall.png'}")
    return curves


if __name__ == "__main__":
    main()
