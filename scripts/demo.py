"""The main job on the embedded data: every lecture topic trained and measured, one report.

    python scripts/demo.py                       # what `make demo` runs
    python scripts/demo.py --topics transfer     # one topic

Writes runs/demo/REPORT.md, runs/demo/report.json (one object per topic: metrics, wall seconds)
and the PNG figures the report shows. Every number comes from the runs this command just made,
through the same configs and CLI as `scripts/train.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts.train import main as cli_main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_config(
    config: str, name: str, root: Path, overrides: list[str], test: bool = True
) -> dict[str, float]:
    """`train.py fit` (then `test`) of one config in this process; returns its metrics.json."""
    args = [
        "fit",
        f"--config={CONFIGS / config}",
        f"--name={name}",
        f"--trainer.default_root_dir={root}",
        "--wandb=disabled",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *overrides,
    ]
    cli = cli_main(args)
    if test:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


# ----------------------------------------------------------------------------- transfer

TRANSFER_METHODS = {  # report label -> config; each starts from the digits 0-4 network but scratch
    "linear probe (softmax)": "transfer/digits_linear_probe.yaml",
    "linear probe (SVM)": "transfer/digits_linear_svm.yaml",
    "fine-tune top 2 stages": "transfer/digits_finetune_top.yaml",
    "fine-tune all": "transfer/digits_finetune.yaml",
    "scratch": "transfer/digits_scratch.yaml",
}
BUDGETS: tuple[int | None, ...] = (10, 100, None)  # labels per class; None = all 400
EPOCHS = {10: 100, 100: 20, None: 6}  # ~100-200 optimizer steps of <= 64 images for every budget


def demo_transfer(out: Path) -> dict[str, Any]:
    """Digits 0-4 -> 5-9: linear probes, fine-tuning and scratch at three label budgets."""
    root = out / "runs"
    print("[transfer] pretraining the source network on digits 0-4")
    source = run_config(
        "transfer/digits_pretrain_source.yaml", "transfer_source", root, [], test=False
    )
    weights = root / "weights" / "digits_source.pt"
    rows = []
    for label, config in TRANSFER_METHODS.items():
        for budget in BUDGETS:
            epochs = EPOCHS[budget]
            t0 = time.perf_counter()
            overrides = [
                f"--trainer.max_epochs={epochs}",
                f"--trainer.check_val_every_n_epoch={epochs}",  # validate once, at the end
                f"--data.labels_per_class={'null' if budget is None else budget}",
                "--model.num_sample_images=0",
            ]
            if "scratch" not in config:
                overrides.append(f"--model.weights={weights}")
            name = f"transfer_{Path(config).stem}_{budget or 'all'}"
            metrics = run_config(config, name, root, overrides)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "method": label,
                    "labels_per_class": budget or 400,
                    "seconds": round(seconds, 1),
                    **metrics,
                }
            )
            acc, src = metrics.get("test/acc"), metrics.get("test/source_acc")
            print(
                f"[transfer] {label:24s} {budget or 'all':>4} labels/class  test/acc {acc:.3f}  source {src if src is None else round(src, 3)}  {seconds:.1f}s"
            )
    plot_transfer(rows, out / "transfer_accuracy.png")
    return {
        "source_val_acc": source.get("val/acc"),
        "rows": rows,
        "figure": "transfer_accuracy.png",
    }


def plot_transfer(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in TRANSFER_METHODS:
        mine = [r for r in rows if r["method"] == method]
        x = [r["labels_per_class"] for r in mine]
        ax1.plot(x, [r["test/acc"] for r in mine], marker="o", label=method)
        if mine[-1].get("test/source_acc") is not None:
            ax2.plot(x, [r["test/source_acc"] for r in mine], marker="o", label=method)
    ax1.set(
        xscale="log",
        xlabel="labels per class (target: digits 5-9)",
        ylabel="test accuracy",
        title="Target task",
    )
    ax2.set(
        xscale="log",
        xlabel="labels per class (target: digits 5-9)",
        ylabel="test accuracy on digits 0-4",
        title="Source task after transfer (forgetting)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer_claims(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The lecture's claims, checked against this run's numbers."""
    acc = {(r["method"], r["labels_per_class"]): r for r in rows}
    a = lambda m, b, k="test/acc": acc[(m, b)].get(k)  # noqa: E731
    scratch10 = a("scratch", 10)
    return [
        (
            "at 10 labels/class the linear probe beats scratch",
            a("linear probe (softmax)", 10) > scratch10,
        ),
        ("at 10 labels/class fine-tuning beats scratch", a("fine-tune all", 10) > scratch10),
        ("with all labels fine-tuning reaches >= 97%", a("fine-tune all", 400) >= 0.97),
        (
            "full fine-tuning forgets the source task more than linear probing",
            a("fine-tune all", 400, "test/source_acc")
            < a("linear probe (softmax)", 400, "test/source_acc"),
        ),
    ]


def report_transfer(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    lines = [
        "## 1. Transfer learning (digits 0-4 -> digits 5-9)",
        "",
        f"Source network: DigitsCNN trained from scratch on digits 0-4 (val acc {result['source_val_acc']:.3f}).",
        "Target: digits 5-9 with 10, 100 or all 400 labels per class; test on the 250 fixed test digits 5-9.",
        "Source acc: digits 0-4 test accuracy through the kept source head after the transfer run.",
        "",
        "| method | acc @10/class | acc @100/class | acc @all | source acc @10 | source acc @all | wall s (3 runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for method in TRANSFER_METHODS:
        mine = {r["labels_per_class"]: r for r in rows if r["method"] == method}
        secs = sum(r["seconds"] for r in mine.values())
        lines.append(
            f"| {method} | {fmt(mine[10].get('test/acc'))} | {fmt(mine[100].get('test/acc'))} | {fmt(mine[400].get('test/acc'))} "
            f"| {fmt(mine[10].get('test/source_acc'))} | {fmt(mine[400].get('test/source_acc'))} | {secs:.1f} |"
        )
    lines += [
        "",
        f"![transfer]({result['figure']})",
        "",
        "Claims of the lecture, checked on these numbers:",
        "",
    ]
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in transfer_claims(rows)]
    return lines


TOPICS: dict[
    str, tuple[Callable[[Path], dict[str, Any]], Callable[[dict[str, Any]], list[str]]]
] = {
    "transfer": (demo_transfer, report_transfer),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--topics",
        nargs="+",
        choices=list(TOPICS),
        default=list(TOPICS),
        help="topics to run (default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    lines = [
        "# cnnlab demo report",
        "",
        "Made by `make demo` (scripts/demo.py) on the embedded MNIST-5k digits.",
        "",
    ]
    for topic in args.topics:
        run, write = TOPICS[topic]
        t0 = time.perf_counter()
        result = run(args.out)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report[topic] = result
        lines += [*write(result), "", f"Wall time of this topic: {result['seconds']:.0f} s.", ""]
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "REPORT.md").write_text("\n".join(lines))
    print(f"report: {args.out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
