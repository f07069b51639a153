"""Topic 1 of the demo: transfer learning, digits 0-4 -> digits 5-9 (Yosinski et al.'s A/B split).

    python scripts/demo.py --topics transfer

Linear probes (softmax, SVM), fine-tuning (top stages, all) and training from scratch at 10, 100
and 400 labels per class, plus a linear probe at every depth. Every number is from the runs
this command makes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts.demo import pool_workers, process_pool, run_config  # noqa: E402

TRANSFER_METHODS = {  # report label -> config; all but scratch start from the digits 0-4 network
    "linear probe (softmax)": "transfer/digits_linear_probe.yaml",
    "linear probe (SVM)": "transfer/digits_linear_svm.yaml",
    "fine-tune top 2 stages": "transfer/digits_finetune_top.yaml",
    "fine-tune all": "transfer/digits_finetune.yaml",
    "scratch": "transfer/digits_scratch.yaml",
}
BUDGETS = (10, 100, 400)  # labels per class; 400 = all
EPOCHS = {10: 60, 100: 15, 400: 4}  # 60-128 optimizer steps of <= 64 images for every budget
# 10 labels/class: mean of 3 label draws (the claims compare methods there); 100 and all: one
SEEDS = {10: (0, 1, 2), 100: (0,), 400: (0,)}
PROBE_STAGES = (1, 2, 3, 4)  # Yosinski et al.'s n for the layer sweep


def _transfer_run(
    config: str, name: str, root: Path, weights: Path, budget: int, seed: int, extra: list[str]
) -> dict[str, Any]:
    epochs = 1 if "linear" in config else EPOCHS[budget]  # probes: the head is fitted at start
    overrides = [
        f"--seed_everything={seed}",
        f"--data.seed={seed}",  # which labelled images the budget draws
        f"--trainer.max_epochs={epochs}",
        f"--trainer.check_val_every_n_epoch={epochs}",  # validate once, at the end
        f"--data.labels_per_class={'null' if budget == 400 else budget}",
        "--model.num_sample_images=0",
        *extra,
    ]
    if "scratch" not in config:
        overrides.append(f"--model.weights={weights}")
    t0 = time.perf_counter()
    metrics = run_config(config, name, root, overrides)
    return {
        "labels_per_class": budget,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        **metrics,
    }


def demo(out: Path) -> dict[str, Any]:
    """Digits 0-4 -> 5-9: linear probes, fine-tuning and scratch at three label budgets."""
    root = out / "runs"
    weights = root / "weights" / "digits_source.pt"
    jobs, labels = [], []  # every run of the sweep, then every probe depth
    for label, config in TRANSFER_METHODS.items():
        for budget in BUDGETS:
            for seed in SEEDS[budget]:
                name = f"transfer_{Path(config).stem}_{budget}_seed{seed}"
                jobs.append((config, name, root, weights, budget, seed, []))
                labels.append({"method": label})
    for n in PROBE_STAGES:
        for seed in SEEDS[10]:
            name = f"transfer_probe_stages{n}_seed{seed}"
            extra = [f"--model.feature_stages={n}"]
            jobs.append(("transfer/digits_linear_probe.yaml", name, root, weights, 10, seed, extra))
            labels.append({"feature_stages": n})
    print(
        f"[transfer] pretraining the source network on digits 0-4 beside the scratch runs, "
        f"then {len(jobs)} runs in all over one process per core"
    )
    # The scratch runs need no source network: they fill the other cores while it trains. The
    # runs that start from it follow, longest first (most labels), so the cores finish together.
    scratch = [i for i, j in enumerate(jobs) if "scratch" in j[0]]
    rest = sorted((i for i in range(len(jobs)) if i not in scratch), key=lambda i: -jobs[i][4])
    with process_pool(pool_workers(len(jobs))) as pool:
        pretrain = pool.submit(
            run_config, "transfer/digits_pretrain_source.yaml", "transfer_source", root, [], False
        )
        futures = {i: pool.submit(_transfer_run, *jobs[i]) for i in scratch}
        source = pretrain.result()
        futures |= {i: pool.submit(_transfer_run, *jobs[i]) for i in rest}
        done = [lab | futures[i].result() for i, lab in enumerate(labels)]
    rows = [r for r in done if "method" in r]
    sweep = [r for r in done if "feature_stages" in r]
    for row in rows:
        src = row.get("test/source_acc")
        print(
            f"[transfer] {row['method']:24s} {row['labels_per_class']:>3} labels/class seed "
            f"{row['seed']}  test/acc {row['test/acc']:.3f}  "
            f"source {'-' if src is None else f'{src:.3f}'}  {row['seconds']:.1f}s"
        )
    for n in PROBE_STAGES:
        accs = [r["test/acc"] for r in sweep if r["feature_stages"] == n]
        print(f"[transfer] linear probe on stages 1..{n}: test/acc {_mean(accs):.3f}")
    plot_transfer(rows, sweep, out / "transfer_accuracy.png")
    return {
        "source_val_acc": source.get("val/acc"),
        "rows": rows,
        "probe_sweep": sweep,
        "figure": "transfer_accuracy.png",
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stats(rows: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """Mean and (population) std of `key` over seeds, or None where it was not logged."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    m = _mean(values)
    return m, (sum((v - m) ** 2 for v in values) / len(values)) ** 0.5


