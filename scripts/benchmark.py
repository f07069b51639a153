"""Speed figures as ratios measured in one run, for every module: the Trainer against a plain
PyTorch loop, the data pipeline against training, achieved FLOP/s against the machine's matmul
peak, bf16-mixed against fp32, and (detection) faster_coco_eval against pycocotools.

    python scripts/benchmark.py [--out runs/benchmark] [--repeats 7] [--modules gan detection]
    python scripts/benchmark.py --quick    # tiny step counts: a smoke run (the tests')

Absolute seconds depend on the machine and on whatever else runs on it; a ratio of two
measurements taken side by side in one process does not (much). So both sides of each figure
run here, alternated after a warm-up, with the same threads, seed, batches and code. Every
module (classification, detection, segmentation, gan, localization, deepmask, fast_rcnn) is
built from its YAML config with small sizes (scripts/bench_modules.py says what each plain step
does):

- Trainer vs plain loop (target <= 1.05): `Trainer(...)` + `fit` on a pre-built list of batches
  against a hand-written loop over the same list calling the module's own net, loss and
  configure_optimizers (for the GAN: its two optimisers and the D then G steps of its
  training_step). Median of the repeats; the epoch hook to hook ("loop ratio") beside it. And
  per step, paired inside one fit: a twin module's plain step after each Lightning step on the
  same batch (bench_modules.PairedSteps), free of fit's one-off setup and of the machine's slow
  spells, which last longer than a step.
- Data pipeline vs training (target >= 5x): the DataModule's train DataLoader alone (the config's
  workers) against the training step on pre-built batches, and the share of a step spent in
  next(iterator) when that loader feeds the loop.
- FLOP/s: FlopCounterMode's count of one forward + backward over the measured step time, as a
  fraction of a large fp32 (and bf16) matmul timed in the same run: the practical peak.
- bf16-mixed vs fp32: seconds per step of the plain loop under CPU autocast vs fp32.
- mAP (detection): torchmetrics' MeanAveragePrecision with backend faster_coco_eval vs
  pycocotools on the same detections; the scores must agree (max_abs_diff).
- The digits classifier also keeps its epoch-level figures: Lightning vs plain with its
  DataLoader, bf16-mixed vs fp32 with test accuracy after the same epochs, and (issue 11) a
  dense class map vs sliding-window crops.
- Segmentation also times one 512x512 forward of the paper's VGG16 FCN-8s, torchvision's
  fcn_resnet50 and the digits FCN-8s (images/s: an absolute figure, the only one here).

Threads default to 1: on a small machine shared with other jobs, several OpenMP threads per
process oversubscribe the cores and a step's time swings from run to run; one thread keeps the
comparison about the code, not the scheduler. Each figure in bench.json keeps both times, the
ratio, the repeats, the threads and the load average before and after it.

Writes <out>/bench.json and <out>/BENCHMARK.md, and prints the tables.
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
from lightning.pytorch import seed_everything  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules.digits import DIGITS_MEAN, DIGITS_STD, DigitCanvas, DigitsDataModule  # noqa: E402
from lit_modules.callbacks import keep_previous  # noqa: E402
from lit_modules.nets.backbones import DigitsCNN, unpadded_digits_cnn  # noqa: E402
from lit_modules.spatial import dense_vs_sliding  # noqa: E402
from lit_modules.transfer import TransferClassifier  # noqa: E402
from scripts.bench_modules import (  # noqa: E402
    SPECS,
    EpochTimer,
    alternated,
    clock,
    make_trainer,
    matmul_peak,
    measure_map,
    measure_module,
    since,
)

BATCH_SIZE = 64


def quiet() -> None:
    """No Lightning banners or loader warnings in the output (they are not what is measured)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen stages


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
    runs = alternated(
        {
            "plain": lambda: time_plain(dm, seed, limit_batches),
            "lightning": lambda: time_lightning(dm, seed, limit_batches),
        },
        repeats,
    )
    plain, light = runs["plain"], runs["lightning"]

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


