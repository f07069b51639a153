"""The segmentation topic of the demo: FCN-32s, then FCN-8s staged from it, on DigitCanvas scenes.

    python scripts/demo_segmentation.py                # both nets -> runs/demo/ (+ REPORT section)
    python scripts/demo_segmentation.py --speed        # only the 512x512 CPU forward speed

`demo(out)` trains both configs through scripts/train.py's CLI (fit, then test on the fixed test
scenes): FCN-32s first, whose best weights (ExportWeights) initialise FCN-8s, as Long et al. stage
their nets, and writes the overlay figure into `out`; `report(result)` gives its REPORT.md
section. scripts/demo.py lists it among its topics. The CPU forward speed at 512x512 (VGG16
FCN-8s, torchvision's fcn_resnet50, the digits trunk) is `scripts/benchmark.py`'s (`--speed` here).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from lit_modules.metrics import FCN_SCORES  # noqa: E402
from lit_modules.nets.fcn import build_fcn  # noqa: E402
from scripts.demo import quiet_lightning, run_config  # noqa: E402

NETS = {  # report label -> (config, what it starts from: a weights file under the runs' root)
    "FCN-32s": ("segmentation/digits_fcn32s.yaml", None),
    "FCN-8s": ("segmentation/digits_fcn8s.yaml", "fcn32s_digits.pt"),  # staged: 32s -> 8s
}
FIGURE = "segmentation_overlays.png"
SPEED_NETS = {  # label -> build_fcn kwargs; weights=None: speed does not depend on them
    "FCN-8s VGG16 (paper)": {"arch": "vgg16", "variant": "8s", "in_channels": 3},
    "torchvision fcn_resnet50": {"arch": "fcn_resnet50", "variant": None, "in_channels": 3},
    "FCN-8s digits trunk": {"arch": "digits", "variant": "8s", "in_channels": 1},
}


@torch.inference_mode()
def forward_speed(size: int = 512, reps: int = 1) -> dict[str, float]:
    """Images per second of one (1, C, size, size) forward pass on the CPU (after one warm-up).

    One timed pass after the warm-up by default: a VGG16 or ResNet-50 pass at 512x512 takes ~1.6 s
    on 2 cores, and each further pass costs the demo that much for a figure that barely moves.
    """
    speeds = {}
    for label, kwargs in SPEED_NETS.items():
        net = build_fcn(num_classes=21, **kwargs).eval()
        x = torch.randn(1, kwargs["in_channels"], size, size)
        net(x)  # warm-up: allocations, oneDNN kernel selection
        t0 = time.perf_counter()
        for _ in range(reps):
            out = net(x)
        speeds[label] = reps / (time.perf_counter() - t0)
        assert out.shape[-2:] == (size, size)
        del net
    return speeds


def _last_run(root: Path, name: str) -> Path:
    """The newest version_N folder of run `name`."""
    return max((root / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def _steps(root: Path, name: str) -> int:
    """Optimizer steps of the newest run `name`: its last validation closes the last epoch."""
    with open(_last_run(root, name) / "metrics.csv", newline="") as f:
        return 1 + max(int(r["step"]) for r in csv.DictReader(f) if r.get("val/miou"))


def _last_overlay(root: Path, name: str) -> Path:
    """The last validation overlay grid of run `name` (its newest version)."""
    run = _last_run(root, name)
    pictures = sorted((run / "images").glob("val_overlays_epoch*.png"))
    if not pictures:
        raise FileNotFoundError(f"run {run} wrote no overlay picture")
    return pictures[-1]


def plot_overlays(pictures: dict[str, Path], path: Path) -> None:
    fig, axes = plt.subplots(len(pictures), 1, figsize=(12, 4.2 * len(pictures)))
    for ax, (label, picture) in zip(axes, pictures.items(), strict=True):
        ax.imshow(torchvision.io.read_image(str(picture)).permute(1, 2, 0).numpy())
        ax.set_title(f"{label}: ground truth (top row) and prediction (bottom row), val scenes")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo(out: Path) -> dict[str, Any]:
    """Train FCN-32s and FCN-8s on the digit scenes; four test scores, wall time, overlays, speed."""
    root = out / "runs"
    rows, pictures = [], {}
    for label, (config, start) in NETS.items():
        name = f"segmentation_{Path(config).stem}"
        overrides = [] if start is None else [f"--model.init_from={root / 'weights' / start}"]
        print(f"[segmentation] training {label} ({config}{', from ' + start if start else ''})")
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = run_config(config, name, root, overrides)
        seconds = round(time.perf_counter() - t0, 1)
        cpu = round(
            time.process_time() - c0, 1
        )  # all threads: wall time on a quiet machine x threads
        rows.append(
            {
                "net": label,
                "config": config,
                "init_from": start,
                "steps": _steps(root, name),
                "seconds": seconds,
                "cpu_seconds": cpu,
                **metrics,
            }
        )
        pictures[label] = _last_overlay(root, name)
        scores = "  ".join(f"{k} {metrics[f'test/{k}']:.3f}" for k in FCN_SCORES)
        print(f"[segmentation] {label}: {scores}  {seconds:.0f}s")
    plot_overlays(pictures, out / FIGURE)
    return {"rows": rows, "threads": torch.get_num_threads(), "figure": FIGURE}


def report(result: dict[str, Any]) -> list[str]:
    rows = {r["net"]: r for r in result["rows"]}
    lines = [
        "## Semantic segmentation: FCN-32s vs FCN-8s (DigitCanvas scenes)",
        "",
        "Long et al.'s fully convolutional nets on the small digits trunk (taps at strides 8, 16, 32),",
        "trained in stages as in the paper: FCN-32s from scratch, then FCN-8s from FCN-32s's best",
        "weights (its skip score layers start at zero), both with a one-cycle schedule, bf16-mixed",
        "autocast and channels_last; the paper's four scores on the 200 fixed test scenes (11 classes:",
        "background + digits 0-9). Steps are optimizer steps of batch 8 (1,000 training scenes).",
        "",
        "| net | starts from | steps | pixel acc | mean acc | mean IU | f.w. IU "
        "| wall s (fit + test) | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        cells = " | ".join(f"{r[f'test/{k}']:.3f}" for k in FCN_SCORES)
        start = r.get("init_from") or "scratch"
        lines.append(
            f"| {label} | {start} | {r.get('steps', '?')} | {cells} | {r['seconds']:.0f} "
            f"| {r['cpu_seconds']:.0f} |"
        )
    m32, m8 = rows["FCN-32s"]["test/miou"], rows["FCN-8s"]["test/miou"]
    lines += [
        "",
        f"- {'yes' if m8 >= m32 else 'NO'}: the paper's ordering: FCN-8s mean IU {m8:.3f} vs FCN-32s "
        f"{m32:.3f} (staged: FCN-8s also trained the steps after FCN-32s's, as in the paper)",
        f"- {'yes' if m8 >= 0.80 else 'NO'}: FCN-8s mean IU >= 0.80",
        "",
        f"![segmentation overlays]({result['figure']})",
        "",
        "CPU forward speed of the paper's VGG16 FCN-8s at 512x512: `make benchmark` (BENCHMARK.md),",
        "or `python scripts/demo_segmentation.py --speed`.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--speed", action="store_true", help="only the CPU forward speed")
    args = parser.parse_args(argv)
    if args.speed:
        for label, ips in forward_speed().items():
            print(f"{label}: {ips:.2f} images/s at 512x512 ({torch.get_num_threads()} threads)")
        return
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    result = demo(args.out)
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
