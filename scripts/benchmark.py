"""Speed figures as ratios measured in one run: Lightning vs a plain loop, bf16-mixed vs fp32,
dense class maps vs sliding-window crops.

    python scripts/benchmark.py [--out runs/benchmark] [--repeats 3] [--epochs-bf16 3]

Absolute seconds depend on the machine and on whatever else runs on it; a ratio of two
measurements taken side by side in one process does not (much). So both sides of each
comparison run here, with the same threads, seed, data, net, optimizer and metric:

- Lightning overhead: one epoch of the digits classifier (4,000 images, batch 64) through
  `Trainer.fit` vs a hand-written PyTorch loop doing the same work, alternated (plain, lightning,
  plain, ...) after one warm-up of each, so drifting background load hits both alike. The
  headline counts `Trainer(...)` + `trainer.fit(...)` (what a user pays); the fit alone and the
  epoch alone (timed between the on_train_epoch_start/end hooks) are reported beside it.
- bf16-mixed vs fp32: the same training for a few epochs at each precision on CPU: seconds per
  epoch (median over epochs, hook to hook), their ratio, and test accuracy of each.
- dense vs sliding: a convolutionalized digits classifier once over a 224 px scene against the
  classifier on each of its 2,500 crops (28 px, stride 4), alternated; with zero-padded convs
  (DigitsCNN) and without (its unpadded twin, whose scores must equal the crops' to 1e-4).

Threads default to 1: on a small machine shared with other jobs, several OpenMP threads per
process oversubscribe the cores and an epoch's time swings tenfold from run to run; one thread
keeps the comparison about the code, not the scheduler. Wall and CPU seconds are both reported.

Writes <out>/benchmark.json and <out>/BENCHMARK.md, and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

import lightning  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules.digits import DIGITS_MEAN, DIGITS_STD, DigitCanvas, DigitsDataModule  # noqa: E402
from lit_modules.callbacks import keep_previous  # noqa: E402
from lit_modules.nets.backbones import DigitsCNN, unpadded_digits_cnn  # noqa: E402
from lit_modules.spatial import dense_vs_sliding  # noqa: E402
from lit_modules.transfer import TransferClassifier  # noqa: E402

BATCH_SIZE = 64


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of a 1-thread run barely moves when other jobs share the
    cores; wall time does, so both are kept."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


class EpochTimer(Callback):
    """(wall, CPU) seconds of each training epoch, hook to hook: the loop alone, no fit setup."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = clock()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times.append(since(self._start))


def quiet() -> None:
    """No Lightning banners or loader warnings in the output (they are not what is measured)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")


def make_data() -> DigitsDataModule:
    """All ten digits, the full 4,000-image train split; set up once, shared by every run."""
    dm = DigitsDataModule(batch_size=BATCH_SIZE)
    dm.setup()
    return dm


def make_module(seed: int, scheduler: str = "none") -> TransferClassifier:
    """The digits classifier from scratch; `seed` fixes its initialisation."""
    seed_everything(seed, verbose=False)
    return TransferClassifier(
        backbone="digits_cnn",
        num_classes=10,
        mode="scratch",
        scheduler=scheduler,  # type: ignore[arg-type]
        num_sample_images=0,
    )


def make_trainer(limit_batches: int | None, **kwargs: Any) -> Trainer:
    """A bare CPU Trainer: no logger, checkpoints, progress bar, summary or validation."""
    limit = limit_batches if limit_batches is not None else 1.0
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_train_batches=limit,
        limit_val_batches=0,
        limit_test_batches=limit,
        **kwargs,
    )


# ----------------------------------------------------------------------------- overhead


def plain_epoch(module: TransferClassifier, loader: DataLoader, limit_batches: int | None) -> None:
    """One epoch by hand, doing what `module.training_step` + Lightning's optimizer loop do."""
    net, criterion, acc = module.net, module.criterion, module.train_acc
    optimizer = module.configure_optimizers()  # AdamW, the module's lr / weight decay / groups
    net.train()
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        logits = net.forward_head(net.forward_features(x))  # (B, 10)
        loss = criterion(logits, y)
        acc.update(logits.detach(), y)  # the module's per-step metric update
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    acc.compute()  # the module logs the epoch-level train/acc
    acc.reset()


def time_plain(dm: DigitsDataModule, seed: int, limit_batches: int | None) -> dict[str, float]:
    module, loader = make_module(seed), dm.train_dataloader()
    gc.collect()
    seed_everything(seed, verbose=False)  # same shuffle order and dropout masks as Lightning's run
    start = clock()
    plain_epoch(module, loader, limit_batches)
    wall, cpu = since(start)
    return {"wall": wall, "cpu": cpu}