def measure_roi_align(repeats: int, seed: int) -> dict[str, Any]:
    """RoIAlign forward + backward, torchvision's CPU kernel vs lit_modules/nets/roi_ops.py (one
    embedding_bag), alternated, on a digits Faster R-CNN step's shapes: 512 RoIs (8 scenes x 64)
    on an (8, 64, 24, 24) map at stride 4, 7x7 bins, 1 and 2 samples per bin."""
    import torchvision

    from lit_modules.nets.roi_ops import roi_align

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(8, 64, 24, 24, generator=g, requires_grad=True)
    xy = torch.rand(512, 2, generator=g) * 80
    wh = torch.rand(512, 2, generator=g) * 40 + 4
    rois = torch.cat([torch.randint(0, 8, (512, 1), generator=g).float(), xy, xy + wh], 1)
    impls = {"torchvision": torchvision.ops.roi_align, "embedding_bag": roi_align}

    def step(fn: Any, s: int) -> float:
        t0 = time.perf_counter()
        fn(features, rois, 7, 0.25, s).sum().backward()
        return time.perf_counter() - t0

    out: dict[str, Any] = {}
    for s in (1, 2):
        times: dict[str, list[float]] = {k: [] for k in impls}
        for fn in impls.values():  # warm-up
            step(fn, s)
        for _ in range(repeats):
            for name, fn in impls.items():
                times[name].append(min(step(fn, s) for _ in range(5)))
        tv, bag = (
            sorted(times["torchvision"])[repeats // 2],
            sorted(times["embedding_bag"])[repeats // 2],
        )
        out[f"sampling_ratio_{s}"] = {"torchvision_s": tv, "embedding_bag_s": bag,
                                      "speedup": tv / bag, "repeats": repeats}  # fmt: skip
    return out


def measure_fcn_forward(size: int, repeats: int) -> dict[str, Any]:
    """Images/s of one (1, C, size, size) FCN forward (random weights): the paper's VGG16
    FCN-8s, torchvision's fcn_resnet50 and the digits trunk; `repeats` timed passes after one
    warm-up pass (each VGG16 pass at 512 px takes ~2 s on 2 cores: moved here from the demo)."""
    from scripts.demo_segmentation import forward_speed

    speeds = forward_speed(size, reps=repeats)
    return {"size": size, "repeats": repeats} | {
        label: {"images_per_s": v} for label, v in speeds.items()
    }


def _table(title: str, header: list[str], rows: list[list[str]], *notes: str) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|---|" + "---:|" * (len(header) - 1))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, "", *(n for n in notes if n), *([""] if any(notes) else [])]


def _load(f: dict[str, Any]) -> str:
    return f"{f['load_before']:.1f} / {f['load_after']:.1f}"


def module_tables(modules: dict[str, dict[str, Any]], peak: dict[str, float]) -> list[str]:
    """The step-level figures of every module measured: one table per figure."""
    fig = {k: {m: r[k] for m, r in modules.items()} for k in ("trainer_vs_plain", "pipeline")}
    fig |= {k: {m: r[k] for m, r in modules.items()} for k in ("flops", "bf16_vs_fp32")}
    o = fig["trainer_vs_plain"]
    per_step = {m: r["trainer_vs_plain_per_step"] for m, r in modules.items()}
    lines = _table(
        "Trainer vs plain PyTorch loop, the same pre-built batches (target <= 1.05)",
        ["module", "steps", "plain s", "Trainer() + fit s", "ratio", "min .. max",
         "ratio of medians", "loop ratio", "CPU ratio", "repeats",
         "per step, paired (quartiles)", "load before / after"],
        [[m, str(f["steps"]), f"{f['plain_s']:.3f}", f"{f['lightning_s']:.3f}",
          f"{f['ratio']:.3f}", f"{f['ratio_min']:.2f} .. {f['ratio_max']:.2f}",
          f"{f['ratio_of_medians']:.3f}", f"{f['ratio_loop']:.3f}",
          f"{f['ratio_cpu']:.3f}", str(f["repeats"]),
          f"{per_step[m]['ratio']:.3f} ({per_step[m]['ratio_q1']:.2f} .. "
          f"{per_step[m]['ratio_q3']:.2f}), {per_step[m]['pairs']} pairs", _load(f)]
         for m, f in o.items()],
        "Wall seconds, medians of the repeats, run in alternating order. Ratio: the median of "
        "each repeat's Trainer / plain ratio (the two runs of a repeat are neighbours in time, "
        "so slow spells of a shared machine cancel); min .. max: the spread of those ratios. "
        "Loop ratio: the epoch hook to hook against the plain loop without its optimizer setup. "
        "CPU ratio: process CPU seconds. Per step, paired: one fit in which a twin module's plain "
        "step follows each Lightning step on the same batch; Lightning's step is the time "
        "between two batch starts less the twin's step; the median of the per-step ratios "
        "(after 2 warm-up pairs), what a long run pays per step without fit's one-off setup.",
    )  # fmt: skip
    lines += _table(
        "Data pipeline vs training: the train DataLoader alone (target >= 5x)",
        ["module", "workers", "batch", "loader s / batch", "first pass s / batch",
         "train s / step", "ratio", "share of a step waiting for data", "load before / after"],
        [[m, str(f["workers"]), str(f["batch_size"]), f"{f['loader_batch_s']:.4f}",
          f"{f.get('first_pass_batch_s', float('nan')):.4f}", f"{f['train_step_s']:.4f}",
          f"{f['ratio']:.1f}x", f"{f['wait_share']:.1%}", _load(f)]
         for m, f in fig["pipeline"].items()],
        "Wait share: time in next(iterator) over the whole loop when that loader feeds the plain "
        "loop (the config's workers; 0: loading and training take turns on one core). First "
        "pass: the loader's first epoch, which fills a config's caches (Fast R-CNN: selective "
        "search); the ratio is every later epoch's, as training sees it.",
    )  # fmt: skip
    lines += _table(
        "Achieved FLOP/s of a training step against the machine's matmul peak",
        ["module", "GFLOP / step", "fp32 GFLOP/s", "of fp32 peak", "bf16 GFLOP/s",
         "of bf16 peak"],
        [[m, f"{f['flops_per_step'] / 1e9:.2f}", f"{f['achieved_flops'] / 1e9:.1f}",
          f"{f['ratio']:.1%}", f"{f['bf16_achieved_flops'] / 1e9:.1f}", f"{f['bf16_ratio']:.1%}"]
         for m, f in fig["flops"].items()],
        f"Peak: a {peak['n']}x{peak['n']} matmul, best of {peak['repeats']}: fp32 "
        f"{peak['fp32_flops'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16_flops'] / 1e9:.1f} GFLOP/s. "
        "FLOPs: torch FlopCounterMode over one forward + backward (matmuls and convolutions; "
        "RoIAlign, NMS and elementwise ops uncounted); time: the whole step, optimizer included.",
    )  # fmt: skip
    lines += _table(
        "bf16-mixed vs fp32: seconds per training step (plain loop, CPU autocast)",
        ["module", "fp32 s / step", "bf16 s / step", "speed-up", "paired", "CPU speed-up",
         "repeats", "load before / after"],
        [[m, f"{f['fp32_step_s']:.4f}", f"{f['bf16_step_s']:.4f}", f"{f['ratio']:.2f}x",
          f"{f['ratio_paired_median']:.2f}x", f"{f['ratio_cpu']:.2f}x", str(f["repeats"]),
          _load(f)] for m, f in fig["bf16_vs_fp32"].items()],
    )  # fmt: skip
    layouts = {m: r["channels_last"] for m, r in modules.items() if r.get("channels_last")}
    if layouts:
        lines += _table(
            "channels_last (NHWC) vs NCHW: seconds per training step (plain loop)",
            ["module", "precision", "NCHW s / step", "NHWC s / step", "speed-up", "paired",
             "repeats", "load before / after"],
            [[m, f["precision"], f"{f['nchw_step_s']:.4f}", f"{f['nhwc_step_s']:.4f}",
              f"{f['ratio']:.2f}x", f"{f['ratio_paired_median']:.2f}x", str(f["repeats"]),
              _load(f)] for m, f in layouts.items()],
            "The configs that set `channels_last: true`, in their own precision; the other "
            "figures above are those of the configs as they are (NHWC where they set it).",
        )  # fmt: skip
    if "detection" in modules and "map_backends" in modules["detection"]:
        f = modules["detection"]["map_backends"]
        s = f["scores"]["faster_coco_eval"]
        lines += _table(
            f"COCO mAP: faster_coco_eval vs pycocotools, the same {f['images']} images' detections",
            ["backend", "seconds (update + compute)", "map", "map_50", "map_75"],
            [[b, f"{f[b + '_s']:.4f}", *(f"{f['scores'][b][k]:.6f}" for k in
              ("map", "map_50", "map_75"))] for b in ("pycocotools", "faster_coco_eval")],
            f"Speed-up {f['ratio']:.2f}x (median of {f['repeats']}, alternated); largest score "
            f"difference {f['max_abs_diff']:.2g} over {len(s)} scores; load {_load(f)}.",
        )  # fmt: skip
    return lines


def classifier_tables(o: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The digits classifier's epoch-level figures: DataLoader included, accuracy after bf16."""
    rows = [
        ("plain PyTorch loop", o["plain_s"], 1.0),
        ("Lightning: Trainer() + fit (headline)", o["lightning_s"], o["ratio"]),
        ("Lightning: fit only", o["lightning_fit_s"], o["ratio_fit"]),
        ("Lightning: epoch, hook to hook", o["lightning_epoch_s"], o["ratio_epoch"]),
    ]
    lines = _table(
        f"Classifier epoch, Lightning vs plain PyTorch: {o['batches']} batches of {BATCH_SIZE} "
        f"digits, loader included (median of {o['repeats']}, alternated)",
        ["run", "seconds", "ratio to plain"],
        [[name, f"{s:.3f}", f"{r:.3f}"] for name, s, r in rows],
        f"Median of paired ratios (Trainer() + fit / plain): {o['ratio_paired_median']:.3f}. "
        f"CPU seconds: plain {o['plain_cpu_s']:.3f}, Trainer() + fit {o['lightning_cpu_s']:.3f}, "
        f"ratio {o['ratio_cpu']:.3f}.",
    )
    return lines + _table(
        f"Classifier bf16-mixed vs fp32 on CPU: {b['epochs']} epochs, digits 0-9 from scratch",
        ["precision", "s / epoch (median)", "CPU s / epoch", "test/acc"],
        [
            [name, f"{r['epoch_s']:.3f}", f"{r['epoch_cpu_s']:.3f}", f"{r['test_acc']:.4f}"]
            for name, r in (("32-true", b["fp32"]), ("bf16-mixed", b["bf16"]))
        ],
        f"Speed ratio fp32 / bf16: {b['speed_ratio']:.3f} wall, {b['speed_ratio_cpu']:.3f} CPU "
        f"(> 1: bf16 faster). Accuracy difference bf16 - fp32: {b['acc_diff']:+.4f}.",
    )


def markdown(result: dict[str, Any]) -> str:
    env, lines = result["env"], []
    if result.get("modules"):
        lines += module_tables(result["modules"], result["matmul_peak"])
    if "classifier_epoch" in result:
        epoch = result["classifier_epoch"]
        lines += classifier_tables(epoch["trainer_vs_plain"], epoch["bf16_vs_fp32"])
    if "dense_vs_sliding" in result:
        lines += _table(
            "Dense class map vs sliding-window crops: one 224 px scene, 28 px crops, stride 4",
            ["net", "sliding s", "dense s", "speed-up", "max abs score difference"],
            [
                [n, f"{r['sliding_s']:.4f}", f"{r['dense_s']:.4f}", f"{r['speedup']:.1f}x",
                 f"{r['max_abs_diff']:.2g}"]
                for n, r in result["dense_vs_sliding"].items()
                if isinstance(r, dict)
            ],
        )  # fmt: skip
    if "fcn_forward" in result:
        f = result["fcn_forward"]
        lines += _table(
            f"FCN forward on the CPU: one {f['size']}x{f['size']} image, random weights",
            ["net", "images/s"],
            [[n, f"{r['images_per_s']:.2f}"] for n, r in f.items() if isinstance(r, dict)],
            f"Mean of {f['repeats']} passes after one warm-up pass.",
        )
    if "roi_align" in result:
        lines += _table(
            "RoIAlign forward + backward: torchvision's CPU kernel vs one embedding_bag (roi_ops)",
            ["samples per bin", "torchvision s", "embedding_bag s", "speed-up"],
            [
                [k.rsplit("_", 1)[1], f"{r['torchvision_s']:.4f}", f"{r['embedding_bag_s']:.4f}",
                 f"{r['speedup']:.1f}x"]
                for k, r in result["roi_align"].items()
                if isinstance(r, dict)
            ],
            "512 RoIs on an (8, 64, 24, 24) map (a digits Faster R-CNN step), 7x7 bins; median "
            "over the repeats of the best of 5; the same numbers (tests/test_roi_ops.py).",
        )  # fmt: skip
    lines.append(
        f"torch {env['torch']}, lightning {env['lightning']}, {env['threads']} threads, "
        f"{env['cpus']} CPUs, load average {env['load_before']:.2f} before / "
        f"{env['load_after']:.2f} after, {env['wall_s']:.0f} s in all"
        + (
            " (--quick: tiny step counts, a smoke run, not a measurement)."
            if env.get("quick")
            else "."
        )
    )
    return "\n".join(lines) + "\n"


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/benchmark"), help="output folder")
    add("--repeats", type=int, default=7, help="timed runs per side after one warm-up each")
    add("--epochs-bf16", type=int, default=3, help="classifier training epochs per precision")
    add("--threads", type=int, default=1, help="torch threads for every run (see above)")
    add("--seed", type=int, default=0, help="seed of every run")
    add("--modules", nargs="+", choices=list(SPECS), default=list(SPECS), help="which modules")
    add("--steps", type=int, default=None, help="steps per timed run (default: per module)")
    add("--map-images", type=int, default=500, help="images whose detections the mAPs score")
    add("--quick", action="store_true", help="tiny step counts, one repeat: a smoke run (tests)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.epochs_bf16, args.threads, args.map_images, args.steps or 1) < 1:
        parser.error("--repeats, --epochs-bf16, --threads, --steps and --map-images must be >= 1")
    if args.quick:
        args.repeats, args.epochs_bf16, args.steps = 1, 1, 1
        args.map_images = min(args.map_images, 50)
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the chosen modules, in one process."""
    quick, result = args.quick, {}
    peak = matmul_peak(512, 2) if quick else matmul_peak()
    result["matmul_peak"], result["modules"] = peak, {}
    for name in args.modules:
        print(f"{name}: Trainer vs plain, bf16 vs fp32, pipeline, FLOP/s, layout ...", flush=True)
        figures = measure_module(name, args.steps, args.repeats, args.seed, peak, not quick)
        if name == "detection":
            print("detection: mAP with pycocotools vs faster_coco_eval ...", flush=True)
            figures["map_backends"] = measure_map(args.map_images, args.repeats, args.seed)
            print("detection: RoIAlign, torchvision vs embedding_bag ...", flush=True)
            result["roi_align"] = noted(measure_roi_align, args.repeats, args.seed)
        result["modules"][name] = figures
    if "segmentation" in args.modules:
        print("segmentation: FCN forward at 512x512 ...", flush=True)
        result["fcn_forward"] = noted(measure_fcn_forward, 64 if quick else 512, args.repeats)
    if "classification" in args.modules:
        limit, dm, epoch = 2 if quick else None, make_data(), {}
        print(f"classifier epoch, Lightning vs plain: {args.repeats} alternated ...", flush=True)
        epoch["trainer_vs_plain"] = noted(measure_overhead, args.repeats, limit, args.seed, dm)
        print(f"classifier bf16-mixed vs fp32: {args.epochs_bf16} epochs each ...", flush=True)
        epoch["bf16_vs_fp32"] = noted(measure_bf16, args.epochs_bf16, limit, args.seed, dm)
        result["classifier_epoch"] = epoch
        print("dense class map vs sliding crops ...", flush=True)
        repeats = 1 if quick else max(args.repeats, 5)
        result["dense_vs_sliding"] = noted(measure_dense, repeats, args.seed)
    return result


def noted(measure_fn: Any, *args: Any) -> dict[str, Any]:
    """`measure_fn(*args)` with the threads and the load average before and after it."""
    load = os.getloadavg()[0]
    out = measure_fn(*args)
    return out | {"threads": torch.get_num_threads(), "load_before": load,
                  "load_after": os.getloadavg()[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    result = measure(args)
    result["env"] = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start,
        "quick": args.quick,
        "modules": args.modules,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("bench.json", "BENCHMARK.md"):  # an earlier measurement is kept
        keep_previous(args.out / name)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "BENCHMARK.md").write_text("# cnnlab benchmark\n\n" + table)
    print(table)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'BENCHMARK.md'}")
    return result


if __name__ == "__main__":
    main()