def _by(rows: list[dict[str, Any]], method: str, budget: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["method"] == method and r["labels_per_class"] == budget]


def plot_transfer(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in TRANSFER_METHODS:
        for ax, key in zip(axes[:2], ("test/acc", "test/source_acc"), strict=True):
            stats = [_stats(_by(rows, method, b), key) for b in BUDGETS]
            if all(s is not None for s in stats):
                ax.errorbar(
                    BUDGETS,
                    [s[0] for s in stats],
                    yerr=[s[1] for s in stats],
                    marker="o",
                    capsize=3,
                    label=method,
                )
    n = list(PROBE_STAGES)
    means = [_stats([r for r in sweep if r["feature_stages"] == k], "test/acc") for k in n]
    axes[2].errorbar(
        n, [m[0] for m in means], yerr=[m[1] for m in means], marker="o", capsize=3, color="C0"
    )
    scratch = _stats(_by(rows, "scratch", 10), "test/acc")
    axes[2].axhline(scratch[0], color="C4", ls="--", label="scratch (10 labels/class)")
    xlabel = "labels per class (digits 5-9)"
    axes[0].set(
        xscale="log", xlabel=xlabel, ylabel="test accuracy", title="Target task: digits 5-9"
    )
    axes[1].set(
        xscale="log",
        xlabel=xlabel,
        ylabel="digits 0-4 test accuracy",
        title="Source task after transfer (forgetting)",
    )
    axes[2].set(
        xticks=n,
        xlabel="stages transferred and frozen (n)",
        ylabel="test accuracy",
        title="Linear probe by depth, 10 labels/class",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def transfer_claims(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The lecture's claims, checked against this run's numbers (means over seeds)."""

    def a(method: str, budget: int, key: str = "test/acc") -> float:
        return _stats(_by(rows, method, budget), key)[0]

    scratch10 = a("scratch", 10)
    return [
        (
            "at 10 labels/class the linear probe beats scratch",
            a("linear probe (softmax)", 10) > scratch10,
        ),
        ("at 10 labels/class fine-tuning beats scratch", a("fine-tune all", 10) > scratch10),
        ("with all labels fine-tuning reaches >= 97%", a("fine-tune all", 400) >= 0.97),
        (
            "full fine-tuning forgets the source task more than linear probing (all labels)",
            a("fine-tune all", 400, "test/source_acc")
            < a("linear probe (softmax)", 400, "test/source_acc"),
        ),
    ]


def report(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]

    def cell(method: str, budget: int, key: str) -> str:
        s = _stats(_by(rows, method, budget), key)
        if s is None:
            return "-"
        return f"{s[0]:.3f}" if len(SEEDS[budget]) == 1 else f"{s[0]:.3f} ± {s[1]:.3f}"

    lines = [
        "## 1. Transfer learning (digits 0-4 -> digits 5-9)",
        "",
        f"Source network: DigitsCNN trained from scratch on digits 0-4 (val acc {result['source_val_acc']:.3f}).",
        "Target: digits 5-9 with 10, 100 or all 400 labels per class; accuracy on the 250 fixed test",
        "digits 5-9 (mean ± std over 3 draws of the labelled images at 10 labels/class, one draw above).",
        "Source acc: digits 0-4 test accuracy through the kept source head after the transfer run",
        "(the source network itself scores it before any transfer: the linear probes keep it exactly).",
        "",
        "| method | acc @10/class | acc @100/class | acc @all | source acc @10 | source acc @all | wall s (all runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in TRANSFER_METHODS:
        secs = sum(r["seconds"] for r in rows if r["method"] == method)
        lines.append(
            f"| {method} | {cell(method, 10, 'test/acc')} | {cell(method, 100, 'test/acc')} | {cell(method, 400, 'test/acc')} "
            f"| {cell(method, 10, 'test/source_acc')} | {cell(method, 400, 'test/source_acc')} | {secs:.1f} |"
        )
    sweep = result["probe_sweep"]
    lines += [
        "",
        "Linear probe by depth (Yosinski et al.'s n: the first n stages transferred and frozen, softmax head,",
        "10 labels/class): "
        + ", ".join(
            f"n={n}: {_stats([r for r in sweep if r['feature_stages'] == n], 'test/acc')[0]:.3f}"
            for n in PROBE_STAGES
        )
        + ". The top stage (the FC layer) is the most specific to digits 0-4.",
        "",
        f"![transfer]({result['figure']})",
        "",
        "Claims of the lecture, checked on these numbers:",
        "",
    ]
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in transfer_claims(rows)]
    return lines