def time_lightning(dm: DigitsDataModule, seed: int, limit_batches: int | None) -> dict[str, float]:
    module, loader, timer = make_module(seed), dm.train_dataloader(), EpochTimer()
    gc.collect()
    start = clock()
    trainer = make_trainer(limit_batches, max_epochs=1, callbacks=[timer])
    init = since(start)
    seed_everything(seed, verbose=False)
    fit_start = clock()
    trainer.fit(module, train_dataloaders=loader)
    fit, total = since(fit_start), since(start)
    return dict(wall=total[0], cpu=total[1], init=init[0], fit=fit[0], epoch=timer.times[0][0])


def measure_overhead(
    repeats: int = 3,
    limit_batches: int | None = None,
    seed: int = 0,
    dm: DigitsDataModule | None = None,
) -> dict[str, Any]:
    """Median seconds of a plain epoch and a Lightning one, alternated after one warm-up each."""
    dm = dm or make_data()
    time_plain(dm, seed, limit_batches)  # warm-up: allocator, oneDNN kernels, lazy imports
    time_lightning(dm, seed, limit_batches)
    plain: list[dict[str, float]] = []
    light: list[dict[str, float]] = []
    for _ in range(repeats):
        plain.append(time_plain(dm, seed, limit_batches))
        light.append(time_lightning(dm, seed, limit_batches))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    p = med(plain, "wall")
    return {
        "plain_s": p,
        "lightning_s": med(light, "wall"),  # Trainer(...) + trainer.fit(...)
        "lightning_fit_s": med(light, "fit"),
        "lightning_epoch_s": med(light, "epoch"),
        "trainer_init_s": med(light, "init"),
        "plain_cpu_s": med(plain, "cpu"),
        "lightning_cpu_s": med(light, "cpu"),
        "ratio": med(light, "wall") / p,
        "ratio_fit": med(light, "fit") / p,
        "ratio_epoch": med(light, "epoch") / p,
        "ratio_cpu": med(light, "cpu") / med(plain, "cpu"),
        "ratio_paired_median": statistics.median(
            q["wall"] / r["wall"] for q, r in zip(light, plain, strict=True)
        ),
        "plain_all_s": [r["wall"] for r in plain],
        "lightning_all_s": [r["wall"] for r in light],
        "repeats": repeats,
        "batches": limit_batches or len(dm.train_dataloader()),
    }


# ----------------------------------------------------------------------------- precision


def train_and_test(
    dm: DigitsDataModule, precision: str, epochs: int, seed: int, limit_batches: int | None
) -> dict[str, Any]:
    """Train from scratch at `precision` for `epochs`; seconds per epoch and test accuracy."""
    module, timer = make_module(seed, scheduler="cosine"), EpochTimer()
    trainer = make_trainer(limit_batches, max_epochs=epochs, precision=precision, callbacks=[timer])
    gc.collect()
    seed_everything(seed, verbose=False)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    result = trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
    wall, cpu = zip(*timer.times, strict=True)
    return {
        "epoch_s": statistics.median(wall),
        "epoch_cpu_s": statistics.median(cpu),
        "epochs_s": list(wall),
        "test_acc": float(result[0]["test/acc"]),
    }


def measure_bf16(
    epochs: int = 3,
    limit_batches: int | None = None,
    seed: int = 0,
    dm: DigitsDataModule | None = None,
) -> dict[str, Any]:
    """fp32 and bf16-mixed training side by side: speed ratio and accuracy difference."""
    dm = dm or make_data()
    fp32 = train_and_test(dm, "32-true", epochs, seed, limit_batches)
    bf16 = train_and_test(dm, "bf16-mixed", epochs, seed, limit_batches)
    return {
        "fp32": fp32,
        "bf16": bf16,
        "speed_ratio": fp32["epoch_s"] / bf16["epoch_s"],  # > 1: bf16 is faster
        "speed_ratio_cpu": fp32["epoch_cpu_s"] / bf16["epoch_cpu_s"],
        "acc_diff": bf16["test_acc"] - fp32["test_acc"],
        "epochs": epochs,
    }


# ----------------------------------------------------------------------------- report


def measure_dense(repeats: int, seed: int) -> dict[str, Any]:
    """Issue 11: a convolutionalized classifier once over a 224 px digit scene vs the classifier
    on every 28 px crop at the same stride (4 px: 50x50 windows), timed alternately in
    `dense_vs_sliding`. Speed does not depend on the weights, so random ones serve; the DigitsCNN
    (zero-padded convs) and its unpadded twin (identical scores) are both measured."""
    torch.manual_seed(seed)
    scene = DigitCanvas("test", length=1, size=224, num_digits=(3, 8), digit_size=(24, 32))[0]
    x = (scene["image"] - DIGITS_MEAN) / DIGITS_STD  # (1, 224, 224)
    nets = {"digits_cnn": DigitsCNN().eval(), "unpadded_digits_cnn": unpadded_digits_cnn()}
    keep = ("dense_s", "sliding_s", "speedup", "windows", "max_abs_diff", "argmax_agreement")
    out = {}
    for name, net in nets.items():
        result = dense_vs_sliding(net, x, repeats=repeats)
        out[name] = {k: result[k] for k in keep} | {"repeats": repeats}
    return out


def markdown(result: dict[str, Any]) -> str:
    o, b, env = result["trainer_vs_plain"], result["bf16_vs_fp32"], result["env"]
    rows = [
        ("plain PyTorch loop", o["plain_s"], 1.0),
        ("Lightning: Trainer() + fit (headline)", o["lightning_s"], o["ratio"]),
        ("Lightning: fit only", o["lightning_fit_s"], o["ratio_fit"]),
        ("Lightning: epoch, hook to hook", o["lightning_epoch_s"], o["ratio_epoch"]),
    ]
    lines = [
        f"## Lightning vs plain PyTorch: one epoch, {o['batches']} batches of {BATCH_SIZE} digits "
        f"(median of {o['repeats']}, alternated)",
        "",
        "| run | seconds | ratio to plain |",
        "|---|---:|---:|",
        *(f"| {name} | {s:.3f} | {r:.3f} |" for name, s, r in rows),
        "",
        f"Median of paired ratios (Trainer() + fit / plain): {o['ratio_paired_median']:.3f}. "
        f"CPU seconds: plain {o['plain_cpu_s']:.3f}, Trainer() + fit {o['lightning_cpu_s']:.3f}, "
        f"ratio {o['ratio_cpu']:.3f}.",
        "",
        f"## bf16-mixed vs fp32 on CPU: {b['epochs']} epochs, digits 0-9 from scratch",
        "",
        "| precision | s / epoch (median) | CPU s / epoch | test/acc |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r['epoch_s']:.3f} | {r['epoch_cpu_s']:.3f} | {r['test_acc']:.4f} |"
            for name, r in (("32-true", b["fp32"]), ("bf16-mixed", b["bf16"]))
        ),
        "",
        f"Speed ratio fp32 / bf16: {b['speed_ratio']:.3f} wall, {b['speed_ratio_cpu']:.3f} CPU "
        "(> 1: bf16 faster). "
        f"Accuracy difference bf16 - fp32: {b['acc_diff']:+.4f}.",
        "",
        "## Dense class map vs sliding-window crops: one 224 px scene, 28 px crops, stride 4",
        "",
        "| net | sliding s | dense s | speed-up | max abs score difference |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {r['sliding_s']:.4f} | {r['dense_s']:.4f} | {r['speedup']:.1f}x "
            f"| {r['max_abs_diff']:.2g} |"
            for name, r in result["dense_vs_sliding"].items()
        ),
        "",
        f"torch {env['torch']}, lightning {env['lightning']}, {env['threads']} threads, "
        f"{env['cpus']} CPUs, load average {env['load_before']:.2f} before / "
        f"{env['load_after']:.2f} after, {env['wall_s']:.0f} s in all.",
    ]
    return "\n".join(lines) + "\n"


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/benchmark"), help="output folder")
    add("--repeats", type=int, default=3, help="timed epochs per side after one warm-up each")
    add("--epochs-bf16", type=int, default=3, help="training epochs per precision")
    add("--threads", type=int, default=1, help="torch threads for every run (see above)")
    add("--seed", type=int, default=0, help="seed of every run")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.epochs_bf16 < 1 or args.threads < 1:
        parser.error("--repeats, --epochs-bf16 and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    dm = make_data()
    print(f"Lightning vs plain: 1 warm-up + {args.repeats} alternated epochs each ...", flush=True)
    overhead = measure_overhead(args.repeats, seed=args.seed, dm=dm)
    print(f"bf16-mixed vs fp32: {args.epochs_bf16} epochs each ...", flush=True)
    bf16 = measure_bf16(args.epochs_bf16, seed=args.seed, dm=dm)
    print("dense class map vs sliding crops ...", flush=True)
    dense = measure_dense(max(args.repeats, 5), seed=args.seed)
    env = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start,
    }
    result = {
        "trainer_vs_plain": overhead,
        "bf16_vs_fp32": bf16,
        "dense_vs_sliding": dense,
        "env": env,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("benchmark.json", "BENCHMARK.md"):  # an earlier measurement is kept
        keep_previous(args.out / name)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "BENCHMARK.md").write_text("# cnnlab benchmark\n\n" + table)
    print(table)
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'BENCHMARK.md'}")
    return result


if __name__ == "__main__":
    main()
